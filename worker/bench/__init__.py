"""``notifier bench`` (``make bench``): the real worker, end to end, against the old recipe,
in one run. :mod:`worker.bench.lab` says what runs where and how it is measured."""

from .lab import BenchError, Row, Target
from .report import _markdown, bench
from .scenarios import SCENARIOS

__all__ = ["SCENARIOS", "BenchError", "Row", "Target", "_markdown", "bench"]
