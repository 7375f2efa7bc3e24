"""Files and directories the package writes (indexes, trained models, checkpoints), written so that a failure never
leaves a half-written one or destroys the previous one, and read back with errors that name the file.

* :func:`build_lock` serialises builders of one path across processes (two processes indexing the same path
  would otherwise interleave their writes), :func:`staging_directory` builds into a private directory beside the
  target and moves it into place only when complete, :func:`replace_directory` swaps a new directory in for an
  old one, and :func:`saving` does both for a saved model;
* :func:`atomic_write_text` (temp file + rename), the component config file (``pyterrier_coder.json``: which
  component a directory holds, with its settings), :func:`read_json` and :func:`load_tensors` (``weights_only``:
  a file that would run code when loaded is refused).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ._version import __version__

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


def atomic_write_text(path, text: str) -> None:
    """Temp file + rename, so an interrupted write never leaves a truncated file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    with os.fdopen(fd, 'w') as f:
        f.write(text)
    os.replace(tmp, path)



def write_component_config(path, component: str, settings: dict, **extra) -> None:
    """Writes the json that tells which component a directory holds (checked again by ``load``)."""
    atomic_write_text(Path(path) / CONFIG_FILE, json.dumps(
        {'component': component, 'version': __version__, 'settings': settings, **extra}, indent=2, default=str))



def read_component_config(path, component: str) -> dict:
    check_component_dir(path, component)
    return read_json(Path(path) / CONFIG_FILE, component, 'saved model\'s settings file')



def check_component_dir(path, component: str) -> None:
    """Fails clearly when ``path`` is missing or was written by another component type."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f'{component}: no saved model directory at {str(path)!r}')
    conf_path = path / CONFIG_FILE
    if not conf_path.is_file():
        raise ValueError(f'{component}: {str(path)!r} was not written by pyterrier-coder (no {CONFIG_FILE})')
    found = read_json(conf_path, component, 'saved model\'s settings file').get('component')
    if found != component:
        raise ValueError(f'{component}: {str(path)!r} holds a saved {found}, not a {component}; '
                         f'load it with {found}.load(...)')


def is_plain_model_directory(path) -> bool:
    """A Hugging Face model directory (``config.json``) that this package did not write (no ``pyterrier_coder.json``):
    a released checkpoint, loaded with the component's default settings."""
    path = Path(path)
    return path.is_dir() and (path / 'config.json').exists() and not (path / CONFIG_FILE).exists()
