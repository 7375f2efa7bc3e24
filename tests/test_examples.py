"""The examples' code paths, run on the tiny collection and models (the examples themselves download MS MARCO)."""
import importlib.util
from pathlib import Path

import numpy as np
import pyterrier as pt
from pyterrier.measures import RR, nDCG

from pyterrier_coder import BM25, Coder, DenseEncoder, DenseIndex, load_dataset
from pyterrier_coder.candidates import CandidateSet

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'


def _module(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_msmarco_example_streams_candidates_through_the_store(tiny_collection, tiny_bert_dir, tmp_path, monkeypatch):
    """examples/msmarco_coder.py at MS MARCO scale never holds the training candidates as a frame: its
    train_and_evaluate mines each first stage a chunk of queries at a time to disk and trains from the memory-mapped
    set. The same function on the tiny collection: every chunk of the first stage's run is small, training reads a
    memory-mapped set, and the six rows are evaluated."""
    example = _module('msmarco_coder')
    ds = load_dataset(tiny_collection)
    encoder = DenseEncoder(str(tiny_bert_dir), pooling='mean', normalize=True, device='cpu')
    index = DenseIndex(encoder, tmp_path / 'dense.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    bm25 = BM25(tmp_path / 'bm25').index(ds.get_corpus_iter(verbose=False), verbose=False)
    seen_chunks, trained_on = [], []

    class Recording(pt.Transformer):     # a first stage that records how many queries each call is given
        def __init__(self, inner):
            self.inner = inner

        def transform(self, topics):
            seen_chunks.append(set(topics['qid']) if 'qid' in topics.columns else set())
            return self.inner(topics)

    original = Coder.fit_candidates

    def record(self, candidates, *args, **kwargs):
        trained_on.append(candidates)
        return original(self, candidates, *args, **kwargs)
    monkeypatch.setattr(Coder, 'fit_candidates', record)
    train = ds.get_topics('train')
    tables = example.train_and_evaluate(
        train_topics=train, train_qrels=ds.get_qrels('train'), dev_topics=ds.get_topics('dev'),
        dev_qrels=ds.get_qrels('dev'), eval_sets={'test': (*ds.get_topicsqrels('test'), [RR @ 10, nDCG @ 10])},
        bm25=Recording(bm25 % 20), index=index.flex, encoder=encoder,
        dense_retriever=Recording(index.retriever(20)), out=tmp_path / 'out',
        settings=dict(lr=1e-3, warmup=0, max_steps=3, eval_every=2, batch_size=4, num_candidates=20, device='cpu',
                      verbose=False), chunk_size=3)
    train_qids = set(train['qid'])
    mining_calls = [qids for qids in seen_chunks if qids and qids <= train_qids]
    assert max(map(len, mining_calls)) <= 3                 # the first stage ran on 3 training queries at a time
    assert set().union(*mining_calls) == train_qids         # ... over all of them
    assert len(trained_on) == 2 and all(isinstance(c, CandidateSet) and isinstance(c.docids, np.memmap)
                                        for c in trained_on)
    table = tables['test']
    assert len(table) == 6 and table['nDCG@10'].between(0, 1).all()
    assert (tmp_path / 'out' / 'results_test.csv').exists()
    for name in ('coder_tasb_bm25', 'coder_tasb_tasb'):
        assert Coder.load(tmp_path / 'out' / name, index=index).fitted
