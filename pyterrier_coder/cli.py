"""Command line: ``pyterrier-coder experiment ...`` (also ``python -m pyterrier_coder experiment ...``)."""
from __future__ import annotations

import argparse
import sys

from .experiment import COMPONENTS, DEFAULT_COMPONENTS, ExperimentRunner, ExperimentSettings, parse_overrides
from .experiment.comparisons import measure_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='pyterrier-coder', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    exp = sub.add_parser('experiment', help='train and compare BM25, Dense, CODER, ADORE and MonoELECTRA pipelines',
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    exp.add_argument('--dataset', required=True,
                     help='a directory in the ../shared/datasets layout, or irds:<id>')
    exp.add_argument('--base', default='minilm', help="bi-encoder preset (minilm, tasb), hub id or directory")
    exp.add_argument('--cross-encoder', default='minilm',
                     help='minilm (offline backbone + fresh head), electra-base, monoelectra, hub id or directory')
    exp.add_argument('--components', default=','.join(DEFAULT_COMPONENTS),
                     help=f'which of {",".join(COMPONENTS)} to build and train')
    exp.add_argument('--ablations', action='store_true', help="add the papers' ablation rows")
    exp.add_argument('--out', default='runs/experiment', help='output directory (indexes and models are cached here)')
    exp.add_argument('--seed', type=int, default=42)
    exp.add_argument('--quick', action='store_true', help='tiny budgets: a smoke run in a few minutes')
    exp.add_argument('--device', default=None, help='cuda / cpu (default: cuda when present)')
    exp.add_argument('--retrain', action='store_true', help='retrain models even if --out has them')
    exp.add_argument('--train-split', default='train')
    exp.add_argument('--dev-split', default='dev')
    exp.add_argument('--test-split', default='test')
    exp.add_argument('--measures', default='', metavar='NAME,...',
                     help='measures beside nDCG@10, RR@10, R@100, R@1000 and AP (ir_measures names, e.g. R@10,P@5)')
    exp.add_argument('--rel', type=int, default=None, metavar='LABEL',
                     help='also report RR@10, R@100, R@1000 and AP counting only labels >= LABEL as relevant '
                          '(the TREC Deep Learning convention: 2)')
    exp.add_argument('--set', action='append', default=[], metavar='[COMPONENT.]NAME=VALUE', dest='overrides',
                     help='change the budget, e.g. --set electra.max_steps=600 --set rerank_depth=50 (repeatable; '
                          'a trained model whose settings changed is retrained)')
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == 'experiment':
        components = tuple(c.strip() for c in args.components.split(',') if c.strip())
        try:
            settings = ExperimentSettings(dataset=args.dataset, out=args.out, base=args.base,
                                          cross_encoder=args.cross_encoder, components=components,
                                          ablations=args.ablations, seed=args.seed, quick=args.quick,
                                          device=args.device, retrain=args.retrain, train_split=args.train_split,
                                          dev_split=args.dev_split, test_split=args.test_split,
                                          measures=tuple(m.strip() for m in args.measures.split(',') if m.strip()),
                                          rel=args.rel,
                                          overrides=parse_overrides(args.overrides))
            results = ExperimentRunner(settings).run()
        except (ValueError, OSError, KeyError, ImportError) as e:   # OSError: a model that cannot be found
            print(f'pyterrier-coder: error: {e}', file=sys.stderr)
            return 2
        import pandas as pd
        with pd.option_context('display.width', 200, 'display.max_columns', 12):
            cols = ['name', *measure_names(settings.measures, settings.rel), 'nDCG@10 p-value corrected', 'ms/query']
            print(results[[c for c in cols if c in results.columns]].to_string(index=False))
    return 0


if __name__ == '__main__':
    sys.exit(main())
