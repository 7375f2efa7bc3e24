"""The experiment runner (``pyterrier-coder experiment``): indexes a collection, trains every requested component,
and compares all pipelines with one ``pt.Experiment``.

- :mod:`.budgets`: what each component is trained with, ``--set`` changes, fitting to the collection;
- :mod:`.runner`: :class:`ExperimentRunner`, which builds, trains or reuses, runs and evaluates;
- :mod:`.run_cache`: when a model or a test run of a previous invocation can be reused;
- :mod:`.comparisons`: the measures, the baseline and the paired comparisons;
- :mod:`.plots`, :mod:`.report`: the figures, ``report.md`` and ``run_info.json``.
"""
from .budgets import COMPONENTS, DEFAULT_COMPONENTS, FULL, QUICK, apply_overrides, fit_budget, parse_overrides
from .comparisons import BASELINE, COMPARISONS, FUSED_SUFFIX, MEASURES, paired_comparisons
from .report import machine_description, markdown_table, source_commit
from .runner import ExperimentRunner, ExperimentSettings

__all__ = ['ExperimentRunner', 'ExperimentSettings', 'COMPONENTS', 'DEFAULT_COMPONENTS', 'FULL', 'QUICK', 'BASELINE', 'COMPARISONS',
           'FUSED_SUFFIX', 'MEASURES', 'apply_overrides', 'fit_budget', 'parse_overrides', 'paired_comparisons',
           'machine_description', 'markdown_table', 'source_commit']
