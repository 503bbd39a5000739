"""Evaluation: full-ranking metrics, the results store, significance tests, the paper's tables and figures.

Imports neither ``pipeline`` nor ``train``; folders and files are passed in as arguments. The metric names
live here, with the tie rules, so that the results store and the tables can be used without importing torch.
"""

METRIC_NAMES: tuple[str, ...] = ("R@10", "R@50", "N@10", "N@50")
# How ``evaluate.metrics`` ranks a target that ties other items (its docstring defines each rule).
TIE_MODES: tuple[str, ...] = ("pessimistic", "expected", "index")
DEFAULT_TIES = "pessimistic"
