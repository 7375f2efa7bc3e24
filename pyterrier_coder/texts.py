"""Document text for the components that read documents themselves (MonoElectra scores query-passage pairs, the
bi-encoder trainers encode documents): a ``texts=`` source looked up by docno, and corpora that can be read more
than once (to find the text of a few documents, then to encode all of them)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import pandas as pd
import pyterrier as pt

#: where text is looked up by docno: a callable docno -> text, a mapping, or a ``pt.Transformer`` text loader
TextSource = Union[Callable[[str], str], Mapping, pt.Transformer]


def clean_text(values) -> List[str]:
    """NaN/None/empty text becomes ''; everything else str."""
    return ['' if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v) for v in values]


def lookup_texts(docnos: Sequence[str], source: Optional[TextSource], text_field: str,
                 component: str) -> Dict[str, str]:
    """Text of ``docnos`` from the optional ``texts`` source; docnos it cannot give are left out."""
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
    return {d: t for d, t in zip(found, clean_text(found.values())) if found[d] is not None}


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
            found[docno] = clean_text([doc.get(text_field)])[0]
    return found, count
