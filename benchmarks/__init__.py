"""The pyterrier-coder benchmark harness; the entry point is ``python benchmarks/run.py`` (docs/performance.md).

``harness`` times and reports, ``fixtures`` builds the data and tiny models (tests/conftest.py builds its tiny
models with it too), and ``coder_rerank``, ``train_step``, ``cross_encoder`` and ``gather`` are the benchmarks.
"""
