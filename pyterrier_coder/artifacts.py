"""Directories the package builds (indexes, trained models): built in private, moved into place whole, and
recorded with what built them.

* :func:`build_lock` serialises builders of one path across processes (two processes indexing the same path
  would otherwise interleave their writes), :func:`staging_directory` builds into a private directory beside the
  target and moves it into place only when complete, and :func:`replace_directory` swaps a new directory in for an
  old one, so a failed or interrupted build never destroys or half-replaces what was there.
* :class:`CorpusFingerprint` hashes a corpus (docnos and texts, in order) while it is indexed, so that reopening an
  index with another corpus can be refused instead of silently serving the old one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

#: the file that says which component a saved directory holds, and its settings
CONFIG_FILE = 'pyterrier_coder.json'

try:
    import fcntl
except ImportError:     # not on Windows: builds there are not serialised across processes
    fcntl = None


@contextmanager
def build_lock(path):
    """Holds an exclusive lock on ``path``'s build (a lock file beside it) for the duration of the block; another
    process asking for the same lock waits until this one is done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = path.parent / f'.{path.name}.lock'
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def private_directory(path) -> Path:
    """A new empty directory beside ``path`` (same file system, so it can be renamed onto ``path``), named after it
    and this process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f'.{path.name}.building-{os.getpid()}-', dir=path.parent))


def replace_directory(new, path) -> None:
    """Moves the complete directory ``new`` to ``path``. What was at ``path`` is moved aside first and deleted only
    once ``new`` is in place: at no moment is ``path`` a mixture of the two."""
    new, path = Path(new), Path(path)
    if not path.exists():
        os.rename(new, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f'.{path.name}.old-', dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)      # put the old one back: never leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staging_directory(path):
    """Yields a private directory to build ``path``'s content in; when the block completes it replaces ``path``
    (:func:`replace_directory`), and when the block raises it is deleted and ``path`` is left as it was."""
    tmp = private_directory(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


class CorpusFingerprint:
    """sha256 over the docnos and texts of a corpus, in order, and the number of documents: fed one document at a
    time while a corpus is indexed (:meth:`add`), or computed in one pass (:meth:`of`)."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self.documents = 0

    def add(self, docno: str, text: str) -> None:
        self._digest.update(docno.encode('utf-8', 'surrogatepass') + b'\x1f' +
                            text.encode('utf-8', 'surrogatepass') + b'\x1e')
        self.documents += 1

    def as_dict(self) -> dict:
        return {'documents': self.documents, 'sha256': self._digest.hexdigest()}

    @classmethod
    def of(cls, corpus: Iterable[dict], text_field: str = 'text') -> dict:
        """The fingerprint of a whole corpus (dicts with ``docno`` and ``text_field``), read once."""
        fingerprint = cls()
        for doc in corpus:
            fingerprint.add(str(doc.get('docno')), str(doc.get(text_field)))
        return fingerprint.as_dict()


def describe_corpus(record: Optional[dict]) -> str:
    if not record:
        return 'an unrecorded corpus'
    return f"a corpus of {record['documents']:,} documents (sha256 {record['sha256'][:12]})"


def read_json(path, component: str, what: str = 'file') -> dict:
    """A JSON file of the package's own (a model's settings, an index's record), or an error naming the file and
    what to do when it is not readable JSON (truncated by a full disk, edited by hand...)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f'{component}: {str(path)!r} is not a readable {what} ({type(error).__name__}: {error}); '
                         f'it may have been cut short by a full disk or an interrupted write: restore it, or '
                         f'rebuild / re-save what it belongs to') from None


def load_tensors(path, component: str, *, map_location='cpu', what: str = 'weights file'):
    """``torch.load`` of a file of tensors and plain values only (``weights_only=True``): a file that holds anything
    else (a pickled callable would run code) is refused, as is one cut short; either error names the file."""
    import pickle
    import torch
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f'{component}: refused to load {str(path)!r}: it holds objects other than tensors and plain '
                         f'values, which loading would execute (not a {what} written by pyterrier-coder, or written '
                         f'by a version that pickled them); delete it. ({str(error).splitlines()[0][:200]})') from None
    except (RuntimeError, EOFError, OSError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f'{component}: {str(path)!r} is not a readable {what} (cut short by a full disk or an '
                         f'interrupted copy?); delete it, or restore it. ({type(error).__name__}: '
                         f'{str(error)[:200]})') from None


@contextmanager
def saving(path, component: str):
    """Yields a private directory to write a model into; when the block completes it replaces ``path``, so a save
    that fails (a full disk, an interrupt) leaves what was at ``path`` unchanged. ``path`` must be new, empty, or a
    directory this package saved (it has a ``pyterrier_coder.json``): replacing any other directory would delete
    files the package did not write."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f'{component}.save: {str(path)!r} exists and is not a directory')
        if any(path.iterdir()) and not (path / CONFIG_FILE).exists():
            raise FileExistsError(f'{component}.save: {str(path)!r} is a directory that holds other files than a '
                                  f'saved model; save into a new or empty directory')
    try:
        with staging_directory(path) as tmp:
            yield tmp
    except OSError as error:
        raise OSError(error.errno, f'{component}.save: could not write {str(path)!r} ({error.strerror or error}); '
                                   f'what was there is unchanged. Free space, or choose another directory, and save '
                                   f'again') from error
