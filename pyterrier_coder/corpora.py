"""Corpora being indexed: each document checked as it passes (naming the bad one), the corpus's length for a
progress bar, and a fingerprint of the corpus (so that an index is never reused for another one)."""
from __future__ import annotations

import hashlib
import re
from typing import Iterable, Optional


def check_document(doc, number: int, seen: set, *, text_field: str = 'text') -> dict:
    """``{'docno', text_field}`` of the ``number``-th document of a corpus being indexed, or a ValueError naming it:
    not a dict, a docno that is not a non-empty str without whitespace, a text that is not a str, or a docno
    already in ``seen`` (to which it is then added). Every indexer checks its corpus with it."""
    if not isinstance(doc, dict):
        raise ValueError(f'Document {number}: expected a dict, got {type(doc).__name__}')
    docno, text = doc.get('docno'), doc.get(text_field)
    if not isinstance(docno, str) or not docno:
        raise ValueError(f'Document {number}: docno must be a non-empty str, got {docno!r}')
    if not isinstance(text, str):
        found = f'no {text_field!r} field (fields: {sorted(doc)})' if text_field not in doc else type(text).__name__
        raise ValueError(f'Document {number} ({docno!r}): {text_field} must be a str, got {found}')
    if re.search(r'[\s\x00]', docno):
        raise ValueError(f'Document {number}: docno {docno!r} contains whitespace or NUL')
    if docno in seen:
        raise ValueError(f'Document {number}: duplicate docno {docno!r}')
    seen.add(docno)
    return {'docno': docno, text_field: text}



def known_length(items) -> Optional[int]:
    """``len(items)`` when the iterable has one (a list, a dataset's ``get_corpus_iter()``), else None: the total of
    an indexing progress bar."""
    return len(items) if hasattr(items, '__len__') else None


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
