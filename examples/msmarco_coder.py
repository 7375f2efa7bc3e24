"""Reproduce the CODER paper's MS MARCO / TREC DL table (TAS-B base) on a GPU machine with internet.

Not run in CI (it downloads MS MARCO, a prebuilt TAS-B FlexIndex of 8.8M passages (~27 GB) and the TAS-B model).

    pip install -e '.[gpu]'          # faiss-gpu; or .[cpu]
    python examples/msmarco_coder.py --out runs/msmarco --device cuda

Rows (paper notation M_F → CODER(M_D, M_C)):
    BM25, TAS-B, BM25 → TAS-B, BM25 → CODER(TAS-B, BM25), TAS-B → CODER(TAS-B, TAS-B), CODER(TAS-B, TAS-B)
evaluated on MS MARCO dev small (RR@10, R@1000), TREC DL 2019 and 2020 (nDCG@10, R@1000 with rel >= 2).
Training uses the paper's Table 3 settings (Coder's defaults): RAdam, lr 1.73e-6, 9000 warm-up steps, 32 queries
per batch, N = 1000 candidates; validation on 500 dev queries every 5000 steps.
"""
import argparse
from pathlib import Path

import pyterrier as pt
import pyterrier_dr
from pyterrier.measures import RR, R, nDCG

from pyterrier_coder import Coder, DenseEncoder, load_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default='runs/msmarco')
    parser.add_argument('--device', default=None)
    parser.add_argument('--epochs', type=float, default=1.0)
    parser.add_argument('--train-queries', type=int, default=None, help='subsample the ~500k training queries')
    args = parser.parse_args()
    out = Path(args.out)

    train_ds = load_dataset('irds:msmarco-passage/train/judged')
    dev_ds = load_dataset('irds:msmarco-passage/dev/small')
    import pyterrier_pisa
    bm25 = pyterrier_pisa.PisaIndex.from_hf('macavaney/msmarco-passage.pisa').bm25(num_results=1000)
    index = pyterrier_dr.FlexIndex.from_hf('macavaney/msmarco-passage.tasb.flex')   # fixed TAS-B embeddings
    tasb = DenseEncoder.tasb(device=args.device)
    tasb_retriever = tasb.query_encoder() >> index.faiss_flat_retriever(gpu=args.device != 'cpu')

    train_topics = train_ds.get_topics()
    if args.train_queries:
        train_topics = train_topics.sample(args.train_queries, random_state=0)
    dev_topics = dev_ds.get_topics().sample(500, random_state=0)
    settings = dict(epochs=args.epochs, eval_every=5000, metric='RR@10', device=args.device)

    coder_bm25 = Coder(index, tasb, **settings)                       # CODER(TAS-B, BM25)
    (bm25 >> coder_bm25).fit(train_topics, train_ds.get_qrels(), dev_topics, dev_ds.get_qrels())
    coder_bm25.save(out / 'coder_tasb_bm25')
    coder_self = Coder(index, tasb, **settings)                       # CODER(TAS-B, TAS-B)
    (tasb_retriever >> coder_self).fit(train_topics, train_ds.get_qrels(), dev_topics, dev_ds.get_qrels())
    coder_self.save(out / 'coder_tasb_tasb')

    systems = [bm25, tasb_retriever, bm25 >> tasb.query_encoder() >> index.scorer(), bm25 >> coder_bm25,
               tasb_retriever >> coder_self, coder_self.query_encoder() >> index.faiss_flat_retriever(gpu=args.device != 'cpu')]
    names = ['BM25', 'TAS-B', 'BM25 → TAS-B', 'BM25 → CODER(TAS-B, BM25)', 'TAS-B → CODER(TAS-B, TAS-B)',
             'CODER(TAS-B, TAS-B)']
    for name, (topics, qrels, measures) in {
        'dev-small': (dev_ds.get_topics(), dev_ds.get_qrels(), [RR @ 10, R @ 1000]),
        'dl19': (*load_dataset('irds:msmarco-passage/trec-dl-2019/judged').get_topicsqrels(), [nDCG @ 10, R(rel=2) @ 1000]),
        'dl20': (*load_dataset('irds:msmarco-passage/trec-dl-2020/judged').get_topicsqrels(), [nDCG @ 10, R(rel=2) @ 1000]),
    }.items():
        table = pt.Experiment(systems, topics, qrels, measures, names=names, baseline=1, correction='holm')
        table.to_csv(out / f'results_{name}.csv', index=False)
        print(name)
        print(table.to_string())


if __name__ == '__main__':
    main()
