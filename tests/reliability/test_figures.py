"""The summary line the README's "Reliability" figures are read from."""

from __future__ import annotations

from . import figures


def test_summary_line_names_every_figure():
    saved = (figures.FIGURES.copy(), figures.EXIT_CODES.copy())
    try:
        figures.FIGURES.clear(), figures.EXIT_CODES.clear()
        figures.tally("faults_injected", 3)
        figures.tally("runs_recovered", 2)
        figures.exit_code(7)
        figures.exit_code(7)
        line = figures.summary_line()
        assert "3 faults injected" in line and "2 runs recovered" in line and "0 checkpoints lost" in line
        assert "0 inputs fuzzed" in line and "7: 2" in line
    finally:
        figures.FIGURES.clear(), figures.EXIT_CODES.clear()
        figures.FIGURES.update(saved[0]), figures.EXIT_CODES.update(saved[1])
