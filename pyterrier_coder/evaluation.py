"""One evaluation measure over a result frame, as validation during training computes it."""
from __future__ import annotations

import pandas as pd


def evaluate(results: pd.DataFrame, qrels: pd.DataFrame, metric: str, qids) -> float:
    """Mean of ``metric`` (an ir_measures name such as ``nDCG@10``) over the evaluated topics ``qids`` that have
    qrels; a topic without results counts as 0. Qrels of other queries are ignored (they belong to topics that
    were not evaluated, e.g. the rest of a split when validating on a sample)."""
    import ir_measures
    measure = ir_measures.parse_measure(metric)
    qids = set(map(str, qids))
    qrels = qrels[qrels['qid'].astype(str).isin(qids)]
    qrels = qrels.assign(qid=qrels['qid'].astype(str), docno=qrels['docno'].astype(str))
    qrels = qrels.rename(columns={'qid': 'query_id', 'docno': 'doc_id', 'label': 'relevance'})
    run = results[['qid', 'docno', 'score']].rename(columns={'qid': 'query_id', 'docno': 'doc_id'})
    run = run.assign(query_id=run['query_id'].astype(str), doc_id=run['doc_id'].astype(str))
    per_query = {m.query_id: m.value for m in measure.iter_calc(qrels, run)}
    n = qrels['query_id'].nunique()
    return float(sum(per_query.values()) / n) if n else 0.0
