"""Reproduce the CODER paper's MS MARCO / TREC DL table (TAS-B base) on a GPU machine with internet.

Not run in CI (it downloads MS MARCO, a prebuilt TAS-B FlexIndex of 8.8M passages (~27 GB) and the TAS-B model);
``tests/test_examples.py`` runs :func:`train_and_evaluate` (the same code path) on a small collection.

    pip install -e '.[gpu]'          # faiss-gpu; or .[cpu]
    python examples/msmarco_coder.py --out runs/msmarco --device cuda

Rows (paper notation M_F → CODER(M_D, M_C)):
    BM25, TAS-B, BM25 → TAS-B, BM25 → CODER(TAS-B, BM25), TAS-B → CODER(TAS-B, TAS-B), CODER(TAS-B, TAS-B)
evaluated on MS MARCO dev small (RR@10, R@1000), TREC DL 2019 and 2020 (nDCG@10, R@1000 with rel >= 2).
Training uses the paper's Table 3 settings (Coder's defaults): RAdam, lr 1.73e-6, 9000 warm-up steps, 32 queries
per batch, N = 1000 candidates; validation on 500 dev queries every 5000 steps.

Memory: the training candidates (~500k queries x 1000) are never a DataFrame. Each first stage is run on
``--chunk-size`` queries at a time and its candidates are appended to an int32 candidate set on disk
(``Coder.mine``), which training reads memory-mapped, a batch at a time (``Coder.fit_candidates``). An interrupted
run continues where it stopped: mining resumes after its last complete chunk, training from its last checkpoint.
"""
import argparse
from pathlib import Path

import pyterrier as pt

from pyterrier_coder import Coder

#: queries of each first stage's run held in memory at a time while mining
CHUNK_SIZE = 10_000


def train_and_evaluate(*, train_topics, train_qrels, dev_topics, dev_qrels, eval_sets: dict, bm25, index,
                       encoder, dense_retriever, out: Path, settings: dict, chunk_size: int = CHUNK_SIZE) -> dict:
    """Trains CODER(M_D, BM25) and CODER(M_D, M_D) on candidates mined to disk, then evaluates the six rows on each
    of ``eval_sets`` (``{name: (topics, qrels, measures)}``); returns ``{name: results frame}``, also written to
    ``out/results_<name>.csv``."""
    out = Path(out)
    trained = {}
    for name, first_stage in (('coder_tasb_bm25', bm25), ('coder_tasb_tasb', dense_retriever)):
        checkpoints = str(out / 'checkpoints' / name)
        coder = Coder(index, encoder, checkpoint_dir=checkpoints, **settings)
        candidates = coder.mine(first_stage, train_topics, train_qrels, out / 'candidates' / name,
                                chunk_size=chunk_size, resume=True)
        resume = (Path(checkpoints) / 'checkpoint.pt').exists()
        coder.fit_candidates(candidates, first_stage(dev_topics), dev_qrels, resume=resume)
        coder.save(out / name)
        trained[name] = coder
    coder_bm25, coder_self = trained['coder_tasb_bm25'], trained['coder_tasb_tasb']
    systems = [bm25, dense_retriever, bm25 >> encoder.query_encoder() >> index.scorer(), bm25 >> coder_bm25,
               dense_retriever >> coder_self, coder_self.retriever(1000)]
    names = ['BM25', 'TAS-B', 'BM25 → TAS-B', 'BM25 → CODER(TAS-B, BM25)', 'TAS-B → CODER(TAS-B, TAS-B)',
             'CODER(TAS-B, TAS-B)']
    tables = {}
    for name, (topics, qrels, measures) in eval_sets.items():
        table = pt.Experiment(systems, topics, qrels, measures, names=names, baseline=1, correction='holm')
        table.to_csv(out / f'results_{name}.csv', index=False)
        tables[name] = table
    return tables


def main():
    import pyterrier_dr
    import pyterrier_pisa
    from pyterrier.measures import RR, R, nDCG
    from pyterrier_coder import DenseEncoder, load_dataset
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/msmarco')
    parser.add_argument('--device', default=None)
    parser.add_argument('--epochs', type=float, default=1.0)
    parser.add_argument('--train-queries', type=int, default=None, help='subsample the ~500k training queries')
    parser.add_argument('--chunk-size', type=int, default=CHUNK_SIZE, help='queries per mining chunk')
    args = parser.parse_args()

    train_ds = load_dataset('irds:msmarco-passage/train/judged')
    dev_ds = load_dataset('irds:msmarco-passage/dev/small')
    bm25 = pyterrier_pisa.PisaIndex.from_hf('macavaney/msmarco-passage.pisa').bm25(num_results=1000)
    index = pyterrier_dr.FlexIndex.from_hf('macavaney/msmarco-passage.tasb.flex')   # fixed TAS-B embeddings
    tasb = DenseEncoder.tasb(device=args.device)
    tasb_retriever = tasb.query_encoder() >> index.faiss_flat_retriever(gpu=args.device != 'cpu')
    train_topics = train_ds.get_topics()
    if args.train_queries:
        train_topics = train_topics.sample(args.train_queries, random_state=0)
    eval_sets = {
        'dev-small': (dev_ds.get_topics(), dev_ds.get_qrels(), [RR @ 10, R @ 1000]),
        'dl19': (*load_dataset('irds:msmarco-passage/trec-dl-2019/judged').get_topicsqrels(),
                 [nDCG @ 10, R(rel=2) @ 1000]),
        'dl20': (*load_dataset('irds:msmarco-passage/trec-dl-2020/judged').get_topicsqrels(),
                 [nDCG @ 10, R(rel=2) @ 1000]),
    }
    tables = train_and_evaluate(
        train_topics=train_topics, train_qrels=train_ds.get_qrels(),
        dev_topics=dev_ds.get_topics().sample(500, random_state=0), dev_qrels=dev_ds.get_qrels(),
        eval_sets=eval_sets, bm25=bm25, index=index, encoder=tasb, dense_retriever=tasb_retriever,
        out=Path(args.out), settings=dict(epochs=args.epochs, eval_every=5000, metric='RR@10', device=args.device),
        chunk_size=args.chunk_size)
    for name, table in tables.items():
        print(name)
        print(table.to_string())


if __name__ == '__main__':
    main()
