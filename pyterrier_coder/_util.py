"""Small helpers shared by every component: device choice, component directories, evaluation."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

CONFIG_FILE = 'pyterrier_coder.json'


def infer_device(device=None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(device)


def write_component_config(path, component: str, settings: dict, **extra) -> None:
    """Writes the json that tells which component a directory holds (checked again by ``load``)."""
    from ._version import __version__
    atomic_write_text(Path(path) / CONFIG_FILE, json.dumps(
        {'component': component, 'version': __version__, 'settings': settings, **extra}, indent=2, default=str))


def read_component_config(path, component: str) -> dict:
    check_component_dir(path, component)
    with open(Path(path) / CONFIG_FILE) as f:
        return json.load(f)


def check_component_dir(path, component: str) -> None:
    """Fails clearly when ``path`` is missing or was written by another component type."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'{component}: no saved model directory at {str(path)!r}')
    conf_path = path / CONFIG_FILE
    if not conf_path.is_file():
        raise ValueError(f'{component}: {str(path)!r} was not written by pyterrier-coder (no {CONFIG_FILE})')
    with open(conf_path) as f:
        found = json.load(f).get('component')
    if found != component:
        raise ValueError(f'{component}: {str(path)!r} holds a saved {found}, not a {component}; '
                         f'load it with {found}.load(...)')


def atomic_write_text(path, text: str) -> None:
    """Temp file + rename, so an interrupted write never leaves a truncated file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


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
