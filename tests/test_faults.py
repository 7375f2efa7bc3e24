"""Faults a user meets with real files and processes: concurrent builders of one index, an index reused with
another corpus or encoder, inference in several threads, a crafted checkpoint, a training run that fails half-way,
files cut short or undecodable. Each case fails on a package that silently does the wrong thing."""
import json
import multiprocessing
import os
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pyterrier_coder.adore import Adore
from pyterrier_coder.coder import Coder
from pyterrier_coder.datasets import DatasetError, load_dataset
from pyterrier_coder.electra import MonoElectra
from pyterrier_coder.encoders import DenseEncoder, DenseIndex, flex_problem
from pyterrier_coder.fusion import Interpolate
from pyterrier_coder.retrievers import BM25
from pyterrier_coder.star import Star
from pyterrier_coder.tasb import TasBalanced

from conftest import crash_at_loss

FAST = dict(lr=1e-3, warmup=0, schedule='constant', batch_size=4, eval_every=None, max_steps=2, device='cpu',
            verbose=False)

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def env(tiny_bert_dir, tiny_cross_encoder_dir, tiny_collection, tmp_path_factory):
    ds = load_dataset(tiny_collection)
    root = tmp_path_factory.mktemp('faults')
    encoder = DenseEncoder(str(tiny_bert_dir), pooling='mean', normalize=True, device='cpu')
    dense = DenseIndex(encoder, root / 'dense.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    bm25 = BM25(root / 'bm25', text=True).index(ds.get_corpus_iter(verbose=False), verbose=False)
    return SimpleNamespace(ds=ds, root=root, encoder=encoder, dense=dense, bm25=bm25, bert_dir=tiny_bert_dir,
                           electra_dir=tiny_cross_encoder_dir, corpus=list(ds.get_corpus_iter(verbose=False)))


# ---------------------------------------------------------------------------------------------------------
# indexes: concurrent builders, identity of what built them

def _index_in_child(bert_dir, corpus_file, path, start_file):
    """Builds a DenseIndex at ``path`` once ``start_file`` exists (so two children start together)."""
    import time
    import torch
    from pyterrier_coder.encoders import DenseEncoder, DenseIndex
    torch.set_num_threads(1)
    corpus = json.loads(Path(corpus_file).read_text())
    encoder = DenseEncoder(bert_dir, pooling='mean', normalize=True, device='cpu')
    while not Path(start_file).exists():
        time.sleep(0.01)
    DenseIndex(encoder, path, verbose=False).index(corpus, batch_size=16)


def test_two_processes_indexing_one_path_leave_one_complete_index(env, tmp_path):
    corpus = [{'docno': f'x{i:04d}', 'text': env.corpus[i % len(env.corpus)]['text'] + f' number{i}'}
              for i in range(600)]
    corpus_file = tmp_path / 'corpus.json'
    corpus_file.write_text(json.dumps(corpus))
    path, start = tmp_path / 'shared.flex', tmp_path / 'start'
    context = multiprocessing.get_context('spawn')
    children = [context.Process(target=_index_in_child, args=(str(env.bert_dir), str(corpus_file), str(path),
                                                               str(start))) for _ in range(2)]
    for child in children:
        child.start()
    start.touch()
    for child in children:
        child.join(300)
        assert child.exitcode == 0
    dense = DenseIndex(env.encoder, path, verbose=False)
    assert flex_problem(dense.flex) is None
    assert len(dense.flex) == 600
    assert dense.record()['corpus']['documents'] == 600
    vecs = dense.flex.payload(return_docnos=False)[0]
    np.testing.assert_allclose(vecs[:5], env.encoder.encode_docs([d['text'] for d in corpus[:5]]), atol=1e-5)
    assert not list(tmp_path.glob('.shared.flex.building-*'))     # no private build directory left behind


def test_an_inconsistent_index_is_never_taken_as_built(env, tmp_path):
    path = tmp_path / 'cut.flex'
    shutil.copytree(env.dense.flex.index_path, path)
    with open(path / 'vecs.f4', 'r+b') as f:        # a copy cut short, as a second writer left it
        f.truncate(os.path.getsize(path / 'vecs.f4') // 2)
    dense = DenseIndex(env.encoder, path, verbose=False)
    assert not dense.built() and 'vecs.f4 holds' in flex_problem(dense.flex)
    with pytest.raises(RuntimeError, match=r'cannot be used: pt_meta.json says 96 documents .* vecs.f4 holds 48 rows'):
        dense.retriever(5)(env.ds.get_topics('test'))
    with pytest.raises(ValueError, match='cannot be used: pt_meta.json says'):
        Coder(path, env.encoder, verbose=False)
    dense.index(env.corpus)                           # rebuilt, not skipped
    assert dense.built() and len(dense.retriever(5)(env.ds.get_topics('test'))) > 0


def test_a_dense_index_refuses_another_corpus_or_encoder(env, tmp_path):
    dense = DenseIndex(env.encoder, env.dense.flex.index_path, verbose=False)
    assert dense.index(env.corpus) is dense                       # the same corpus and encoder: reused
    other_corpus = env.corpus[:-1]
    with pytest.raises(ValueError, match=r'was built from a corpus of 96 documents .* not from the one given '
                                         r'\(a corpus of 95 documents'):
        dense.index(other_corpus)
    changed = [dict(d) for d in env.corpus]
    changed[40]['text'] += ' changed'
    with pytest.raises(ValueError, match='was built from a corpus of 96 documents'):
        dense.index(changed)
    other = DenseEncoder(str(env.bert_dir), pooling='cls', normalize=True, device='cpu')   # same size, other vectors
    with pytest.raises(ValueError, match='was built by another encoder'):
        DenseIndex(other, env.dense.flex.index_path, verbose=False).index(env.corpus)
    fine_tuned = env.encoder.clone()
    with torch.no_grad():
        for p in fine_tuned.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(ValueError, match='was built by another encoder'):
        DenseIndex(fine_tuned, env.dense.flex.index_path, verbose=False).index(env.corpus)
    copy = tmp_path / 'copy.flex'
    shutil.copytree(env.dense.flex.index_path, copy)
    DenseIndex(other, copy, verbose=False).index(env.corpus, overwrite=True)    # what overwrite is for
    assert DenseIndex(other, copy, verbose=False).index(env.corpus).built()


def test_bm25_refuses_another_corpus(env, tmp_path):
    path = tmp_path / 'bm25'
    BM25(path).index(env.corpus, verbose=False)
    assert BM25(path).index(env.corpus, verbose=False).built()
    with pytest.raises(ValueError, match=r'was built from a corpus of 96 documents .* \(a corpus of 95 documents'):
        BM25(path).index(env.corpus[1:], verbose=False)
    other = tmp_path / 'other'
    shutil.copytree(env.ds.path, other)
    lines = (other / 'corpus.jsonl').read_text().splitlines()
    (other / 'corpus.jsonl').write_text('\n'.join(lines[:-3]) + '\n')
    with pytest.raises(ValueError, match='was built from a corpus of 96 documents'):
        BM25.from_dataset(load_dataset(other), path, verbose=False)
    assert BM25.from_dataset(env.ds, path, verbose=False).num_docs() == 96
    BM25(path).index(env.corpus[1:], overwrite=True, verbose=False)
    assert BM25(path).num_docs() == 95


def test_a_failed_rebuild_leaves_the_old_index(env, tmp_path):
    for build in (lambda p, c, **k: BM25(p).index(c, verbose=False, **k),
                  lambda p, c, **k: DenseIndex(env.encoder, p, verbose=False).index(c, **k)):
        path = tmp_path / f'index{build.__code__.co_firstlineno}'
        build(path, env.corpus)
        before = sorted((f.name, f.stat().st_size) for f in path.rglob('*'))

        def broken():
            yield from env.corpus[:50]
            raise OSError('disk went away')
        with pytest.raises(OSError, match='disk went away'):
            build(path, broken(), overwrite=True)
        assert sorted((f.name, f.stat().st_size) for f in path.rglob('*')) == before
        assert not list(tmp_path.glob(f'.{path.name}.building-*'))


def test_coder_load_refuses_an_index_built_by_another_encoder(env, tmp_path):
    coder = Coder(env.dense, env.encoder, num_candidates=10, **FAST)
    coder.save(tmp_path / 'coder')
    other = DenseEncoder(str(env.bert_dir), pooling='cls', normalize=True, device='cpu')
    other_index = DenseIndex(other, tmp_path / 'other.flex', verbose=False).index(env.corpus)
    with pytest.raises(ValueError, match=r'Coder.load: .* was trained over an index built by another encoder'):
        Coder.load(tmp_path / 'coder', index=other_index)
    reduced = DenseIndex(env.encoder, tmp_path / 'reduced.flex', verbose=False).index(env.corpus[:-1])
    with pytest.raises(ValueError, match=r'Coder.load: .* was trained over an index of another corpus'):
        Coder.load(tmp_path / 'coder', index=reduced)
    copy = tmp_path / 'copy.flex'                     # a copy of its own index (moved, another machine): fine
    shutil.copytree(env.dense.flex.index_path, copy)
    assert Coder.load(tmp_path / 'coder', index=copy).flex.index_path == copy


# ---------------------------------------------------------------------------------------------------------
# inference: never changes a model's mode, the same results from several threads

def _components(env):
    coder = Coder(env.dense, env.encoder, num_results=5, verbose=False, device='cpu')
    adore = Adore(env.dense, env.encoder, num_results=5, verbose=False, device='cpu')
    electra = MonoElectra(str(env.electra_dir), verbose=False, max_length=64)
    # the trainers of both towers serve from the index they encode (here: the untrained towers' index)
    star = Star(env.encoder, env.root / 'star.flex', corpus=env.ds, num_results=5, verbose=False, device='cpu')
    star.index()
    tasb = TasBalanced(env.encoder, env.root / 'tasb.flex', corpus=env.ds, in_batch_teacher=env.encoder,
                       supervision='in-batch', num_results=5, verbose=False, device='cpu')
    tasb.index()
    text = env.bm25 % 8
    return {'Star': (text >> star, star.encoder.model), 'Star.retriever': (star.retriever(8), star.encoder.model),
            'TasBalanced': (text >> tasb, tasb.encoder.model),'BM25': (env.bm25 % 8, None), 'DenseIndex.retriever': (env.dense.retriever(8), None),
            'DenseIndex.scorer': (text >> env.dense.scorer(), env.encoder.model),
            'Coder': (text >> coder, coder.encoder.model), 'Coder.retriever': (coder.retriever(8), coder.encoder.model),
            'Adore': (text >> adore, adore.encoder.model), 'MonoElectra': (text >> electra, electra.model),
            'Interpolate': (text >> Interpolate(electra, alpha=0.5), electra.model)}


def test_transform_in_several_threads_gives_identical_results_and_leaves_eval_mode(env):
    topics = env.ds.get_topics('train')
    for name, (pipeline, model) in _components(env).items():
        expected = pipeline(topics)
        if model is not None:
            assert not model.training, name
        results, errors = [], []

        def run():
            try:
                for _ in range(3):
                    results.append(pipeline(topics))
            except Exception as error:      # noqa: BLE001 -- reported below
                errors.append(error)
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, (name, errors)
        for result in results:
            pd.testing.assert_frame_equal(result, expected, check_exact=True, obj=name)
        if model is not None:
            assert not model.training, name


def test_reranking_with_coder_keeps_the_encoder_deterministic(env):
    coder = Coder(env.dense, env.encoder, verbose=False, device='cpu', scorer='transformer')
    (env.bm25 % 8 >> coder)(env.ds.get_topics('dev'))
    assert not coder.encoder.model.training and not coder.head.training
    queries = ['apple juice', 'ripe pear']
    with torch.no_grad():
        first = coder.encoder.encode_queries_torch(queries)
        second = coder.encoder.encode_queries_torch(queries)
    assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------------------
# checkpoints: never executed, never overwritten silently

class _RunsCode:
    """Pickled, it calls ``Path.touch`` on a marker file when unpickled: what a crafted checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _train_data(env):
    res = (env.bm25 % 10)(env.ds.get_topics('train'))
    return res, env.ds.get_qrels('train')


def test_a_checkpoint_carrying_code_is_refused_not_run(env, tmp_path):
    res, qrels = _train_data(env)
    options = dict(FAST, max_steps=4, checkpoint_every=2)
    Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path / 'c'), **options).fit(res, qrels)
    checkpoint = tmp_path / 'c' / 'checkpoint.pt'
    payload = torch.load(checkpoint, weights_only=True)    # what the package writes loads with weights_only
    assert payload['format'] == 2
    marker = tmp_path / 'ran'
    payload['trap'] = _RunsCode(marker)
    torch.save(payload, checkpoint)
    with pytest.raises(ValueError, match=r'refused to load .*checkpoint.pt.*which loading would execute'):
        Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path / 'c'), **options).fit(
            res, qrels, resume=True)
    assert not marker.exists()
    coder = Coder(env.dense, env.encoder, scorer='transformer', **FAST)      # the optional head's weights file
    coder.save(tmp_path / 'model')
    head = torch.load(tmp_path / 'model' / 'head.pt', weights_only=True)
    torch.save({**head, 'trap': _RunsCode(marker)}, tmp_path / 'model' / 'head.pt')
    with pytest.raises(ValueError, match=r'refused to load .*head.pt'):
        Coder.load(tmp_path / 'model', index=env.dense)
    assert not marker.exists()


def test_a_truncated_checkpoint_names_the_file(env, tmp_path):
    res, qrels = _train_data(env)
    options = dict(FAST, max_steps=2, checkpoint_every=2)
    Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path), **options).fit(res, qrels)
    checkpoint = tmp_path / 'checkpoint.pt'
    with open(checkpoint, 'r+b') as f:
        f.truncate(checkpoint.stat().st_size // 3)
    with pytest.raises(ValueError, match=r'checkpoint.pt.* is not a readable checkpoint .*delete it'):
        Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path), **options).fit(
            res, qrels, resume=True)


def test_fit_without_resume_never_overwrites_a_checkpoint(env, tmp_path):
    res, qrels = _train_data(env)
    options = dict(FAST, max_steps=6, checkpoint_every=2)
    crashing = Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path), **options)
    crash_at_loss(crashing, 4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit(res, qrels)
    saved = (tmp_path / 'checkpoint.pt').read_bytes()
    again = Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path), **options)
    with pytest.raises(ValueError, match=r'holds the checkpoint of an interrupted run \(step 2 of 6\); '
                                         r'fit\(..., resume=True\) continues it. To start afresh, delete'):
        again.fit(res, qrels)
    assert (tmp_path / 'checkpoint.pt').read_bytes() == saved
    again.fit(res, qrels, resume=True)
    with pytest.raises(ValueError, match=r'holds the checkpoint of a finished run \(6 steps\)'):
        Coder(env.dense, env.encoder, num_candidates=10, checkpoint_dir=str(tmp_path), **options).fit(res, qrels)


# ---------------------------------------------------------------------------------------------------------
# files: what cannot be read is named, with what to do

def test_a_model_directory_without_tokenizer_files_is_refused(env, tmp_path):
    weights_only = tmp_path / 'weights'
    shutil.copytree(env.bert_dir, weights_only)
    for name in ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt', 'special_tokens_map.json'):
        (weights_only / name).unlink(missing_ok=True)
    with pytest.raises(OSError, match=r'DenseEncoder: no tokenizer files in .*weights.*pass tokenizer='):
        DenseEncoder(str(weights_only), device='cpu')
    encoder = DenseEncoder(str(weights_only), tokenizer=str(env.bert_dir), pooling='mean', normalize=True,
                           device='cpu')
    np.testing.assert_allclose(encoder.encode_docs(['apple juice']), env.encoder.encode_docs(['apple juice']))


def _drhard_checkpoint(path, vocab_size=400, hidden=32, out=24):
    """A tiny random checkpoint in DRhard's layout (STAR/ADORE ``RobertaDot``): the RoBERTa body under
    ``roberta.*``, then ``embeddingHead`` (Linear) and ``norm`` (LayerNorm) over the CLS vector; no tokenizer."""
    from transformers import RobertaConfig, RobertaModel
    config = RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=130)
    torch.manual_seed(1)
    body = RobertaModel(config, add_pooling_layer=False).eval()
    weights = {f'roberta.{k}': v for k, v in body.state_dict().items()}
    weights.update({'embeddingHead.weight': torch.randn(out, hidden) * 0.2, 'embeddingHead.bias': torch.randn(out),
                    'norm.weight': torch.rand(out) + 0.5, 'norm.bias': torch.randn(out) * 0.1})
    path.mkdir()
    config.architectures = ['RobertaDot_NLL_LN']
    config.save_pretrained(path)
    torch.save(weights, path / 'pytorch_model.bin')
    return body, weights


def test_a_drhard_checkpoint_encodes_as_its_architecture(env, tmp_path):
    """DRhard's STAR/ADORE layout is recognised: CLS pooling, then the Linear head, then the LayerNorm, no
    normalisation (a directory without a tokenizer takes one as an argument)."""
    body, weights = _drhard_checkpoint(tmp_path / 'drhard')
    with pytest.raises(OSError, match='no tokenizer files'):
        DenseEncoder(str(tmp_path / 'drhard'), device='cpu')
    encoder = DenseEncoder(str(tmp_path / 'drhard'), tokenizer=str(env.bert_dir), device='cpu')
    assert (encoder.pooling, encoder.normalize, encoder.dim) == ('cls', False, 24)
    texts = ['apple juice is sweet', 'pear market']
    batch = encoder.tokenizer(texts, padding=True, return_tensors='pt')
    with torch.no_grad():
        cls = body(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).last_hidden_state[:, 0]
        expected = torch.nn.functional.layer_norm(cls @ weights['embeddingHead.weight'].T + weights['embeddingHead.bias'],
                                                  (24,), weights['norm.weight'], weights['norm.bias'])
    np.testing.assert_allclose(encoder.encode_docs(texts), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(encoder.encode_queries(texts), expected.numpy(), atol=1e-5)
    encoder.save(tmp_path / 'saved')                          # saved with its projection, loaded back the same
    again = DenseEncoder(str(tmp_path / 'saved'), device='cpu')
    np.testing.assert_allclose(again.encode_docs(texts), expected.numpy(), atol=1e-5)
    # ADORE trains the projection with the body (the query encoder's last layers are DRhard's head)
    corpus = [{'docno': d['docno'], 'text': d['text']} for d in env.corpus]
    index = DenseIndex(encoder, tmp_path / 'drhard.flex', verbose=False).index(corpus)
    adore = Adore(index, encoder, k=10, **{**FAST, 'max_steps': 3})
    before = adore.encoder.projection.linear.weight.detach().clone()
    adore.fit(env.ds.get_topics('train'), env.ds.get_qrels('train'))
    assert not torch.equal(adore.encoder.projection.linear.weight, before)


def test_a_checkpoint_of_another_architecture_is_refused(env, tmp_path):
    """A BERT checkpoint under a RoBERTa config: loading it would compute with random or missing layers."""
    from transformers import BertConfig, BertModel, RobertaConfig
    config = RobertaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=130)
    wrong = tmp_path / 'wrong'
    wrong.mkdir()
    config.save_pretrained(wrong)
    bert = BertModel(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64))
    torch.save({f'bert.{k}': v for k, v in bert.state_dict().items()}, wrong / 'pytorch_model.bin')
    with pytest.raises(ValueError, match=r'does not fit its architecture .*weights the model needs are not in the '
                                         r'checkpoint'):
        DenseEncoder(str(wrong), tokenizer=str(env.bert_dir), device='cpu')
    with pytest.raises(ValueError, match=r'MonoElectra: the checkpoint .*wrong.* does not fit'):
        MonoElectra(str(wrong), tokenizer=str(env.bert_dir), verbose=False)
    half = tmp_path / 'half'                  # part of DRhard's head only: not its layout, an unexpected weight
    _drhard_checkpoint(half)
    weights = torch.load(half / 'pytorch_model.bin', weights_only=True)
    del weights['norm.weight'], weights['norm.bias']
    torch.save(weights, half / 'pytorch_model.bin')
    with pytest.raises(ValueError, match=r"weights of the checkpoint do not belong .*embeddingHead"):
        DenseEncoder(str(half), tokenizer=str(env.bert_dir), device='cpu')


def test_unreadable_saved_files_name_the_file(env, tmp_path):
    env.encoder.save(tmp_path / 'enc')
    config = tmp_path / 'enc' / 'pyterrier_coder.json'
    config.write_text(config.read_text()[:20])
    with pytest.raises(ValueError, match=r"pyterrier_coder.json' is not a readable saved model's settings file"):
        DenseEncoder(str(tmp_path / 'enc'))
    with pytest.raises(ValueError, match=r"pyterrier_coder.json' is not a readable"):
        DenseEncoder.load(tmp_path / 'enc')
    env.encoder.save(tmp_path / 'enc2')
    weights = tmp_path / 'enc2' / 'model.safetensors'
    with open(weights, 'r+b') as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(OSError, match=r'DenseEncoder: could not read the model in .*enc2.*cut short'):
        DenseEncoder(str(tmp_path / 'enc2'))


def test_a_failed_save_leaves_the_saved_model(env, tmp_path, monkeypatch):
    coder = Coder(env.dense, env.encoder, **FAST)
    coder.save(tmp_path / 'model')
    before = sorted((str(f.relative_to(tmp_path)), f.read_bytes()) for f in (tmp_path / 'model').rglob('*')
                    if f.is_file())

    def full_disk(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(type(env.encoder.model), 'save_pretrained', full_disk)
    with pytest.raises(OSError, match=r"Coder.save: could not write .*model.* \(No space left on device\); what was "
                                      r"there is unchanged"):
        coder.save(tmp_path / 'model')
    after = sorted((str(f.relative_to(tmp_path)), f.read_bytes()) for f in (tmp_path / 'model').rglob('*')
                   if f.is_file())
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ['model']
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('my own file')
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match='holds other files than a saved model'):
        coder.save(tmp_path / 'mine')
    assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'my own file'


def test_a_non_utf8_byte_names_the_file_and_line(env, tmp_path):
    root = tmp_path / 'ds'
    shutil.copytree(env.ds.path, root)
    for relative, line in (('corpus.jsonl', 7), ('topics/train.tsv', 3), ('qrels/train.txt', 5)):
        file = root / relative
        original = file.read_bytes()
        lines = original.split(b'\n')
        lines[line - 1] = lines[line - 1][:4] + b'\xff' + lines[line - 1][4:]
        file.write_bytes(b'\n'.join(lines))
        ds = load_dataset(root)
        read = {'corpus.jsonl': lambda: list(ds.get_corpus_iter(verbose=False)),
                'topics/train.tsv': lambda: ds.get_topics('train'), 'qrels/train.txt': lambda: ds.get_qrels('train')}
        with pytest.raises(DatasetError, match=rf'{relative}:{line}: not valid UTF-8 \(byte 0xff at column 5\)'):
            read[relative]()
        file.write_bytes(original)


def test_nul_characters_in_bm25_queries_and_documents(env, tmp_path):
    corpus = [dict(d) for d in env.corpus]
    corpus[3]['text'] = 'apple\x00juice ' + corpus[3]['text']
    bm25 = BM25(tmp_path / 'bm25', text=True).index(corpus, verbose=False)
    assert bm25.text_loader()(pd.DataFrame({'docno': [corpus[3]['docno']]}))['text'][0] == corpus[3]['text']
    topics = pd.DataFrame({'qid': ['1', '2'], 'query': ['apple\x00juice', 'apple juice']})
    res = bm25(topics)
    first, second = (res[res['qid'] == q] for q in ('1', '2'))
    assert first['docno'].tolist() == second['docno'].tolist() and len(first) > 0
    assert (first['query'] == 'apple\x00juice').all()


# ---------------------------------------------------------------------------------------------------------
# the runner: never loses a trained model, never reuses an index or model of another collection

def test_runner_refuses_bad_values_before_anything_runs():
    from pyterrier_coder.experiment import FULL, apply_overrides, parse_overrides
    for bad, match in [(["coder.label_weights={2: 'x'}"], 'label_weights must be a dict'),
                       (['coder.label_weights={2: -1}'], 'label_weights must be a dict'),
                       (['coder.lr=1e308'], 'lr must be <= 1'), (['coder.lr=nan'], 'coder.lr must be a number'),
                       (['adore.lr=inf'], 'lr must be a number'), (['rerank_depth=0'], 'rerank_depth must be >= 1'),
                       (['rerank_depth=-1'], 'rerank_depth must be >= 1'),
                       (['electra_dev_depth=0'], 'electra_dev_depth must be >= 1'),
                       (['train_queries=0'], 'train_queries must be >= 1 or None'),
                       (['coder.grad_clip=inf'], 'grad_clip must be')]:
        with pytest.raises(ValueError, match=match):
            apply_overrides(FULL, parse_overrides(bad))
    with pytest.raises(ValueError, match='lr must be a finite number'):
        Coder.__init__.__globals__['TrainingConfig'](lr=float('inf')).check()


@pytest.fixture(scope='module')
def tiny_run(tiny_collection, tiny_bert_dir, tiny_cross_encoder_dir, tmp_path_factory):
    """The runner with --quick on the tiny collection and models: (output directory, its arguments)."""
    import contextlib
    import io
    from pyterrier_coder.cli import main
    out = tmp_path_factory.mktemp('tiny_run') / 'out'
    args = ['experiment', '--dataset', str(tiny_collection), '--quick', '--device', 'cpu', '--base',
            str(tiny_bert_dir), '--cross-encoder', str(tiny_cross_encoder_dir), '--components', 'bm25,dense,coder']
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main(args + ['--out', str(out)]) == 0, stdout.getvalue()[-3000:]
    return out, args


def _run(args, out):
    import contextlib
    import io
    from pyterrier_coder.cli import main
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = main(args + ['--out', str(out)])
    return code, stdout.getvalue()


def test_a_failed_retraining_keeps_the_trained_model(tiny_run, tmp_path, monkeypatch):
    out, args = tiny_run
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    model = copy / 'models' / 'coder'
    before = sorted((str(f.relative_to(model)), f.read_bytes()) for f in model.rglob('*') if f.is_file())

    def nan_loss(self, *args, **kwargs):
        raise FloatingPointError('loss became nan')
    monkeypatch.setattr(Coder, 'fit', nan_loss)
    with pytest.raises(FloatingPointError):
        _run(args + ['--retrain'], copy)
    after = sorted((str(f.relative_to(model)), f.read_bytes()) for f in model.rglob('*') if f.is_file())
    assert after == before
    assert not [p for p in (copy / 'models').iterdir() if p.name.startswith('.')]
    monkeypatch.undo()
    code, log = _run(args + ['--set', 'coder.max_steps=3'], copy)      # a retraining that succeeds replaces it
    assert code == 0 and 'retraining coder: its settings changed (settings)' in log
    assert json.loads((model / 'experiment_spec.json').read_text())['settings']['max_steps'] == 3


def test_runner_rebuilds_indexes_and_retrains_for_another_collection(tiny_run, tiny_collection, tmp_path):
    """The same --out with another --dataset: the indexes are rebuilt and the models retrained, never reused."""
    out, args = tiny_run
    copy = tmp_path / 'out'
    shutil.copytree(out, copy)
    other = tmp_path / 'other'
    shutil.copytree(tiny_collection, other)
    lines = (other / 'corpus.jsonl').read_text().splitlines()
    (other / 'corpus.jsonl').write_text('\n'.join(lines[:-5]) + '\n')     # five documents fewer
    dataset_arg = args.index('--dataset') + 1
    code, log = _run(args[:dataset_arg] + [str(other)] + args[dataset_arg + 1:], copy)
    assert code == 0, log[-3000:]
    assert 'rebuilding the BM25 index' in log and 'rebuilding the dense index' in log
    assert 'reusing trained' not in log and 'reusing the test run' not in log
    assert BM25(copy / 'indexes' / 'bm25').num_docs() == len(lines) - 5
    assert len(DenseIndex(env_encoder_for(args), copy / 'indexes' / 'dense.flex')) == len(lines) - 5
    code, log = _run(args, copy)                     # and back: the original collection rebuilds them again
    assert code == 0 and 'rebuilding the BM25 index' in log and 'reusing trained' not in log


def env_encoder_for(args):
    return DenseEncoder(args[args.index('--base') + 1], device='cpu')


def test_released_plain_hugging_face_directories_load_with_default_settings(env, tmp_path):
    """from_pretrained/load of a directory this package did not write (a released query encoder, cross-encoder or
    bi-encoder checkpoint): the component with its defaults, where a bare constructor would work too."""
    from pyterrier_coder import Star
    texts = ['apple juice', 'pear market']
    coder = Coder.from_pretrained(str(env.bert_dir), index=env.dense, pooling='mean', normalize=True, device='cpu',
                                  verbose=False)
    np.testing.assert_allclose(coder.encoder.encode_queries(texts), env.encoder.encode_queries(texts), atol=1e-6)
    assert coder.loss == 'listnet' and not coder.fitted
    with pytest.raises(ValueError, match='plain Hugging Face model directory .*pass index='):
        Adore.load(env.bert_dir)
    electra = MonoElectra.from_pretrained(str(env.electra_dir), verbose=False, max_length=64)
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['apple'] * 2, 'docno': ['a', 'b'], 'text': texts})
    np.testing.assert_allclose(electra(frame)['score'],
                               MonoElectra(str(env.electra_dir), verbose=False, max_length=64)(frame)['score'])
    star = Star.load(env.bert_dir, index_path=tmp_path / 'star.flex', pooling='mean', normalize=True,
                     corpus=env.corpus, device='cpu', verbose=False)
    assert star.encoder.pooling == 'mean' and not star.fitted
    with pytest.raises(ValueError, match='pass index_path='):
        Star.load(env.bert_dir)


def test_candidates_mined_against_another_corpus_of_the_same_size_are_refused(env, tmp_path):
    from pyterrier_coder.candidates import mine_candidates
    from pyterrier_coder.embeddings import EmbeddingStore
    res = (env.bm25 % 10)(env.ds.get_topics('train'))
    candidates = mine_candidates(res, env.ds.get_qrels('train'), EmbeddingStore(env.dense.flex))
    shuffled = env.corpus[1:] + env.corpus[:1]            # the same documents in another order: other row ids
    other = DenseIndex(env.encoder, tmp_path / 'other.flex', verbose=False).index(shuffled)
    with pytest.raises(ValueError, match='mined against an index of another corpus'):
        Coder(other, env.encoder, **FAST).fit_candidates(candidates)
    copy = tmp_path / 'copy.flex'                          # a copy of the same index: fine
    shutil.copytree(env.dense.flex.index_path, copy)
    assert Coder(copy, env.encoder, **FAST).fit_candidates(candidates).fitted
    bad = tmp_path / 'bad'
    candidates.save(bad)
    (bad / 'meta.json').write_text('{"format": ')
    with pytest.raises(ValueError, match="meta.json' is not a readable candidate set description"):
        Coder(env.dense, env.encoder, **FAST).fit_candidates(bad)
