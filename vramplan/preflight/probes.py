"""Subprocess probes: start them all at once, collect their JSON lines with a deadline.

Two Python probes cover the heavy imports (see `_probe_script.py`): "torch" (torch, torchvision +
its compiled ops, numpy/MKL, loaded OpenMP/MKL libraries, torch_npu, the transformers import the
trainer does) and "accel" (a bitsandbytes NF4 forward on the device, DeepSpeed and its CPU-Adam op
builder). `npu-smi info` is a third. They run concurrently so preflight stays within a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vramplan.contract import ENV_PREFLIGHT_TIMEOUT
from vramplan.inputs.devices import npu_smi_argv

MARK = "@@vramplan-probe@@"
SCRIPT = Path(__file__).with_name("_probe_script.py")
DEFAULT_TIMEOUT_S = 60.0


def probe_timeout() -> float:
    try:
        return float(os.environ.get(ENV_PREFLIGHT_TIMEOUT, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


@dataclass
class ProbeResult:
    """What one subprocess reported. `steps` maps a step key to its dict (each has "ok")."""

    name: str
    steps: dict = field(default_factory=dict)
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    seconds: float = 0.0
    start_error: str = ""

    @property
    def finished(self) -> bool:
        return "done" in self.steps

    def died(self) -> str:
        """Why the probe produced no (complete) report, for the checks that needed it ('' if it finished)."""
        if self.start_error:
            return f"could not start the probe: {self.start_error}"
        if self.timed_out:
            return f"the probe hung and was stopped after {self.seconds:.0f} s (an import that never returns)"
        if self.finished:
            return ""
        tail = [ln for ln in (self.stderr or self.stdout).strip().splitlines() if ln.strip()][-3:]
        text = " | ".join(tail) if tail else "no output"
        return f"the probe process died (exit {self.returncode}) before reporting: {text}"

    def step(self, key: str) -> dict | None:
        return self.steps.get(key)


def _python_cmd(part: str, *args: str) -> list[str]:
    return [sys.executable, "-c", SCRIPT.read_text(), part, *args]


class ProbeSet:
    """Started probes by name; `get(name)` waits for that one (until the shared deadline)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = probe_timeout() if timeout is None else timeout
        self._procs: dict[str, tuple[subprocess.Popen | None, float, str]] = {}
        self._results: dict[str, ProbeResult] = {}

    def start(self, name: str, cmd: list[str], env: dict) -> None:
        if name in self._procs:
            return
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 env=env, text=True, errors="replace")
            self._procs[name] = (p, t0, "")
        except OSError as e:
            self._procs[name] = (None, t0, f"{type(e).__name__}: {e}")

    def started(self, name: str) -> bool:
        return name in self._procs

    def get(self, name: str) -> ProbeResult | None:
        """The probe's result, or None when it was never started (the check did not ask for it)."""
        if name in self._results:
            return self._results[name]
        if name not in self._procs:
            return None
        p, t0, start_error = self._procs[name]
        res = ProbeResult(name, start_error=start_error)
        if p is not None:
            left = max(0.1, self.timeout - (time.monotonic() - t0))
            try:
                out, errt = p.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()  # only the process this ProbeSet started
                out, errt = p.communicate()
                res.timed_out = True
            res.returncode, res.stdout, res.stderr = p.returncode, out or "", errt or ""
            res.steps = parse_steps(res.stdout)
        res.seconds = time.monotonic() - t0
        self._results[name] = res
        return res

    def close(self) -> None:
        """Stop any probe still running (a check that crashed never collected it)."""
        for name, (p, _, _) in self._procs.items():
            if p is not None and name not in self._results and p.poll() is None:
                p.kill()
                p.communicate()


def parse_steps(stdout: str) -> dict:
    steps: dict = {}
    for line in stdout.splitlines():
        if line.startswith(MARK):
            try:
                d = json.loads(line[len(MARK):])
                steps[d["key"]] = d["value"]
            except (ValueError, KeyError, TypeError):
                continue
    return steps


def start_python_probe(ps: ProbeSet, name: str, part: str, env: dict, *args: str) -> None:
    ps.start(name, _python_cmd(part, *args), env)


def start_npu_smi(ps: ProbeSet, env: dict) -> bool:
    argv = npu_smi_argv(env.get("PATH"))
    if argv is None:
        return False
    ps.start("npu-smi", argv, env)
    return True
