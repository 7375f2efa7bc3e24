"""Sharing trained components through the Hugging Face Hub (a saved directory is uploaded as it is)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from ._version import __version__


def _hf_hub(component: str, what: str):
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(f'{component}.{what} needs the huggingface_hub package: pip install huggingface_hub') from e
    return huggingface_hub



class HubMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on top of a component's ``save`` and ``load``
    (a saved directory is uploaded as-is, so a hub repository and a local directory load the same way)."""

    COMPONENT = 'component'

    def save_pretrained(self, path) -> Path:
        """Same as ``save(path)``; returns the path."""
        self.save(path)
        return Path(path)

    @classmethod
    def from_pretrained(cls, name_or_path, *args, revision: Optional[str] = None, token=None,
                        cache_dir=None, **kwargs):
        """Loads from a local directory written by ``save``/``save_pretrained``, or else from a Hugging Face
        Hub repository id (downloaded with ``huggingface_hub.snapshot_download``). Other arguments go to
        ``load`` (e.g. ``index=`` for Coder/Adore, whose document index is never uploaded)."""
        path = Path(str(name_or_path)).expanduser()
        if not path.exists() and not _looks_like_path(str(name_or_path)):
            hub = _hf_hub(cls.COMPONENT, 'from_pretrained')
            path = Path(hub.snapshot_download(repo_id=str(name_or_path), revision=revision, token=token,
                                              cache_dir=cache_dir))
        return cls.load(path, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token=None,
                    commit_message: Optional[str] = None, revision: Optional[str] = None, create_repo: bool = True):
        """Saves to a temporary directory and uploads it to the Hugging Face Hub model repository ``repo_id``
        (created if needed); returns ``upload_folder``'s commit info. Load it back with ``from_pretrained``."""
        hub = _hf_hub(self.COMPONENT, 'push_to_hub')
        api = hub.HfApi(token=token)
        if create_repo:
            api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type='model')
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            card = Path(tmp) / 'README.md'
            if not card.exists():
                card.write_text(_model_card(self.COMPONENT, repo_id))
            return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type='model', revision=revision,
                                     commit_message=commit_message or f'Upload {self.COMPONENT} (pyterrier-coder)')



def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is meant as a path."""
    return name.startswith(('/', '.', '~')) or '\\' in name or name.count('/') > 1



def _model_card(component: str, repo_id: str) -> str:
    extra = ', index="<the document index it was trained on>"' if component in ('Coder', 'Adore') else ''
    return (f'---\nlibrary_name: pyterrier-coder\ntags:\n- pyterrier\n- pyterrier-coder\n---\n\n'
            f'# {component} ({repo_id})\n\nA pyterrier-coder {component} (version {__version__}).\n\n'
            f'```python\nfrom pyterrier_coder import {component}\n'
            f'model = {component}.from_pretrained("{repo_id}"{extra})\n```\n')
