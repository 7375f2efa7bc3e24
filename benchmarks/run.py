#!/usr/bin/env python
"""Performance benchmarks for pyterrier-coder.

    python benchmarks/run.py [--small] [--only NAME[,NAME...]] [--device cpu|cuda] [--threads N] [--workdir DIR] [--json FILE]

Benchmarks (one module each in benchmarks/; docs/performance.md says what each one measures and its target):

* ``coder_rerank``  -- CODER reranking 1000 candidates per query vs pyterrier-dr's ``query_encoder() >> scorer()``
  and vs the floor of query encoding alone.
* ``train_step``    -- CODER / ADORE training step split into phases; ``TrainingLoop`` overhead over a bare loop.
* ``cross_encoder`` -- MonoElectra inference and LCE training pairs/s vs a bare transformers loop
  (``--only cross_encoder:inference``, ``cross_encoder:training`` or ``cross_encoder:amp`` runs one part).
* ``gather``        -- ``EmbeddingStore.gather`` of 32 x 1000 candidate embeddings from a large memory-mapped
  index: time per batch and memory (runs in a fresh child process so its peak RSS is its own).

Every comparison is measured side by side in the same process: warm-up runs first, then the variants are
interleaved (alternating their order every repeat) and the median of the repeats is reported. Nothing here
asserts a wall-clock figure; targets are printed for information only. ``--small`` shrinks every size (tiny
random BERT/ELECTRA models, small indexes) so the whole run takes seconds; it is meant for checking the
harness, not for judging performance. Synthetic data is written under ``--workdir``, and every figure goes to a
JSON file (``--json``, by default ``results.json`` in the workdir).
"""
from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('TQDM_DISABLE', '1')          # pyterrier-dr's scorer shows a progress bar per call

import argparse
import importlib.util
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ''):
    # run as a script: load this folder as the package ``benchmarks`` without putting the repository on sys.path,
    # so that pyterrier_coder is imported from wherever it would be otherwise (an installed copy, $PYTHONPATH)
    _here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or '.').resolve() == _here:
        sys.path.pop(0)
    _spec = importlib.util.spec_from_file_location('benchmarks', _here / '__init__.py',
                                                   submodule_search_locations=[str(_here)])
    sys.modules['benchmarks'] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules['benchmarks'])

from benchmarks import coder_rerank, cross_encoder, gather, train_step  # noqa: E402
from benchmarks.harness import Report, machine  # noqa: E402

BENCHMARKS = {'coder_rerank': coder_rerank.run, 'train_step': train_step.run, 'cross_encoder': cross_encoder.run,
              'gather': gather.run}
PARTS = {'cross_encoder': cross_encoder.PARTS}     # --only cross_encoder:training runs one part
CHILDREN = {'gather_child': gather.gather_child, 'epoch_child': gather.epoch_child}
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / 'pyterrier-coder-benchmarks'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog='What each benchmark measures, and the targets: docs/performance.md')
    p.add_argument('--small', action='store_true', help='tiny sizes (seconds per benchmark), for checking the harness')
    p.add_argument('--only', action='append', default=None,
                   help=f'run only these benchmarks (repeatable or comma separated): {", ".join(BENCHMARKS)}')
    p.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: CUDA when present)")
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch\'s own choice); 1 avoids oversubscription on a busy machine')
    p.add_argument('--workdir', type=Path, default=DEFAULT_WORKDIR,
                   help='where synthetic indexes, tiny models and results.json are written (default: %(default)s)')
    p.add_argument('--keep-data', action='store_true', help='keep the large gather index for the next run')
    p.add_argument('--json', type=Path, default=None,
                   help='where to write all figures as JSON (default: results.json in the workdir)')
    p.add_argument('--gather-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--epoch-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--child-json', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names, args.parts = [], {}
    for item in args.only or []:
        for name in (x.strip() for x in item.split(',') if x.strip()):
            name, _, part = name.partition(':')     # e.g. cross_encoder:training
            names.append(name)
            if part:
                if part not in PARTS.get(name, ()):
                    p.error(f'{name} has no part {part!r}; parts: {PARTS.get(name, ())}')
                args.parts.setdefault(name, set()).add(part)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f'unknown benchmark(s) {unknown}; choose from {", ".join(BENCHMARKS)}')
    args.selected = [b for b in BENCHMARKS if not names or b in names]
    if args.json is None:
        args.json = args.workdir / 'results.json'
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return args


def main(argv=None):
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    for option, child in CHILDREN.items():
        if getattr(args, option):
            return child(args)
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    import transformers
    transformers.logging.set_verbosity_error()     # e.g. the load report of MiniLM + a fresh classification head
    report = Report()
    report.results['machine'] = machine(args)
    failed = []
    for name in args.selected:
        start = time.perf_counter()
        try:
            BENCHMARKS[name](args, report)
        except Exception as e:  # report and go on with the other benchmarks
            import traceback
            traceback.print_exc()
            failed.append(name)
            print(f'  !! {name} failed: {type(e).__name__}: {e}')
        print(f'  ({name} took {time.perf_counter() - start:.1f} s)', flush=True)
        report.write(args.json)         # after every benchmark, so a long run that is stopped keeps what it measured
    print(f'\nfigures written to {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
