"""ADORE on a tiny random BERT over the synthetic collection."""
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from pyterrier_coder.evaluation import evaluate
from pyterrier_coder.adore import Adore
from pyterrier_coder.artifacts import CONFIG_FILE
from pyterrier_coder.coder import Coder
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder.encoders import DenseEncoder, DenseIndex

FAST = dict(lr=1e-3, warmup=0, schedule='constant', batch_size=4, eval_every=10, device='cpu', verbose=False)


@pytest.fixture(scope='module')
def setup(tiny_bert_dir, tiny_collection, tmp_path_factory):
    ds = load_dataset(tiny_collection)
    encoder = DenseEncoder(str(tiny_bert_dir), pooling='mean', normalize=True, device='cpu')
    dense = DenseIndex(encoder, tmp_path_factory.mktemp('adore') / 'dense.flex', verbose=False).index(
        ds.get_corpus_iter(verbose=False))
    return ds, encoder, dense


def _ndcg(retriever, ds):
    topics = ds.get_topics('train')
    return evaluate(retriever(topics), ds.get_qrels('train'), 'nDCG@10', topics['qid'])


@pytest.mark.parametrize('options', [dict(), dict(mrr_delta='first_relevant'), dict(delta_metric='nDCG@10'),
                                     dict(lambda_weighting=False), dict(dynamic=False), dict(search='faiss')])
def test_adore_learns_and_keeps_documents_fixed(setup, options):
    if options.get('search') == 'faiss':
        pytest.importorskip('faiss')
    ds, encoder, dense = setup
    vec_hash = hashlib.sha256((dense.flex.index_path / 'vecs.f4').read_bytes()).hexdigest()
    adore = Adore(dense, encoder, k=20, max_steps=30, **options, **FAST)
    before = _ndcg(dense.retriever(100), ds)
    adore.fit(ds.get_topics('train'), ds.get_qrels('train'), ds.get_topics('train'), ds.get_qrels('train'))
    after = _ndcg(adore.retriever(100), ds)
    assert after > before + 0.1, (before, after)
    assert hashlib.sha256((dense.flex.index_path / 'vecs.f4').read_bytes()).hexdigest() == vec_hash
    h = adore.history
    assert 0.0 <= h['retrieval_share'] < 1.0
    if options.get('dynamic', True):
        assert h['timing']['retrieval'] > 0
    # the fine-tuned query encoder plugs into pyterrier-dr pipelines and agrees with adore.retriever
    via_dr = (adore.query_encoder() >> dense.flex.retriever(num_results=10))(ds.get_topics('train'))
    direct = adore.retriever(10)(ds.get_topics('train'))
    assert via_dr['docno'].tolist() == direct['docno'].tolist()


def test_adore_as_transformer_reranks_and_retrieves(setup):
    ds, encoder, dense = setup
    adore = Adore(dense, encoder, num_results=7, **FAST)
    topics = ds.get_topics('dev')
    retrieved = adore(topics)
    assert retrieved.groupby('qid').size().eq(7).all()
    reranked = adore(retrieved[['qid', 'query', 'docno']])
    assert sorted(reranked['docno']) == sorted(retrieved['docno'])
    empty = adore(pd.DataFrame(columns=['qid', 'query', 'docno']))
    assert len(empty) == 0 and 'score' in empty.columns


def test_delta_weights_use_the_retrieved_ranks(setup, monkeypatch):
    """A positive missed by retrieval sits at rank k+1 (here 6); with MRR@200 swapping it with the negative at
    rank r makes it the first relevant: weight 1/r - 1/6 -- checked on the tensors passed to the loss."""
    ds, encoder, dense = setup
    adore = Adore(dense, encoder, k=5, max_steps=1, **FAST)
    seen = {}
    from pyterrier_coder import losses
    original = losses.weighted_pairwise_logistic

    def spy(pos, neg, weights, mask):
        seen['weights'], seen['mask'] = weights.detach().clone(), mask.clone()
        return original(pos, neg, weights, mask)
    monkeypatch.setattr(losses, 'weighted_pairwise_logistic', spy)
    qrels = pd.DataFrame({'qid': ['q00'], 'docno': ['d155'], 'label': [2]})   # a document of another topic
    adore.fit(ds.get_topics('train'), qrels)
    w, m = seen['weights'][0, 0], seen['mask'][0, 0]
    expected = torch.tensor([1 / r - 1 / 6 for r in range(1, 6)])
    assert m.all() and torch.allclose(w, expected)


def _first_step_unpaired(setup, monkeypatch, topics, qrels, **options):
    """Fits ADORE for one step retrieving the whole corpus (every judged document is retrieved); returns the
    store and, for the first query, the retrieved row ids and the positions the loss's pair mask leaves unpaired
    with its first positive."""
    ds, encoder, dense = setup
    from pyterrier_coder import losses
    from pyterrier_coder.embeddings import EmbeddingStore
    store = EmbeddingStore(dense.flex)
    adore = Adore(dense, encoder, k=len(store), max_steps=1, **options, **FAST)
    seen, retrieved = {}, []
    original_loss, original_search = losses.weighted_pairwise_logistic, adore._search_ids

    def spy(pos, neg, weights, mask):
        seen['mask'] = mask.clone()
        return original_loss(pos, neg, weights, mask)
    monkeypatch.setattr(losses, 'weighted_pairwise_logistic', spy)
    monkeypatch.setattr(adore, '_search_ids', lambda q, k: retrieved.append(original_search(q, k)) or retrieved[-1])
    adore.fit(topics, qrels)
    return adore, store, retrieved[0][0].tolist(), (~seen['mask'][0, 0]).nonzero().flatten().tolist()


def test_a_retrieved_positive_is_not_paired_with_itself(setup, monkeypatch):
    ds = setup[0]
    _, store, order, unpaired = _first_step_unpaired(
        setup, monkeypatch, ds.get_topics('train'), pd.DataFrame({'qid': ['q00'], 'docno': ['d000'], 'label': [1]}))
    assert unpaired == [order.index(int(store.ids(['d000'])[0]))]


@pytest.mark.parametrize('lower_labels', ['negative', 'ignore'])
def test_lower_grades_are_negatives_or_kept_out_of_the_pairs(setup, monkeypatch, lower_labels):
    """With min_label=2 a retrieved label-1 document is paired with the positive as a negative, unless
    lower_labels='ignore'; documents of other queries' qrels are negatives either way."""
    ds = setup[0]
    qrels = pd.DataFrame({'qid': ['q00', 'q00', 'q00', 'q01'], 'docno': ['d000', 'd001', 'd002', 'd003'],
                          'label': [2, 1, 1, 1]})
    adore, store, order, unpaired = _first_step_unpaired(
        setup, monkeypatch, ds.get_topics('train').query('qid == "q00"'), qrels, min_label=2,
        lower_labels=lower_labels)
    expected = ['d000'] + (['d001', 'd002'] if lower_labels == 'ignore' else [])
    assert sorted(unpaired) == sorted(order.index(int(i)) for i in store.ids(expected))
    assert adore.history['training_data']['lower_grades_ignored'] == (2 if lower_labels == 'ignore' else 0)


def test_ndcg_weights_use_the_ideal_dcg_of_the_sorted_labels(setup, monkeypatch):
    ds, encoder, dense = setup
    from pyterrier_coder import losses
    seen = []
    original = losses.delta_ndcg
    monkeypatch.setattr(losses, 'delta_ndcg', lambda *args: seen.append(args) or original(*args))
    adore = Adore(dense, encoder, k=5, max_steps=1, delta_metric='nDCG@10', **FAST)
    qrels = pd.DataFrame({'qid': ['q00', 'q00'], 'docno': ['d001', 'd000'], 'label': [1, 2]})   # not label-sorted
    adore.fit(ds.get_topics('train'), qrels)
    ideal = seen[0][5]
    assert ideal[0].item() == pytest.approx(2 + 1 / np.log2(3), rel=1e-5)


def test_save_load_keeps_every_setting(setup, tmp_path):
    ds, encoder, dense = setup
    chosen = dict(k=13, delta_metric='nDCG@10', mrr_delta='first_relevant', lambda_weighting=False, dynamic=False,
                  min_label=2, lower_labels='ignore', search='faiss', temperature=0.5)
    adore = Adore(dense, encoder, verbose=False, device='cpu', **chosen)
    adore.save(tmp_path / 'adore')
    loaded = Adore.load(tmp_path / 'adore', device='cpu', verbose=False)
    assert loaded.settings() == adore.settings()
    assert {name: loaded.settings()[name] for name in chosen} == chosen     # every value differs from its default


def test_a_model_saved_before_mrr_delta_existed_loads_with_the_weights_it_was_trained_with(setup, tmp_path):
    ds, encoder, dense = setup
    Adore(dense, encoder, verbose=False, device='cpu').save(tmp_path / 'adore')
    config = tmp_path / 'adore' / CONFIG_FILE
    saved = json.loads(config.read_text())
    del saved['settings']['mrr_delta']
    config.write_text(json.dumps(saved))
    assert Adore.load(tmp_path / 'adore', device='cpu', verbose=False).mrr_delta == 'first_relevant'
    assert Adore(dense, encoder, verbose=False).mrr_delta == 'each_relevant'     # the default of a new model


@pytest.mark.parametrize('mrr_delta, weights', [('each_relevant', 'delta_rr_each'), ('first_relevant', 'delta_mrr')])
def test_mrr_pairs_are_weighted_by_the_chosen_change(setup, monkeypatch, mrr_delta, weights):
    ds, encoder, dense = setup
    from pyterrier_coder import losses
    called = []
    for name in ('delta_rr_each', 'delta_mrr'):
        original = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *args, _name=name, _f=original: called.append(_name) or _f(*args))
    adore = Adore(dense, encoder, k=5, max_steps=1, mrr_delta=mrr_delta, **FAST)
    adore.fit(ds.get_topics('train'), ds.get_qrels('train'))
    assert called and set(called) == {weights}
    assert f'mrr_delta={mrr_delta!r}' in repr(adore)
    assert 'mrr_delta' not in repr(Adore(dense, encoder, delta_metric='nDCG@10', mrr_delta=mrr_delta, **FAST))


def test_save_load_round_trip_and_cross_type_error(setup, tmp_path):
    ds, encoder, dense = setup
    adore = Adore(dense, encoder, k=10, max_steps=5, **FAST)
    adore.fit(ds.get_topics('train'), ds.get_qrels('train'))
    adore.save(tmp_path / 'adore')
    loaded = Adore.load(tmp_path / 'adore', device='cpu')
    topics = ds.get_topics('dev')
    a, b = adore.retriever(10)(topics), loaded.retriever(10)(topics)
    assert a['docno'].tolist() == b['docno'].tolist()
    np.testing.assert_allclose(a['score'], b['score'], atol=1e-6)
    assert loaded.k == 10 and loaded.fitted
    with pytest.raises(ValueError, match='holds a saved Adore'):
        Coder.load(tmp_path / 'adore')


def test_coder_initialised_from_adore(setup):
    ds, encoder, dense = setup
    adore = Adore(dense, encoder, k=10, max_steps=5, **FAST).fit(ds.get_topics('train'), ds.get_qrels('train'))
    coder = Coder(dense, adore.encoder, **FAST)
    np.testing.assert_allclose(coder.encoder.encode_queries(['apple']), adore.encoder.encode_queries(['apple']))


def test_bad_arguments(setup):
    ds, encoder, dense = setup
    with pytest.raises(ValueError, match='delta_metric'):
        Adore(dense, encoder, delta_metric='P@10')
    with pytest.raises(ValueError, match='search'):
        Adore(dense, encoder, search='annoy')
    with pytest.raises(ValueError, match='lower_labels'):
        Adore(dense, encoder, lower_labels='drop')
    with pytest.raises(ValueError, match='mrr_delta'):
        Adore(dense, encoder, mrr_delta='last_relevant')
    with pytest.raises(ValueError, match='no training query'):
        Adore(dense, encoder, **FAST).fit(ds.get_topics('train'), pd.DataFrame(
            {'qid': ['zz'], 'docno': ['d000'], 'label': [1]}))


def test_faiss_index_is_sharded_over_all_gpus_when_faiss_sees_gpus(setup, monkeypatch):
    """No GPU here: faiss' GPU API is stood in for, to check the guarded branch's wiring (every GPU, sharded,
    built once) and that retrieval through the returned index is unchanged."""
    faiss = pytest.importorskip('faiss')
    ds, encoder, dense = setup
    calls = []

    class ClonerOptions:
        shard = False

    def to_all_gpus(index, co=None):
        calls.append(co.shard)
        return index                                   # the CPU index stands in for its GPU shards

    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 2, raising=False)
    monkeypatch.setattr(faiss, 'GpuMultipleClonerOptions', ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, 'index_cpu_to_all_gpus', to_all_gpus, raising=False)
    adore = Adore(dense, encoder, k=10, search='faiss', **FAST)
    q = encoder.encode_queries_torch(ds.get_topics('train')['query'].tolist()[:3]).detach()
    via_faiss = adore._search_ids(q, 10)
    adore._search_ids(q, 10)
    assert calls == [True]                             # one sharded clone, reused by later searches
    exact = Adore(dense, encoder, k=10, **FAST)._search_ids(q, 10)
    np.testing.assert_array_equal(via_faiss, exact)


def test_faiss_index_under_torchrun_goes_on_this_ranks_gpu_only(setup, monkeypatch):
    """Every rank holds its own index: sharding each over all GPUs would put world_size shards on every GPU."""
    faiss = pytest.importorskip('faiss')
    ds, encoder, dense = setup
    calls = []

    class ClonerOptions:
        shard = False

    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setattr(faiss, 'get_num_gpus', lambda: 2, raising=False)
    monkeypatch.setattr(faiss, 'GpuMultipleClonerOptions', ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, 'index_cpu_to_all_gpus', lambda index, co=None: calls.append('all') or index,
                        raising=False)
    monkeypatch.setattr(faiss, 'index_cpu_to_gpus_list',
                        lambda index, co=None, gpus=None: calls.append(gpus) or index, raising=False)
    q = encoder.encode_queries_torch(ds.get_topics('train')['query'].tolist()[:2]).detach()
    Adore(dense, encoder, k=10, search='faiss', **FAST)._search_ids(q, 10)
    assert calls == [[1]]
    with pytest.raises(ValueError, match='2048'):        # faiss GPU indexes return at most 2048 results
        Adore(dense, encoder, k=3000, search='faiss', **FAST)._search_ids(q, 3000)


def test_adore_trains_against_a_product_quantised_index(setup):
    """search='faiss:<factory>' retrieves the negatives from the compressed index that would be deployed (here
    product quantisation, 4 bits per 8 dimensions), while the scores of the loss stay exact."""
    faiss = pytest.importorskip('faiss')
    ds, encoder, dense = setup
    adore = Adore(dense, encoder, k=20, max_steps=30, search='faiss:PQ4x4', **FAST)
    before = _ndcg(dense.retriever(100), ds)
    adore.fit(ds.get_topics('train'), ds.get_qrels('train'), ds.get_topics('train'), ds.get_qrels('train'))
    assert isinstance(faiss.downcast_index(adore._faiss), faiss.IndexPQ) and adore._faiss.ntotal == len(dense)
    assert _ndcg(adore.retriever(100), ds) > before + 0.05
    assert adore.history['timing']['retrieval'] > 0

