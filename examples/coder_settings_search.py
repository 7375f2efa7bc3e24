"""Try CODER settings on a small collection: one run per JSON settings string, printing the validation curve and
a test table (paired t-tests against the untrained MiniLM reranker / retriever).

    python examples/coder_settings_search.py '{"max_steps": 400, "lr": 2e-5, "min_label": 2, "lower_labels": "ignore"}'
    python examples/coder_settings_search.py '{"candidates": "self", "max_steps": 400, "lr": 2e-5, "min_label": 2, "lower_labels": "ignore"}'

Every key except "candidates" ("bm25", default, or "self" for M_C = M_D) is a Coder argument; the defaults below
(AdamW, 10% warm-up, constant lr, eval every 50 steps) are what docs/coder.md reports for NFCorpus.
"""
import json
import os
import sys
import time
import warnings

import pyterrier as pt
from pyterrier.measures import nDCG, RR, R

from pyterrier_coder import BM25, Coder, DenseEncoder, DenseIndex, load_dataset

DATASET = os.environ.get('PTC_DATASET', '../shared/datasets/nfcorpus')
INDEXES = os.environ.get('PTC_INDEX_DIR', 'runs/indexes')


def main(settings: dict):
    warnings.filterwarnings('ignore')
    candidates = settings.pop('candidates', 'bm25')
    settings = {'optimizer': 'adamw', 'warmup': 0.1, 'eval_every': 50, 'verbose': False, **settings}
    ds = load_dataset(DATASET)
    bm25 = BM25.from_dataset(ds, f'{INDEXES}/bm25')
    minilm = DenseEncoder.minilm()
    dense = DenseIndex(minilm, f'{INDEXES}/dense.flex').index(ds.get_corpus_iter())
    coder = Coder(dense, minilm, **settings)
    start = time.time()
    train, dev = ds.get_topics('train'), ds.get_topics('dev')
    if candidates == 'self':
        coder.fit(train, ds.get_qrels('train'), dev, ds.get_qrels('dev'))            # CODER(MiniLM, MiniLM)
    else:
        (bm25 % coder.num_candidates >> coder).fit(train, ds.get_qrels('train'), dev, ds.get_qrels('dev'))
    h = coder.history
    print(f'settings {settings} candidates={candidates}: {time.time() - start:.0f} s; best dev {h["metric"]} '
          f'{h["best_metric"]:.4f} at step {h["best_step"]}; curve {[(s, round(v, 4)) for s, v in h["eval"]]}')
    test, qrels = ds.get_topics('test'), ds.get_qrels('test')
    test = test[test['qid'].isin(qrels['qid'])]
    measures = [nDCG @ 10, RR @ 10, R @ 100]
    print(pt.Experiment([bm25 >> dense.scorer(), bm25 >> coder], test, qrels, measures,
                        names=['BM25 >> MiniLM', 'BM25 >> CODER'], baseline=0).to_string())
    print(pt.Experiment([dense.retriever(1000), coder.retriever(1000)], test, qrels, measures,
                        names=['MiniLM', 'CODER'], baseline=0).to_string())


if __name__ == '__main__':
    main(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
