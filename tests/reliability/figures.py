"""The figures the reliability suite prints at its end (README "Reliability", docs/run.md).

Tests call :func:`tally` as they inject faults and check outcomes; `conftest.py` prints one summary
line. Names used: ``faults_injected``, ``runs_recovered``, ``checkpoints_lost`` (must stay 0) and
``inputs_fuzzed``; :func:`exit_code` counts the exit codes seen.
"""

from __future__ import annotations

from collections import Counter

FIGURES: Counter[str] = Counter()
EXIT_CODES: Counter[int] = Counter()


def tally(name: str, n: int = 1) -> None:
    FIGURES[name] += n


def exit_code(code: int) -> None:
    EXIT_CODES[int(code)] += 1


def summary_line() -> str:
    codes = ", ".join(f"{c}: {n}" for c, n in sorted(EXIT_CODES.items())) or "none"
    return (
        f"reliability: {FIGURES['faults_injected']} faults injected, {FIGURES['runs_recovered']} runs recovered, "
        f"{FIGURES['checkpoints_lost']} checkpoints lost, {FIGURES['inputs_fuzzed']} inputs fuzzed; exit codes {codes}"
    )
