"""What lets a rerun with the same ``--out`` reuse earlier work: the settings a trained model was trained with
(``experiment_spec.json`` beside it), and the key of a test run or of a chosen interpolation weight (what it depends
on: the pipeline, its queries, the shared budget entries, and the files of the indexes and models it uses)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional

#: beside each trained model: the settings it was trained with; a model is reused only when they match
SPEC_FILE = 'experiment_spec.json'


def read_spec(model_dir: Path) -> Optional[dict]:
    """The settings a saved model was trained with, or None (no model, or one saved without them)."""
    path = Path(model_dir) / SPEC_FILE
    return json.loads(path.read_text()) if path.exists() else None


def file_stamps(root: Path, dirs: List[Path]) -> Dict[str, list]:
    """(file, size, modification time) of every file under each of ``dirs`` (named relative to ``root``), as they
    are now: a rebuilt index or a retrained model changes them."""
    return {str(path.relative_to(root)): sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                                                for f in path.rglob('*') if f.is_file())
            for path in dirs if path.exists()}


def cache_key(*parts) -> str:
    """sha256 of the JSON of ``parts`` (keys sorted): equal exactly when everything a cached result depends on is."""
    return hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode()).hexdigest()
