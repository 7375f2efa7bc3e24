"""Reliability of every transformer and every fit: bad input, reproducibility, Hub-style sharing, long inputs.

Bad-input cases are parametrised over the components they apply to (BM25, DenseIndex.retriever/scorer, Coder,
Adore, MonoElectra); everything runs offline on the tiny fixture models."""
import json
import shutil
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pyterrier_coder.hf_models import tokenize_truncated
from pyterrier_coder.validation import InputValidationError
from pyterrier_coder.adore import Adore
from pyterrier_coder.coder import Coder
from pyterrier_coder.datasets import load_dataset
from pyterrier_coder.electra import MonoElectra
from pyterrier_coder.encoders import DenseEncoder, DenseIndex
from pyterrier_coder.embeddings import EmbeddingStore
from pyterrier_coder.frames import normalise_qrels
from pyterrier_coder.retrievers import BM25

from conftest import crash_at_loss, quiet

FAST = dict(lr=1e-3, warmup=0, schedule='constant', batch_size=4, eval_every=None, max_steps=2, device='cpu',
            verbose=False)
RETRIEVERS = ['BM25', 'DenseIndex.retriever']
RERANKERS = ['DenseIndex.scorer', 'Coder', 'Adore', 'MonoElectra']
TRAINERS = ['Coder', 'Adore', 'MonoElectra']
pytestmark = [pytest.mark.filterwarnings('ignore:MonoElectra.*fewer than group_size'),
              pytest.mark.usefixtures('one_thread')]


@pytest.fixture(scope='module')
def env(tiny_bert_dir, tiny_cross_encoder_dir, tiny_collection, tmp_path_factory):
    ds = load_dataset(tiny_collection)
    root = tmp_path_factory.mktemp('reliability')
    encoder = DenseEncoder(str(tiny_bert_dir), pooling='mean', normalize=True, device='cpu')
    dense = DenseIndex(encoder, root / 'dense.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    bm25 = BM25(root / 'bm25', text=True).index(ds.get_corpus_iter(verbose=False), verbose=False)
    train = (bm25 % 10)(ds.get_topics('train'))
    res = (bm25 % 4)(ds.get_topics('dev'))           # a small result frame with text, all docnos in the index
    return SimpleNamespace(ds=ds, encoder=encoder, dense=dense, bm25=bm25, electra_dir=tiny_cross_encoder_dir,
                           train=train, qrels=ds.get_qrels('train'), res=res, bert_dir=tiny_bert_dir)


@pytest.fixture(scope='module')
def numeric(env, tmp_path_factory):
    """A FlexIndex of 1000 random unit vectors whose docnos are '0'..'999' (int docnos in the input match them)."""
    import pyterrier_dr
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(1000, env.encoder.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    flex = pyterrier_dr.FlexIndex(str(tmp_path_factory.mktemp('numeric') / 'numeric.flex'), verbose=False)
    flex.indexer(mode='overwrite').index([{'docno': str(i), 'doc_vec': v} for i, v in enumerate(vecs)])
    return DenseIndex(env.encoder, flex, verbose=False)


def transformer(name, env, index=None, **kwargs):
    dense = index or env.dense
    if name == 'BM25':
        return BM25(env.bm25.path, num_results=5, text=True)
    if name == 'DenseIndex.retriever':
        return dense.retriever(5)
    if name == 'DenseIndex.scorer':
        return dense.scorer(**kwargs)
    if name in ('Coder', 'Adore'):
        cls = Coder if name == 'Coder' else Adore
        return cls(dense, env.encoder, num_results=5, verbose=False, device='cpu', **kwargs)
    return MonoElectra(str(env.electra_dir), verbose=False, max_length=64, **kwargs)


def trainer(name, env, index=None, **kwargs):
    options = {**FAST, **kwargs}
    if name == 'Coder':
        return Coder(index or env.dense, env.encoder, num_candidates=10, **options)
    if name == 'Adore':
        return Adore(index or env.dense, env.encoder, k=10, **options)
    options['train_batch_size'] = options.pop('batch_size')
    return MonoElectra(str(env.electra_dir), max_length=64, group_size=4, negatives_from=10, **options)


def scores_by(out):
    return out.set_index(['qid', 'docno'])['score'].sort_index()


# --- bad input: missing columns -------------------------------------------------------------------------------

@pytest.mark.parametrize('name', RETRIEVERS + RERANKERS)
def test_missing_columns_name_the_component_and_the_columns(env, name):
    t = transformer(name, env)
    with pytest.raises(InputValidationError, match=rf"^{name}: the input frame .*missing \[.*'query'"):
        t(pd.DataFrame({'qid': ['1'], 'docno': ['d000']}))
    with pytest.raises(KeyError):            # InputValidationError stays a KeyError, as in pta.validate
        t(pd.DataFrame({'qid': ['1'], 'docno': ['d000']}))


@pytest.mark.parametrize('which', ['train', 'valid', 'qrels'])
@pytest.mark.parametrize('name', TRAINERS)
def test_fit_missing_columns_name_the_component_and_the_columns(env, name, which):
    args = [env.train, env.qrels, env.train, env.qrels]
    if which == 'train':
        args[0], match = env.train.drop(columns='query'), rf"^{name}\.fit: the training frame .*missing \['query'\]"
    elif which == 'valid':
        args[2], match = env.train.drop(columns='query'), rf"^{name}\.fit: the validation frame .*missing \['query'\]"
    else:
        args[1], match = env.qrels.drop(columns='label'), rf"^{name}(\.fit)?: the qrels frame .*missing \['label'\]"
    with pytest.raises(InputValidationError, match=match):
        quiet(trainer(name, env).fit, *args)


# --- bad input: empty frames ----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', RETRIEVERS + RERANKERS + ['Coder (retrieve)', 'Adore (retrieve)'])
def test_empty_input_gives_empty_output_with_the_right_columns(env, name):
    t = transformer(name.split()[0], env)
    if name in RERANKERS:
        inp = env.res.iloc[:0]
        expected = list(env.res.columns)
    else:
        inp = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str)})
        expected = ['qid', 'query', 'docno', 'score', 'rank']
    out = t(inp)
    assert len(out) == 0 and set(expected) <= set(out.columns), list(out.columns)


@pytest.mark.parametrize('name', TRAINERS)
def test_fit_on_an_empty_frame_fails_clearly(env, name):
    with pytest.raises(ValueError, match=rf'^{name}\.fit: no training query'):
        quiet(trainer(name, env).fit, env.train.iloc[:0], env.qrels)


@pytest.mark.parametrize('name', TRAINERS)
def test_no_positive_at_min_label_names_the_threshold(env, name):
    with pytest.raises(ValueError, match=rf'^{name}\.fit: no training query has a judged positive \(label >= 5\)'):
        quiet(trainer(name, env, min_label=5).fit, env.train, env.qrels)


# --- bad input: docnos absent from the index -----------------------------------------------------------------

@pytest.mark.parametrize('name', ['DenseIndex.scorer', 'Coder', 'Adore'])
def test_docnos_absent_from_the_index(env, name):
    frame = env.res.copy()
    frame.loc[[0, 1], 'docno'] = ['nope1', 'nope2']
    with pytest.raises(KeyError, match=rf"{name}: 2 docno\(s\) are not in the document index.*'nope1', 'nope2'"):
        transformer(name, env)(frame)
    with pytest.warns(UserWarning, match=f'{name}: dropped 2 rows whose docno is not in the index'):
        out = transformer(name, env, on_missing='drop')(frame)
    assert sorted(out['docno']) == sorted(frame['docno'][2:])


# --- bad input: qrels of unknown queries, queries without positives ---------------------------------------------

@pytest.mark.parametrize('name', TRAINERS)
def test_qrels_of_queries_absent_from_the_topics_are_ignored_and_counted(env, name):
    qrels = pd.concat([env.qrels, pd.DataFrame({'qid': ['zz', 'zz'], 'docno': ['d000', 'd001'], 'label': [1, 2]})])
    model = trainer(name, env)
    with pytest.warns(UserWarning, match=f'{name}: ignored 2 qrels of 1 query absent from the training frame'):
        model.fit(env.train, qrels)
    data = model.history['training_data']
    assert data['qrels_for_unknown_queries'] == 2 and data['train_queries'] == 10


@pytest.mark.parametrize('name', TRAINERS)
def test_queries_without_a_positive_are_skipped_and_counted(env, name):
    qrels = env.qrels[env.qrels['qid'] != 'q00']
    model = trainer(name, env)
    with pytest.warns(UserWarning, match=f'{name}: skipped 1 of 10 training queries without a judged positive'):
        model.fit(env.train, qrels)
    data = model.history['training_data']
    assert data['skipped_no_positive'] == 1 and data['train_queries'] == 9


# --- bad input: duplicated (qid, docno) rows --------------------------------------------------------------------

@pytest.mark.parametrize('name', RERANKERS)
def test_duplicated_rows_are_dropped_keeping_the_best_scored(env, name):
    frame = env.res.assign(tag='kept')
    firsts = frame.groupby('qid').head(1)
    # the duplicates come first in the frame but score lower: the best-scored original must win
    frame = pd.concat([firsts.assign(score=firsts['score'] - 100, tag='worse'), frame], ignore_index=True)
    with pytest.warns(UserWarning, match=rf'{name}: dropped {len(firsts)} duplicated \(qid, docno\) rows'):
        out = transformer(name, env)(frame)
    assert len(out) == len(env.res) and not out.duplicated(['qid', 'docno']).any()
    assert (out['tag'] == 'kept').all()


@pytest.mark.parametrize('name', TRAINERS)
def test_fit_drops_duplicated_rows_and_qrels(env, name):
    train = pd.concat([env.train, env.train.head(3)], ignore_index=True)
    qrels = pd.concat([env.qrels, env.qrels.head(2).assign(label=0)], ignore_index=True)
    model = trainer(name, env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model.fit(train, qrels, train, qrels)
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f'{name}: dropped 2 duplicated (qid, docno) qrels (kept the highest label)')
               for m in messages), messages
    if name != 'Adore':       # ADORE uses only the topics of the training frame
        assert any(m.startswith(f'{name}: dropped 3 duplicated (qid, docno) rows') for m in messages), messages
    assert model.history['training_data']['train_queries'] == 10
    kept = quiet(normalise_qrels, qrels, name)
    assert len(kept) == len(env.qrels)
    assert kept.set_index(['qid', 'docno'])['label'].to_dict() == \
        env.qrels.set_index(['qid', 'docno'])['label'].to_dict()


# --- bad input: empty or NaN query text -------------------------------------------------------------------------

@pytest.mark.parametrize('name', RETRIEVERS + RERANKERS + ['Coder (retrieve)', 'Adore (retrieve)'])
def test_empty_or_nan_query_is_encoded_as_the_empty_string(env, name):
    t = transformer(name.split()[0], env)
    if name in RERANKERS:
        docs = env.res[env.res['qid'] == env.res['qid'].iloc[0]].drop(columns=['qid', 'query'])
        inp = pd.concat([docs.assign(qid=qid, query=q) for qid, q in [('a', ''), ('b', np.nan), ('c', None)]])
    else:
        inp = pd.DataFrame({'qid': ['a', 'b', 'c'], 'query': ['', np.nan, None]})
    out = t(inp)
    assert out['qid'].map(type).eq(str).all() and (out['query'] == '').all()
    per_qid = {qid: g.set_index('docno')['score'].sort_index() for qid, g in out.groupby('qid')}
    if name == 'BM25':
        assert len(out) == 0     # an empty query matches nothing
    else:
        assert set(per_qid) == {'a', 'b', 'c'}
        for qid in 'bc':
            pd.testing.assert_series_equal(per_qid[qid], per_qid['a'], atol=1e-6)


@pytest.mark.parametrize('name', TRAINERS)
def test_fit_with_empty_or_nan_queries(env, name):
    train = env.train.copy()
    train.loc[train['qid'] == 'q00', 'query'] = np.nan
    train.loc[train['qid'] == 'q01', 'query'] = ''
    model = quiet(trainer(name, env).fit, train, env.qrels, train, env.qrels)
    assert model.history['steps'] == 2 and model.history['training_data']['train_queries'] == 10
    assert all(np.isfinite(loss) for _, loss in model.history['loss'])


# --- bad input: non-string qid / docno ---------------------------------------------------------------------------

def _int_ids(frame):
    return frame.assign(qid=frame['qid'].str[1:].astype(int), docno=frame['docno'].str[1:].astype(int))


@pytest.mark.parametrize('name', RETRIEVERS + RERANKERS)
def test_int_qids_and_docnos_become_str(env, numeric, name):
    if name in RETRIEVERS:
        t, inp = transformer(name, env), pd.DataFrame({'qid': [1, 2], 'query': ['apple', 'banana']})
    elif name == 'MonoElectra':
        t, inp = transformer(name, env), _int_ids(env.res)
    else:
        t = transformer(name, env, index=numeric)
        inp = pd.DataFrame({'qid': [1, 1, 1, 2, 2], 'query': ['apple'] * 3 + ['pear'] * 2, 'docno': [0, 5, 7, 5, 999]})
    out = t(inp)
    assert len(out) and out['qid'].map(type).eq(str).all() and out['docno'].map(type).eq(str).all()
    assert set(out['qid']) == set(inp['qid'].astype(str))
    if 'docno' in inp:
        assert sorted(out['docno']) == sorted(inp['docno'].astype(str))


@pytest.mark.parametrize('name', TRAINERS)
def test_fit_with_int_qids_and_docnos(env, numeric, name):
    if name == 'MonoElectra':
        train, qrels, index = _int_ids(env.train), _int_ids(env.qrels), None
    else:
        index = numeric
        train = pd.DataFrame({'qid': [1, 2, 3], 'query': ['apple juice', 'banana', 'cherry tree']})
        qrels = pd.DataFrame({'qid': [1, 2, 3, 3], 'docno': [0, 5, 7, 8], 'label': [1, 2, 1, 1]})
    model = quiet(trainer(name, env, index=index, eval_every=1).fit, train, qrels, train, qrels)
    h = model.history
    assert h['training_data']['train_queries'] == train['qid'].nunique()
    assert h['training_data']['skipped_no_positive'] == 0 and h['training_data']['qrels_for_unknown_queries'] == 0
    assert len(h['eval']) == 3 and all(0.0 <= v <= 1.0 for _, v in h['eval'])


# --- mixed precision on CPU -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', TRAINERS)
def test_amp_on_cpu_trains_under_bf16_autocast_and_only_when_asked(env, name):
    """``amp=True`` runs the training forward passes under bf16 autocast on CPU (the AMP code path that CUDA
    takes, exercised here); the default (``amp=None``) keeps CPU training in fp32."""
    def autocast_states(**options):
        t = trainer(name, env, max_steps=2, eval_every=2, **options)
        module = t.model if name == 'MonoElectra' else t.encoder.model
        states = []
        hook = module.register_forward_pre_hook(lambda m, args: states.append(
            (m.training, torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16)))
        try:
            quiet(t.fit, env.train, env.qrels, env.train, env.qrels)
        finally:
            hook.remove()
        assert all(np.isfinite(v) for _, v in t.history['loss'])
        return t, [bf16 for training, bf16 in states if training]
    t, training_steps = autocast_states(amp=True)
    assert training_steps and all(training_steps)
    _, default_steps = autocast_states()
    assert default_steps and not any(default_steps)
    if name == 'MonoElectra':   # inference follows the same setting; scores come back as float32, near fp32's
        bf16 = scores_by(t(env.res))
        t.config = t.config.replace(amp=False)
        fp32 = scores_by(t(env.res))
        assert bf16.index.equals(fp32.index) and not np.array_equal(bf16.values, fp32.values)
        np.testing.assert_allclose(bf16.values, fp32.values, rtol=0.05, atol=0.05)


# --- reproducibility ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', TRAINERS)
def test_same_seed_same_history_other_seed_other_history(env, name):
    options = dict(max_steps=6, eval_every=2, batch_size=3)
    if name == 'Coder':
        options['random_negatives'] = 5

    def run(seed):
        h = quiet(trainer(name, env, seed=seed, **options).fit, env.train, env.qrels, env.train, env.qrels).history
        return [v for _, v in h['eval']], [v for _, v in h['loss']]
    first, again, other = run(1), run(1), run(2)
    assert len(first[0]) == 4
    assert first == again                        # identical validation metrics and losses, step by step
    assert first[1] != other[1]                  # another seed: other batches/negatives/dropout


@pytest.mark.parametrize('name', TRAINERS)
def test_a_second_fit_continues_from_the_weights_of_the_first(env, name, monkeypatch):
    """fit trains the weights the component has now (documented in training.md): the second call's first step
    starts from the first call's result, not from the base model."""
    model = trainer(name, env)
    module = model.model if name == 'MonoElectra' else model.trainable_module()

    def weights():
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    before = weights()
    quiet(model.fit, env.train, env.qrels)
    after_first = weights()
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    at_first_step, original = [], model._loss

    def record(batch):
        if not at_first_step:
            at_first_step.append(weights())
        return original(batch)
    monkeypatch.setattr(model, '_loss', record)
    quiet(model.fit, env.train, env.qrels)
    assert all(torch.equal(at_first_step[0][k], after_first[k]) for k in after_first)
    assert model.history['steps'] == FAST['max_steps']     # history describes the latest call


def test_coder_resume_with_random_negatives_matches_an_uninterrupted_run(env, tmp_path):
    """The random negatives are drawn from the loop's generator, which a checkpoint restores."""
    options = dict(max_steps=6, eval_every=2, batch_size=3, random_negatives=5, checkpoint_every=2)
    reference = trainer('Coder', env, **options).fit(env.train, env.qrels, env.train, env.qrels)
    crashing = trainer('Coder', env, checkpoint_dir=str(tmp_path), **options)
    crash_at_loss(crashing, 4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(env.train, env.qrels, env.train, env.qrels)
    resumed = trainer('Coder', env, checkpoint_dir=str(tmp_path), **options)
    resumed.fit(env.train, env.qrels, env.train, env.qrels, resume=True)
    assert resumed.history['resumed_at'] == 2
    assert resumed.history['eval'] == reference.history['eval']
    assert resumed.history['loss'] == reference.history['loss']
    np.testing.assert_array_equal(resumed(env.res)['score'], reference(env.res)['score'])


# --- Hub-style sharing -------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fitted(env):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = quiet(trainer(name, env).fit, env.train, env.qrels)
        return cache[name]
    return get


def _load_kwargs(name):
    return dict(device='cpu', verbose=False)


@pytest.mark.parametrize('name', TRAINERS)
def test_save_pretrained_from_pretrained_round_trip(env, fitted, name, tmp_path):
    model = fitted(name)
    assert model.save_pretrained(tmp_path / 'm') == tmp_path / 'm'
    loaded = type(model).from_pretrained(str(tmp_path / 'm'), **_load_kwargs(name))
    assert type(loaded) is type(model) and loaded.fitted
    pd.testing.assert_series_equal(scores_by(loaded(env.res)), scores_by(model(env.res)), atol=1e-6)


@pytest.mark.parametrize('name', TRAINERS)
def test_push_to_hub_uploads_a_folder_that_loads_back(env, fitted, name, tmp_path, monkeypatch):
    import huggingface_hub
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls['create_repo'] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls['upload_folder'] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / 'uploaded')     # the temp dir is gone after the call
        return 'commit-info'
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    model = fitted(name)
    assert model.push_to_hub('me/my-model', private=True) == 'commit-info'
    assert calls['create_repo'] == ('me/my-model', dict(private=True, exist_ok=True, repo_type='model'))
    assert calls['upload_folder'][0] == 'me/my-model'
    uploaded = tmp_path / 'uploaded'
    assert json.loads((uploaded / 'pyterrier_coder.json').read_text())['component'] == name
    assert f'{name}.from_pretrained("me/my-model"' in (uploaded / 'README.md').read_text()
    expected = scores_by(model(env.res))
    loaded = type(model).from_pretrained(uploaded, **_load_kwargs(name))
    pd.testing.assert_series_equal(scores_by(loaded(env.res)), expected, atol=1e-6)
    # a hub id is downloaded with snapshot_download (faked: it returns the uploaded folder)
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', lambda repo_id, **kw: str(uploaded))
    extra = {}
    if name != 'MonoElectra':
        # on another machine the training index path does not exist: the error says to pass index=
        conf = json.loads((uploaded / 'pyterrier_coder.json').read_text())
        conf['index'] = str(tmp_path / 'elsewhere.flex')
        (uploaded / 'pyterrier_coder.json').write_text(json.dumps(conf))
        with pytest.raises(FileNotFoundError, match='index='):
            type(model).from_pretrained('me/my-model', **_load_kwargs(name))
        extra['index'] = env.dense.flex
    from_hub = type(model).from_pretrained('me/my-model', **extra, **_load_kwargs(name))
    pd.testing.assert_series_equal(scores_by(from_hub(env.res)), expected, atol=1e-6)


@pytest.mark.parametrize('name', TRAINERS)
def test_hub_methods_without_huggingface_hub(env, name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)
    model = trainer(name, env)
    with pytest.raises(ImportError, match=f'{name}.push_to_hub needs the huggingface_hub package'):
        model.push_to_hub('me/x')
    with pytest.raises(ImportError, match=f'{name}.from_pretrained needs the huggingface_hub package'):
        type(model).from_pretrained('me/not-a-local-dir')
    with pytest.raises(FileNotFoundError):        # clearly a path: never sent to the hub
        type(model).from_pretrained(str(tmp_path / 'missing'))


# --- long inputs -------------------------------------------------------------------------------------------------

WORDS = ['apple', 'banana', 'cherry', 'grape', 'lemon', 'mango', 'melon', 'orange', 'peach', 'pear', 'plum',
         'juice', 'tree', 'market', 'sweet', 'fresh', 'farm', 'seed', 'green', 'red']


def words(n, start=0):
    return ' '.join(WORDS[(start + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope='module')
def single_token_words(env):
    for tok in (env.encoder.tokenizer, MonoElectra(str(env.electra_dir), verbose=False).tokenizer):
        assert all(len(tok.tokenize(w)) == 1 for w in WORDS)


def test_dense_encoder_truncates_long_queries_and_passages(env, single_token_words):
    enc = env.encoder                       # query_max_length 32; doc_max_length 256 > the model's 128 positions
    assert enc.doc_max_length == 256 and enc.max_model_length == 128
    long = words(5000)
    np.testing.assert_allclose(enc.encode_queries([long]), enc.encode_queries([words(30)]), atol=1e-5)
    np.testing.assert_allclose(enc.encode_docs([long]), enc.encode_docs([words(126)]), atol=1e-5)


@pytest.mark.parametrize('name', ['DenseIndex.retriever', 'DenseIndex.scorer', 'Coder', 'Adore', 'MonoElectra',
                                  'Coder (retrieve)', 'Adore (retrieve)'])
def test_a_5000_word_query_is_truncated_as_configured(env, single_token_words, name):
    t = transformer(name.split()[0], env)
    kept = 50 if name == 'MonoElectra' else env.encoder.query_max_length - 2   # query tokens kept
    if name in RERANKERS:
        docs = env.res[env.res['qid'] == env.res['qid'].iloc[0]].drop(columns=['qid', 'query'])
        inp = pd.concat([docs.assign(qid='long', query=words(5000)), docs.assign(qid='cut', query=words(kept))])
    else:
        inp = pd.DataFrame({'qid': ['long', 'cut'], 'query': [words(5000), words(kept)]})
    out = t(inp)
    long, cut = (out[out['qid'] == q].reset_index(drop=True) for q in ('long', 'cut'))
    assert len(long) and long['docno'].tolist() == cut['docno'].tolist()
    np.testing.assert_allclose(long['score'], cut['score'], atol=1e-5)
    assert np.isfinite(long['score']).all()


@pytest.mark.parametrize('name', TRAINERS)
def test_fit_with_a_5000_word_training_query(env, name):
    train = env.train.copy()
    train.loc[train['qid'] == 'q00', 'query'] = 'apple ' + words(5000)
    model = quiet(trainer(name, env).fit, train, env.qrels)
    assert model.history['steps'] == 2 and all(np.isfinite(loss) for _, loss in model.history['loss'])


def test_tokenize_truncated_matches_plain_truncation(env):
    tok = MonoElectra(str(env.electra_dir), verbose=False).tokenizer
    texts = [words(3000), 'apple' + ' ' * 3000 + words(50), 'x' * 5000, 'apple ' + 'y' * 3000 + ' ' + words(300),
             words(5), '', words(40, 3) + '\n\n' * 500 + words(400)]
    for max_length in (16, 64):
        expected = tok(texts, truncation=True, max_length=max_length)['input_ids']
        assert tokenize_truncated(tok, texts, max_length=max_length)['input_ids'] == expected
        queries = ['apple juice'] * len(texts)
        expected = tok(queries, texts, truncation='only_second', max_length=max_length)
        got = tokenize_truncated(tok, queries, texts, max_length=max_length)
        assert got['input_ids'] == expected['input_ids'] and got['token_type_ids'] == expected['token_type_ids']


def test_monoelectra_scores_1000_candidates_of_10k_tokens(env):
    model = MonoElectra(str(env.electra_dir), verbose=False, max_length=64, batch_size=250)
    body = words(10_000)
    frame = pd.DataFrame({'qid': 'q', 'query': 'apple juice', 'docno': [f'd{i}' for i in range(1000)],
                          'text': [f'{words(3, i)} {words(2, i // 20)} {body}' for i in range(1000)]})
    out = model(frame)
    assert len(out) == 1000 and out['rank'].tolist() == list(range(1000)) and np.isfinite(out['score']).all()
    # the same scores as tokenising the full 10k-token passages and truncating them
    from transformers import AutoModelForSequenceClassification
    net = AutoModelForSequenceClassification.from_pretrained(env.electra_dir).eval()
    sample = out.iloc[[0, 500, 999]]
    enc = model.tokenizer(sample['query'].tolist(), sample['text'].tolist(), truncation='only_second', max_length=64,
                          padding=True, return_tensors='pt')
    with torch.no_grad():
        direct = net(**enc).logits[:, 0].numpy()
    np.testing.assert_allclose(sample['score'].values, direct, atol=1e-5)


def test_monoelectra_max_length_beyond_the_model_truncates(env):
    with pytest.warns(UserWarning, match='more than'):
        model = MonoElectra(str(env.electra_dir), verbose=False, max_length=5000)      # 256 positions
    frame = pd.DataFrame({'qid': 'q', 'query': 'apple', 'docno': ['a'], 'text': [words(3000)]})
    assert np.isfinite(model(frame)['score']).all()


def test_coder_scores_and_trains_on_1000_candidates_of_one_query(env, numeric):
    coder = Coder(numeric, env.encoder, temperature=0.5, num_candidates=1000, **FAST)
    frame = pd.DataFrame({'qid': 'q', 'query': 'apple juice', 'docno': [str(i) for i in range(1000)],
                          'score': np.arange(1000, 0, -1, dtype=float)})
    out = coder(frame)
    assert len(out) == 1000 and out['rank'].tolist() == list(range(1000))
    q = env.encoder.encode_queries(['apple juice'])[0]
    vecs = np.asarray(numeric.flex.np_vecs())[EmbeddingStore(numeric.flex).ids(out['docno'])]
    np.testing.assert_allclose(out['score'], vecs @ q, atol=1e-5)
    qrels = pd.DataFrame({'qid': ['q'], 'docno': ['3'], 'label': [1]})
    coder.fit(frame, qrels, frame, qrels)
    assert coder.history['training_data']['train_queries'] == 1 and coder.history['steps'] == 2


@pytest.mark.parametrize('name', ['Coder', 'Adore'])
def test_saved_index_path_is_absolute(env, name, tmp_path, monkeypatch):
    """A model trained on an index given by a relative path loads from any working directory."""
    import os
    monkeypatch.chdir(env.dense.flex.index_path.parent)
    relative = DenseIndex(env.encoder, env.dense.flex.index_path.name, verbose=False)
    model = trainer(name, env, index=relative)
    model.save(tmp_path / 'model')
    saved = json.loads((tmp_path / 'model' / 'pyterrier_coder.json').read_text())['index']
    assert os.path.isabs(saved)
    monkeypatch.chdir(tmp_path)
    loaded = type(model).load(tmp_path / 'model', device='cpu')
    assert str(loaded.flex.index_path) == saved
