"""Document text for the stages that need it: a transformer that adds it by docno (PyTerrier's text-loader protocol),
the lookup of texts from any source a user has (a callable, a mapping, a text loader), and corpora that can be read
more than once (to find the text of a few documents, then to encode all of them)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import pyterrier_alpha as pta


class TextLoader(pt.Transformer):
    """Adds document fields (``text`` by default) by looking up each ``docno`` in a store: a BM25 index's docstore
    or a local dataset's corpus. A docno the store does not hold raises a KeyError naming a few.

    ``fields``: ``'*'`` (every field the store has), one field name, or a list of them (PyTerrier's
    ``text_loader`` convention)."""

    def __init__(self, docstore, fields='*'):
        available = list(docstore.fields)
        wanted = available if fields == '*' else [fields] if isinstance(fields, str) else list(fields)
        unknown = [f for f in wanted if f not in available]
        if unknown:
            raise ValueError(f'TextLoader: {unknown} not stored in {docstore.label}, which has {available}')
        self.docstore = docstore
        self.fields = wanted

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pta.validate.columns(inp, includes=['docno'])
        return inp.assign(**{field: pd.Series(self.docstore.get(inp['docno'], field), index=inp.index, dtype=object)
                             for field in self.fields})

    def __eq__(self, other):   # as BM25's: text loaders of the same store and fields are interchangeable
        if not isinstance(other, TextLoader):
            return NotImplemented
        return (type(self.docstore), self.docstore.label, self.fields) == (type(other.docstore), other.docstore.label,
                                                                           other.fields)

    def __hash__(self):
        return hash((type(self.docstore), self.docstore.label, tuple(self.fields)))

    def __repr__(self):
        fields = '' if self.fields == list(self.docstore.fields) else f', {self.fields!r}'
        return f'TextLoader({self.docstore.label!r}{fields})'


TextSource = Union[Callable[[str], str], Mapping, pt.Transformer]



def clean_texts(values) -> List[str]:
    """NaN/None/empty text becomes ''; everything else str."""
    return ['' if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in values]



def lookup_texts(docnos: Sequence[str], source: Optional[TextSource], text_field: str,
                 component: str = 'pyterrier_coder') -> Dict[str, str]:
    """Text of ``docnos`` from the optional ``texts`` source; docnos it cannot give are left out. Errors name
    ``component``."""
    if source is None or not len(docnos):
        return {}
    docnos = list(docnos)
    if isinstance(source, pt.Transformer):
        found = _loader_texts(source, docnos, text_field, component)
    elif isinstance(source, Mapping):
        found = {d: source[d] for d in docnos if d in source}
    elif callable(source):
        found = {}
        for d in docnos:
            try:
                found[d] = source(d)
            except (KeyError, LookupError):
                pass
    else:
        raise TypeError(f'{component}: texts must be a callable docno -> text, a mapping or a pt.Transformer '
                        f'text loader, got {type(source).__name__}')
    return {d: t for d, t in zip(found, clean_texts(found.values())) if found[d] is not None}



def _loader_texts(loader: pt.Transformer, docnos: List[str], text_field: str, component: str) -> Dict[str, str]:
    """Text of ``docnos`` from a text loader. Loaders raise a KeyError for a docno they do not hold (e.g. a docstore
    of part of the corpus), so a failed request is split in halves until the docnos it can give are found."""
    try:
        frame = loader(pd.DataFrame({'qid': ['0'] * len(docnos), 'docno': docnos}))
    except KeyError:
        if len(docnos) == 1:
            return {}
        middle = len(docnos) // 2
        return {**_loader_texts(loader, docnos[:middle], text_field, component),
                **_loader_texts(loader, docnos[middle:], text_field, component)}
    if text_field not in frame.columns:
        raise KeyError(f'{component}: the texts loader {loader!r} gives no {text_field!r} column (its columns: '
                       f'{list(frame.columns)})')
    return dict(zip(frame['docno'].astype(str), frame[text_field]))


#: a corpus given to a component: a dataset (``get_corpus_iter()``), a function returning a fresh iterable of
#: ``{'docno', 'text'}`` dicts, or a list of them
Corpus = Union[object, Callable[[], Iterable[dict]], Sequence[dict]]


def corpus_reader(corpus: Corpus, component: str) -> Callable[[], Iterable[dict]]:
    """A function returning a fresh iterable over ``corpus`` at each call: components read a corpus more than once
    (the texts of the training documents, then every document to encode), so a one-shot iterator is refused."""
    if hasattr(corpus, 'get_corpus_iter'):
        return lambda: corpus.get_corpus_iter(verbose=False)
    if isinstance(corpus, (list, tuple)):
        return lambda: corpus
    if callable(corpus):
        return corpus
    raise TypeError(f'{component}: corpus must be a dataset (with get_corpus_iter()), a function returning an iterable '
                    f'of {{"docno", "text"}} dicts, or a list of them; got {type(corpus).__name__} (an iterator '
                    f'can be read only once: pass a function that returns it, e.g. lambda: dataset.get_corpus_iter())')


def scan_corpus(read: Callable[[], Iterable[dict]], wanted: Set[str], text_field: str) -> Tuple[Dict[str, str], int]:
    """One pass over the corpus: the text of the ``wanted`` docnos it holds, and its number of documents."""
    found, count = {}, 0
    for doc in read():
        count += 1
        docno = str(doc.get('docno'))
        if docno in wanted:
            found[docno] = clean_texts([doc.get(text_field)])[0]
    return found, count
