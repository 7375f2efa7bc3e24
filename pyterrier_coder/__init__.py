"""pyterrier-coder: CODER, ADORE, STAR, TAS-Balanced and monoELECTRA (LCE) as PyTerrier transformers.

Attributes are imported lazily so that ``import pyterrier`` (which loads this package through its
``pyterrier.modules`` entry point as ``pt.coder``) stays cheap and never imports torch eagerly.
"""
from importlib import import_module
from ._version import __version__

_EXPORTS = {
    'load_dataset': 'datasets',
    'LocalDataset': 'datasets',
    'BM25': 'retrievers',
    'DenseEncoder': 'encoders',
    'DenseIndex': 'encoders',
    'Coder': 'coder',
    'Adore': 'adore',
    'DenseQueryTrainer': 'query_trainer',
    'Star': 'star',
    'TasBalanced': 'tasb',
    'BiEncoderTrainer': 'bi_encoder_training',
    'MonoElectra': 'electra',
    'Interpolate': 'fusion',
    'TrainingConfig': 'training',
    'infer_device': 'devices',
}

__all__ = ['__version__', *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f'.{_EXPORTS[name]}', __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(__all__))
