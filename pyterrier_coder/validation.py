"""Input checks whose errors name the component and what is missing."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import pandas as pd
import pyterrier_alpha as pta

try:
    from pyterrier.validate import InputValidationError
except ImportError:  # older pyterrier: pyterrier-alpha's own
    from pyterrier_alpha.validate import InputValidationError


def _describe_modes(modes) -> str:
    parts = []
    for m in modes:
        what = []
        if m.missing_columns:
            what.append(f'missing {list(m.missing_columns)}')
        if m.extra_columns:
            what.append(f'must not have {list(m.extra_columns)}')
        parts.append(f'{m.mode_name + " mode: " if m.mode_name else ""}{", ".join(what)}')
    return ' or '.join(parts)



@contextmanager
def validate_columns(inp, component: str, what: str = 'input frame', hint: Optional[str] = None):
    """``pta.validate.any(inp)`` whose error names the component and the missing columns, e.g.
    ``Coder: the input frame does not have the required columns (rerank mode: missing ['docno', 'query'] or
    retrieve mode: missing ['query']); its columns are ['qid', 'x']``. Raises pyterrier's
    ``InputValidationError`` (a ``KeyError``), like ``pta.validate`` itself."""
    try:
        with pta.validate.any(inp) as v:
            yield v
    except InputValidationError as e:
        columns = list(inp.columns) if isinstance(inp, pd.DataFrame) else list(inp)
        message = (f'{component}: the {what} does not have the required columns ({_describe_modes(e.modes)}); '
                   f'its columns are {columns}' + (f'. {hint}' if hint else ''))
        raise InputValidationError(message, e.modes) from None



def validation_data(valid, valid_qrels, component: str) -> bool:
    """Whether ``fit`` was given validation data; one of the two without the other is a mistake, not a request to
    train without validation (which would silently keep the last weights instead of the best)."""
    if (valid is None) != (valid_qrels is None):
        given, missing = ('valid', 'valid_qrels') if valid_qrels is None else ('valid_qrels', 'valid')
        raise ValueError(f'{component}.fit: {given} was given without {missing}; validation needs both')
    return valid is not None
