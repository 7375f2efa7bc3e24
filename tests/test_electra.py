"""MonoElectra: reranking, head/tokenizer handling, LCE group sampling, training and persistence (offline, tiny)."""
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import pyterrier as pt
import torch

from pyterrier_coder.artifacts import write_component_config
from pyterrier_coder.evaluation import evaluate
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder import losses
from pyterrier_coder.electra import MonoElectra
from pyterrier_coder.lce_groups import TrainingGroups, build_training_groups, sample_groups
from pyterrier_coder.retrievers import BM25


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def dataset(tiny_collection):
    return load_dataset(tiny_collection)


@pytest.fixture(scope='module')
def bm25(dataset, tmp_path_factory):
    index = BM25(tmp_path_factory.mktemp('electra_bm25') / 'index', text=True)
    return index.index(dataset.get_corpus_iter(verbose=False), verbose=False)


@pytest.fixture(scope='module')
def train_res(bm25, dataset):
    return (bm25 % 20)(dataset.get_topics('train'))


def electra(path, **kwargs):
    kwargs.setdefault('verbose', False)
    return MonoElectra(str(path), **kwargs)


def direct_scores(path, queries, docs, max_length=256, head=None):
    """Independent reference: one unbatched forward pass per pair with the plain HF API."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for q, d in zip(queries, docs):
            enc = tok(q, d, truncation='only_second', max_length=max_length, return_tensors='pt')
            logits = model(**enc).logits[0]
            out.append(float(logits[0]) if logits.shape[0] == 1 else float(logits[1] - logits[0]))
    return np.array(out)


def copy_tokenizer(src, dst):
    for f in src.iterdir():
        if 'token' in f.name or f.name in ('vocab.txt', 'special_tokens_map.json'):
            shutil.copy(f, dst / f.name)


# --- inference ---------------------------------------------------------------------------------------------

def test_rerank_columns_sorting_and_scores(tiny_cross_encoder_dir, train_res):
    model = electra(tiny_cross_encoder_dir, batch_size=7)
    inp = train_res.sample(frac=1.0, random_state=0)  # shuffled input
    out = model(inp)
    assert list(out.columns) == list(train_res.columns)
    assert len(out) == len(inp)
    assert out['qid'].is_monotonic_increasing
    for _, g in out.groupby('qid'):
        assert g['rank'].tolist() == list(range(len(g)))
        assert g['score'].is_monotonic_decreasing
    expected = direct_scores(tiny_cross_encoder_dir, out['query'], out['text'])
    np.testing.assert_allclose(out['score'].values, expected, atol=1e-5)
    assert not np.allclose(out['score'].values, inp.set_index(['qid', 'docno']).loc[
        list(zip(out['qid'], out['docno'])), 'score'].values)


def test_query_and_pair_truncation(tiny_cross_encoder_dir):
    text = ' '.join(['apple banana cherry'] * 40)
    frame = pd.DataFrame({'qid': ['1', '2'], 'query': ['apple banana cherry grape lemon mango', 'apple banana cherry'],
                          'docno': ['d', 'd'], 'text': [text, text]})
    out = electra(tiny_cross_encoder_dir, query_max_length=3, max_length=16)(frame)
    s = out.set_index('qid')['score']
    assert s['1'] == pytest.approx(s['2'], abs=1e-6)  # the query was cut to its first 3 tokens
    expected = direct_scores(tiny_cross_encoder_dir, ['apple banana cherry'], [text], max_length=16)
    assert s['2'] == pytest.approx(expected[0], abs=1e-5)
    model = electra(tiny_cross_encoder_dir, query_max_length=3, max_length=16)
    enc = model._encode(model._truncate_queries(['apple banana cherry grape lemon mango']), [text])
    assert len(enc['input_ids'][0]) == 16
    assert model.tokenizer.decode(enc['input_ids'][0]).startswith('[CLS] apple banana cherry [SEP] apple')


def test_two_logit_head(tiny_cross_encoder_dir, tmp_path, train_res):
    from transformers import ElectraConfig, ElectraForSequenceClassification
    config = ElectraConfig.from_pretrained(tiny_cross_encoder_dir)
    config.num_labels = 2
    torch.manual_seed(1)
    ElectraForSequenceClassification(config).save_pretrained(tmp_path)
    copy_tokenizer(tiny_cross_encoder_dir, tmp_path)
    res = train_res.head(12)
    out = electra(tmp_path)(res)
    np.testing.assert_allclose(out['score'].values, direct_scores(tmp_path, out['query'], out['text']), atol=1e-5)
    # a checkpoint whose config does not name its architecture keeps its (2-logit) head, without a warning
    import json
    conf = json.loads((tmp_path / 'config.json').read_text())
    conf.pop('architectures')
    (tmp_path / 'config.json').write_text(json.dumps(conf))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        untagged = electra(tmp_path)
    np.testing.assert_allclose(untagged(res)['score'].values, out['score'].values, atol=1e-6)


def test_tokenizer_override(tiny_cross_encoder_dir, tmp_path, train_res):
    from transformers import AutoModelForSequenceClassification
    AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder_dir).save_pretrained(tmp_path)
    with pytest.raises(OSError, match='tokenizer='):
        electra(tmp_path)
    res = train_res.head(10)
    a = electra(tmp_path, tokenizer=str(tiny_cross_encoder_dir))(res)
    b = electra(tiny_cross_encoder_dir)(res)
    np.testing.assert_allclose(a['score'].values, b['score'].values, atol=1e-6)
    from transformers import AutoTokenizer
    c = electra(tmp_path, tokenizer=AutoTokenizer.from_pretrained(tiny_cross_encoder_dir))(res)
    np.testing.assert_allclose(c['score'].values, b['score'].values, atol=1e-6)


def test_plain_encoder_gets_fresh_one_logit_head(tiny_cross_encoder_dir, tmp_path, train_res):
    from transformers import BertConfig, BertModel
    tok_size = len(__import__('transformers').AutoTokenizer.from_pretrained(tiny_cross_encoder_dir))
    BertModel(BertConfig(vocab_size=tok_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=256)).save_pretrained(tmp_path)
    copy_tokenizer(tiny_cross_encoder_dir, tmp_path)
    with pytest.warns(UserWarning, match='fresh'):
        model = electra(tmp_path)
    assert model.model.config.num_labels == 1
    out = model(train_res.head(8))
    assert np.isfinite(out['score']).all() and out['score'].nunique() > 1


def test_missing_text_error(tiny_cross_encoder_dir, bm25, dataset):
    model = electra(tiny_cross_encoder_dir)
    no_text = BM25(bm25.path, num_results=5)
    with pytest.raises(KeyError, match=r"MonoElectra.*'text'.*text=True.*text_loader"):
        (no_text >> model)(dataset.get_topics('train'))
    # a text loader fixes it
    out = (no_text >> bm25.text_loader() >> model)(dataset.get_topics('train'))
    assert len(out) and 'score' in out


def test_empty_frame_and_nan_text(tiny_cross_encoder_dir):
    model = electra(tiny_cross_encoder_dir)
    empty = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str),
                          'docno': pd.Series(dtype=str), 'text': pd.Series(dtype=str)})
    out = model(empty)
    assert len(out) == 0 and {'score', 'rank'} <= set(out.columns)
    frame = pd.DataFrame({'qid': ['1', '1', '1'], 'query': ['apple'] * 3, 'docno': ['a', 'b', 'c'],
                          'text': [np.nan, '', None]})
    out = model(frame)
    # the three pairs are the same input (an empty passage); batched kernels may differ in the last bits by row
    assert np.isfinite(out['score']).all()
    np.testing.assert_allclose(out['score'].values, out['score'].values[0], rtol=1e-5, atol=1e-7)


def test_composition_with_rank_cutoff(tiny_cross_encoder_dir, bm25, dataset):
    model = electra(tiny_cross_encoder_dir)
    pipe = bm25 % 5 >> model
    out = pipe(dataset.get_topics('train'))
    assert out.groupby('qid').size().max() <= 5
    assert set(out['qid']) == set(dataset.get_topics('train')['qid'])
    assert 'MonoElectra' in repr(pipe)


def test_repr_and_bad_arguments(tiny_cross_encoder_dir):
    assert repr(electra(tiny_cross_encoder_dir, loss='ce', group_size=4)) == \
        f"MonoElectra({str(tiny_cross_encoder_dir)!r}, loss='ce', group_size=4)"
    model = electra(tiny_cross_encoder_dir, batch_size=5, train_batch_size=3, lr=1e-4)
    assert (model.batch_size, model.config.batch_size, model.config.lr) == (5, 3, 1e-4)
    with pytest.raises(ValueError, match='loss'):
        electra(tiny_cross_encoder_dir, loss='listnet')
    with pytest.raises(ValueError, match='lower_labels'):
        electra(tiny_cross_encoder_dir, lower_labels='drop')
    with pytest.raises(TypeError, match='bogus'):
        electra(tiny_cross_encoder_dir, bogus=1)


# --- group sampling ----------------------------------------------------------------------------------------

def _candidates(n=30):
    """One query 'q1' with n candidates d0..d{n-1} (d0 best); qrels: d2 and d5 positive, d3 judged 0,
    d40 positive but not retrieved; query 'q2' without positives; query 'q3' with only 3 candidates."""
    rows = [('q1', 'one', f'd{i}', float(n - i), f'text {i}') for i in range(n)]
    rows += [('q2', 'two', f'e{i}', float(10 - i), f'text e{i}') for i in range(10)]
    rows += [('q3', 'three', f'f{i}', float(3 - i), f'text f{i}') for i in range(3)]
    frame = pd.DataFrame(rows, columns=['qid', 'query', 'docno', 'score', 'text'])
    qrels = pd.DataFrame({'qid': ['q1', 'q1', 'q1', 'q1', 'q3', 'q3'],
                          'docno': ['d2', 'd5', 'd3', 'd40', 'f0', 'f9'], 'label': [1, 2, 0, 1, 1, 1]})
    return frame, qrels


def test_sampler_negatives_are_top_m_distinct_non_positive_and_resampled():
    frame, qrels = _candidates()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        data = build_training_groups(frame.sample(frac=1.0, random_state=1), qrels, negatives_from=10,
                                     group_size=8)
    assert data.qids == ['q1', 'q3']
    q1 = data.qids.index('q1')
    # the top 10 by score minus the judged positives (d3, judged 0, stays a negative), in rank order
    assert list(data.negatives[q1]) == ['d0', 'd1', 'd3', 'd4', 'd6', 'd7', 'd8', 'd9']
    assert set(data.positives[q1]) == {'d2', 'd5'}            # d40: a positive without text, skipped
    assert data.stats['skipped_no_positive'] == 1              # q2
    assert data.stats['positives_without_text'] == 2           # d40 and f9
    assert data.stats['queries_with_few_negatives'] == 1       # q3: 2 negatives < 7
    few = [w for w in caught if 'fewer than group_size' in str(w.message)]
    assert len(few) == 1
    rng = np.random.default_rng(0)
    epochs = [sample_groups(data, 6, rng) for _ in range(20)]
    seen = set()
    for groups in epochs:
        assert sorted(i for i, _ in groups) == [0, 1]
        for i, docnos in groups:
            pos, negs = docnos[0], docnos[1:]
            assert pos in set(data.positives[i])
            assert len(set(negs)) == len(negs)
            assert not set(negs) & set(qrels[(qrels.qid == data.qids[i]) & (qrels.label >= 1)].docno)
            assert set(negs) <= set(data.negatives[i])
            if data.qids[i] == 'q1':
                assert len(negs) == 5 and set(negs) <= {f'd{k}' for k in range(10)}
                seen.add(tuple(sorted(negs)))
            else:
                assert sorted(negs) == ['f1', 'f2']            # fewer negatives than asked: all of them
    assert len(seen) > 10                                      # resampled across epochs


@pytest.mark.filterwarnings('ignore:MonoElectra')
def test_sampler_texts_source_and_min_label():
    frame, qrels = _candidates()
    data = build_training_groups(frame, qrels, negatives_from=10, group_size=4, texts={'d40': 'forty'})
    assert 'd40' in set(data.positives[data.qids.index('q1')]) and data.texts['d40'] == 'forty'
    assert data.stats['positives_without_text'] == 1
    data = build_training_groups(frame, qrels, negatives_from=10, group_size=4, texts=lambda d: {'f9': 'nine'}[d])
    assert data.texts['f9'] == 'nine'
    graded = build_training_groups(frame, qrels, negatives_from=10, group_size=4, min_label=2)
    assert graded.qids == ['q1'] and list(graded.positives[0]) == ['d5']
    assert 'd2' in set(graded.negatives[0])  # label 1 < min_label: may be a negative
    ignored = build_training_groups(frame, qrels, negatives_from=10, group_size=4, min_label=2,
                                    lower_labels='ignore')
    assert list(ignored.positives[0]) == ['d5']
    # d2 (label 1) is kept out of the pool; d3 (judged 0) stays a negative; the rest is unchanged
    assert list(ignored.negatives[0]) == [d for d in graded.negatives[0] if d != 'd2'] and 'd3' in ignored.negatives[0]
    with pytest.raises(ValueError, match='lower_labels'):
        build_training_groups(frame, qrels, lower_labels='drop')


@pytest.mark.filterwarnings('ignore:MonoElectra')
def test_sampler_text_loader_source(bm25, dataset):
    qrels = dataset.get_qrels('train')
    qid = qrels['qid'].iloc[0]
    topics = dataset.get_topics('train')
    frame = (BM25(bm25.path, num_results=20, text=True))(topics[topics.qid == qid])
    frame = frame[~frame['docno'].isin(qrels['docno'])]          # no positive among the candidates
    data = build_training_groups(frame, qrels, texts=bm25.text_loader())
    assert data.qids == [qid] and data.stats['positives_without_text'] == 0
    docs = {d['docno']: d['text'] for d in dataset.get_corpus_iter(verbose=False)}
    assert all(data.texts[d] == docs[d] for d in data.positives[0])


@pytest.mark.filterwarnings('ignore:MonoElectra')
def test_positives_a_text_loader_lacks_are_skipped_and_counted(bm25, dataset, tmp_path):
    """A docstore of part of the corpus raises KeyError for the other docnos: those positives are skipped and
    counted, as from any other texts source (the KeyError ended fit)."""
    docs = list(dataset.get_corpus_iter(verbose=False))
    qrels = dataset.get_qrels('train')
    qid = qrels['qid'].iloc[0]
    positives = qrels[(qrels['qid'] == qid) & (qrels['label'] >= 1)]['docno'].tolist()
    assert len(positives) >= 2
    kept = [d for d in docs if d['docno'] != positives[0]]               # the docstore lacks one positive
    partial = BM25(tmp_path / 'partial', text=True).index(iter(kept), verbose=False)
    topics = dataset.get_topics('train')
    frame = BM25(bm25.path, num_results=20, text=True)(topics[topics.qid == qid])
    frame = frame[~frame['docno'].isin(qrels['docno'])]
    data = build_training_groups(frame, qrels, texts=partial.text_loader())
    assert data.stats['positives_without_text'] == 1
    assert sorted(data.positives[0]) == sorted(positives[1:])


# --- training ----------------------------------------------------------------------------------------------

TRAIN = dict(lr=2e-3, max_steps=60, train_batch_size=4, group_size=8, negatives_from=20, seed=0, eval_every=None)


@pytest.mark.parametrize('loss', ['lce', 'ce', 'hinge'])
def test_fit_each_loss_runs(tiny_cross_encoder_dir, train_res, dataset, loss):
    model = electra(tiny_cross_encoder_dir, loss=loss, **{**TRAIN, 'max_steps': 3})
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.fit(train_res, dataset.get_qrels('train'))
    h = model.history
    assert h['steps'] == 3 and len(h['loss']) == 3 and all(np.isfinite(l) for _, l in h['loss'])
    assert h['training_data']['train_queries'] == 10
    assert any(not torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert model.fitted and 'fitted' in repr(model)


def test_lce_training_improves_training_queries(tiny_cross_encoder_dir, train_res, dataset):
    qrels = dataset.get_qrels('train')
    model = electra(tiny_cross_encoder_dir, **TRAIN)
    before = evaluate(model(train_res), qrels, 'nDCG@10', train_res['qid'].unique())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.fit(train_res, qrels)
    after = evaluate(model(train_res), qrels, 'nDCG@10', train_res['qid'].unique())
    assert after > before + 0.2, (before, after)


def test_pipeline_fit_with_validation(tiny_cross_encoder_dir, bm25, dataset):
    model = electra(tiny_cross_encoder_dir, **{**TRAIN, 'max_steps': 4, 'eval_every': 2})
    pipe = bm25 % 10 >> model
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pipe.fit(dataset.get_topics('train'), dataset.get_qrels('train'),
                 dataset.get_topics('dev'), dataset.get_qrels('dev'))
    evals = model.history['eval']
    assert [s for s, _ in evals] == [0, 2, 4]
    assert model.history['best_metric'] == max(v for _, v in evals)
    # the restored weights are the best validated ones
    dev = (bm25 % 10)(dataset.get_topics('dev'))
    assert evaluate(model(dev), dataset.get_qrels('dev'), 'nDCG@10', dev['qid'].unique()) == pytest.approx(model.history['best_metric'])


def test_fit_requires_text(tiny_cross_encoder_dir, train_res, dataset):
    model = electra(tiny_cross_encoder_dir, **TRAIN)
    with pytest.raises(KeyError, match='MonoElectra.*text=True'):
        model.fit(train_res.drop(columns='text'), dataset.get_qrels('train'))
    with pytest.raises(KeyError, match='validation frame'):
        model.fit(train_res, dataset.get_qrels('train'), train_res.drop(columns='text'), dataset.get_qrels('train'))


# --- persistence -------------------------------------------------------------------------------------------

def test_save_load_round_trip(tiny_cross_encoder_dir, train_res, dataset, tmp_path):
    model = electra(tiny_cross_encoder_dir, loss='ce', group_size=4, query_max_length=20, max_length=64,
                    **{k: v for k, v in TRAIN.items() if k not in ('group_size',)} | {'max_steps': 2})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.fit(train_res, dataset.get_qrels('train'))
    model.save(tmp_path / 'saved')
    loaded = MonoElectra.load(tmp_path / 'saved', verbose=False)
    assert (loaded.loss, loaded.group_size, loaded.query_max_length, loaded.max_length) == ('ce', 4, 20, 64)
    assert loaded.config.lr == model.config.lr and loaded.config.batch_size == model.config.batch_size
    assert loaded.fitted and loaded.history['steps'] == 2
    np.testing.assert_allclose(loaded(train_res)['score'].values, model(train_res)['score'].values, atol=1e-6)


def test_save_load_keeps_every_setting(tiny_cross_encoder_dir, tmp_path):
    settings = dict(query_max_length=16, max_length=64, batch_size=3, text_field='body', group_size=5,
                    negatives_from=7, min_label=2, lower_labels='ignore', loss='hinge', head_lr=1e-3)
    model = electra(tiny_cross_encoder_dir, **settings, lr=3e-5, warmup=5, max_steps=9, train_batch_size=6)
    model.save(tmp_path / 'saved')
    loaded = MonoElectra.load(tmp_path / 'saved', verbose=False)
    assert loaded.settings() == settings                # every value differs from its default
    assert (loaded.config.lr, loaded.config.warmup, loaded.config.max_steps, loaded.config.batch_size) == \
        (3e-5, 5, 9, 6)


@pytest.mark.parametrize('loss', ['lce', 'ce', 'hinge'])
def test_training_loss_is_the_configured_loss_of_the_group_scores(tiny_cross_encoder_dir, loss):
    model = electra(tiny_cross_encoder_dir, loss=loss, group_size=3)
    texts = {'p': 'apple juice apple', 'n1': 'banana market', 'n2': 'cherry tree', 'p2': 'grape seed', 'm1': 'lemon'}
    model._train = TrainingGroups(['1', '2'], ['apple', 'grape'], [np.array(['p'], object), np.array(['p2'], object)],
                                  [np.array(['n1', 'n2'], object), np.array(['m1'], object)], texts, {})
    groups = [(0, ['p', 'n1', 'n2']), (1, ['p2', 'm1'])]      # the second group is shorter: padded
    model.model.eval()   # no dropout, so the loss sees the scores score_pairs gives
    with torch.no_grad():
        got = model._loss(groups).item()
    first = model.score_pairs(['apple'] * 3, [texts[d] for d in groups[0][1]])
    second = model.score_pairs(['grape'] * 2, [texts[d] for d in groups[1][1]])
    scores = torch.tensor([list(first), list(second) + [0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = {'lce': lambda: losses.localized_contrastive(scores, mask),
                'hinge': lambda: losses.pairwise_hinge(scores, mask),
                'ce': lambda: losses.pointwise_bce(scores, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]), mask)}[loss]()
    assert got == pytest.approx(expected.item(), abs=1e-4)


def test_pt_inspect_lists_settings_and_applies_changes_keeping_the_trained_weights(tiny_cross_encoder_dir,
                                                                                     train_res, dataset):
    model = electra(tiny_cross_encoder_dir, max_length=64, **{**TRAIN, 'group_size': 4, 'max_steps': 2})
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model.fit(train_res, dataset.get_qrels('train'))
    attributes = {a.name: a.value for a in pt.inspect.transformer_attributes(model)}
    assert attributes['model'] == str(tiny_cross_encoder_dir) and attributes['tokenizer'] is None   # readable
    assert (attributes['group_size'], attributes['max_length']) == (4, 64)
    assert attributes['train_batch_size'] == TRAIN['train_batch_size'] and attributes['training']['lr'] == TRAIN['lr']
    copy = pt.inspect.transformer_apply_attributes(model, batch_size=3)
    assert copy.batch_size == 3 and copy.fitted and copy.model is not model.model
    np.testing.assert_allclose(copy(train_res)['score'].values, model(train_res)['score'].values, atol=1e-6)
    assert {a.name: a.value for a in pt.inspect.transformer_attributes(copy)}['model'] == str(tiny_cross_encoder_dir)
    fresh = pt.inspect.transformer_apply_attributes(model, model=str(tiny_cross_encoder_dir))   # the checkpoint
    assert not fresh.fitted
    assert not np.allclose(fresh(train_res)['score'].values, model(train_res)['score'].values)
    # a loaded model object is accepted, and copied (training the reranker leaves the caller's model alone)
    from_object = MonoElectra(model.model, tokenizer=model.tokenizer, verbose=False)
    assert from_object.model is not model.model


def test_amp_on_a_cpu_without_bf16_instructions_warns(tiny_cross_encoder_dir, tmp_path, monkeypatch):
    """A model saved with amp=True (the runner does so on CPUs with bf16 instructions) warns when it is loaded on a
    CPU without them, where bf16 is emulated and slow; amp=False loads it quietly."""
    from pyterrier_coder import electra as electra_module
    electra(tiny_cross_encoder_dir, amp=True, device='cpu').save(tmp_path / 'saved')
    monkeypatch.setattr(electra_module, 'cpu_computes_bf16', lambda: False)
    with pytest.warns(UserWarning, match='amp=False'):
        MonoElectra.load(tmp_path / 'saved', verbose=False, device='cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert not MonoElectra.load(tmp_path / 'saved', verbose=False, device='cpu', amp=False).amp
        monkeypatch.setattr(electra_module, 'cpu_computes_bf16', lambda: True)
        assert MonoElectra.load(tmp_path / 'saved', verbose=False, device='cpu').amp


@pytest.mark.parametrize('architecture', ['electra', 'bert-2-logit', 'xlnet'])
def test_amp_keeps_the_head_in_fp32(architecture, tiny_cross_encoder_dir, tmp_path, train_res, one_thread):
    """Under bf16 autocast the transformer body runs in bf16 but the classification head computes fp32 logits: bf16
    logits (8 significant bits) made a query's candidates tie in blocks. Copies, pickles and saves keep this, and
    the state dict is the checkpoint's. XLNet's head has none of the usual names (``logits_proj``)."""
    import copy
    import pickle
    from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                              XLNetConfig, XLNetForSequenceClassification)
    path = tiny_cross_encoder_dir
    if architecture != 'electra':   # a model of another architecture, with the tiny model's tokenizer
        vocab_size = electra(tiny_cross_encoder_dir).tokenizer.vocab_size
        torch.manual_seed(2)
        if architecture == 'bert-2-logit':   # a plain Linear head called `classifier`, 2 logits
            model = BertForSequenceClassification(BertConfig(
                vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=2))
        else:
            model = XLNetForSequenceClassification(XLNetConfig(
                vocab_size=vocab_size, d_model=32, n_layer=2, n_head=4, d_inner=64, num_labels=1))
        path = tmp_path / architecture
        model.save_pretrained(path)
        copy_tokenizer(tiny_cross_encoder_dir, path)
    res = train_res.head(60)
    queries, docs = res['query'].tolist(), res['text'].tolist()
    amp, full = electra(path, amp=True, device='cpu'), electra(path, amp=False, device='cpu')
    scores = amp.score_pairs(queries, docs)
    as_bf16 = torch.from_numpy(scores).bfloat16().float().numpy()
    assert (as_bf16 != scores).mean() > 0.8                 # not bf16 numbers
    reference = full.score_pairs(queries, docs)
    np.testing.assert_allclose(scores, reference, atol=0.1 * np.abs(reference).max())   # bf16 body: close
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        enc = amp.tokenizer(queries[:3], docs[:3], padding=True, truncation=True, return_tensors='pt')
        assert amp.model(**enc).logits.dtype == torch.float32
    for other in (pickle.loads(pickle.dumps(amp)), copy.deepcopy(amp)):
        np.testing.assert_array_equal(other.score_pairs(queries, docs), scores)
    amp.save(tmp_path / 'saved')
    np.testing.assert_array_equal(MonoElectra.load(tmp_path / 'saved', verbose=False).score_pairs(queries, docs),
                                  scores)
    plain = AutoModelForSequenceClassification.from_pretrained(path)
    assert amp.model.state_dict().keys() == plain.state_dict().keys()
    amp.model.to(torch.bfloat16)      # weights already in bf16: the head follows them instead of failing
    assert np.isfinite(amp.score_pairs(queries, docs)).all()


def test_load_wrong_directory(tmp_path, tiny_cross_encoder_dir):
    other = tmp_path / 'coder'
    other.mkdir()
    write_component_config(other, 'Coder', {})
    with pytest.raises(ValueError, match='holds a saved Coder.*MonoElectra'):
        MonoElectra.load(other)
    # a plain Hugging Face cross-encoder directory (a released checkpoint) loads with default settings
    assert isinstance(MonoElectra.load(tiny_cross_encoder_dir), MonoElectra)
    with pytest.raises(FileNotFoundError):
        MonoElectra.load(tmp_path / 'missing')


def test_fresh_head_is_initialised_from_the_seed(tiny_bert_dir):
    """A backbone without a ranking head gets the same fresh head for the same seed (comparable runs), another
    one for another seed."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        a, b, c = (MonoElectra(str(tiny_bert_dir), max_length=64, verbose=False, seed=s) for s in (1, 1, 2))
    head = lambda m: m.model.classifier.weight
    assert torch.equal(head(a), head(b)) and not torch.equal(head(a), head(c))


def test_head_lr_trains_the_fresh_head_at_its_own_rate(tiny_bert_dir, train_res, dataset):
    """With head_lr the parameters the checkpoint lacked (the fresh head) get their own learning rate: at lr=0
    only they move."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        model = MonoElectra(str(tiny_bert_dir), max_length=64, verbose=False, lr=0.0, head_lr=1e-2, max_steps=2,
                            train_batch_size=2, group_size=4, negatives_from=10, eval_every=None, seed=0)
        assert model._fresh_parameters == {'classifier.weight', 'classifier.bias'}
        before = {k: v.clone() for k, v in model.model.named_parameters()}
        model.fit(train_res, dataset.get_qrels('train'))
    moved = {k for k, v in model.model.named_parameters() if not torch.equal(before[k], v)}
    # (the bias may not move: under LCE its gradient is zero up to rounding, a softmax ignores a shared shift)
    assert 'classifier.weight' in moved and moved <= {'classifier.weight', 'classifier.bias'}


def test_unknown_setting_fails_before_the_model_loads(tmp_path):
    """Settings are checked before any weights are read: a typo costs no model load (here there is no model)."""
    with pytest.raises(TypeError, match='lrr'):
        MonoElectra(str(tmp_path / 'no-such-model'), lrr=1e-5)


def test_a_group_of_one_is_refused_for_every_loss(tiny_cross_encoder_dir):
    """A group is its positive and group_size - 1 negatives: with group_size=1 even the pointwise CE would see
    positives only."""
    for loss in ('ce', 'lce', 'hinge'):
        with pytest.raises(ValueError, match=r"group_size must be >= 2 .*loss='ce', group_size=2\), got 1"):
            MonoElectra(str(tiny_cross_encoder_dir), loss=loss, group_size=1, verbose=False)
