"""Comparing finished runs, one module per job (``experiments/compare.py`` is the command line).

- :mod:`~experiments.comparison.runs`: finding and reading runs (``results.json``, ``evaluation*.json``).
- :mod:`~experiments.comparison.labels`: a label per run (agent, played attack, differing settings).
- :mod:`~experiments.comparison.protocol`: what must be equal for numbers to be comparable.
- :mod:`~experiments.comparison.stats`: groups over seeds, mean ± std, the headline attack, ranking.
- :mod:`~experiments.comparison.ranking`: :func:`compare`, the whole comparison in one object.
- :mod:`~experiments.comparison.report`: ``report.md`` and ``summary.json``.
- :mod:`~experiments.comparison.figures`: the PNG figures (paper Figs. 1, 4, 5).
"""

from experiments.comparison.ranking import Comparison, compare, method_of
from experiments.comparison.report import markdown_report, results_table, summary_json, write_report
from experiments.comparison.runs import WEIGHTS, CompareError, Run, find_runs, load_run, played_attack
from experiments.comparison.stats import Group, Stat, attack_order, attack_title, headline_attack

__all__ = [
    "WEIGHTS",
    "CompareError",
    "Comparison",
    "Group",
    "Run",
    "Stat",
    "attack_order",
    "attack_title",
    "compare",
    "find_runs",
    "headline_attack",
    "load_run",
    "markdown_report",
    "method_of",
    "played_attack",
    "results_table",
    "summary_json",
    "write_report",
]
