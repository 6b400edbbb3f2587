"""Prints the reliability figures (tests/reliability/figures.py) at the end of a run that collected this suite."""

from __future__ import annotations

from . import figures


def pytest_terminal_summary(terminalreporter):
    if figures.FIGURES or figures.EXIT_CODES:
        terminalreporter.write_line(figures.summary_line())
