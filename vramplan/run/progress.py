"""Live progress of a running trainer, read from its `metrics.jsonl` (docs/contracts.md).

On a terminal: one rich progress bar (step/total, loss, tokens/s, ETA, memory vs the estimate, free
disk). Not a terminal (CI, `| tee`, `--json`): no animation, a plain line on stderr at most every
`interval` seconds, plus one per verified checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vramplan.contract import ENV_PROGRESS_INTERVAL
from vramplan.units import fmt_bytes, fmt_clock


def tail_events(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete JSON lines of `path` from byte `offset`; a half-written last line waits for the next call."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in chunk[: end + 1].splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a torn or foreign line never stops the progress display
        if isinstance(obj, dict):
            events.append(obj)
    return events, offset + end + 1


def device_memory(record: dict) -> tuple[str, int | None]:
    """(label, bytes) of the memory to watch in a step event or summary: GPU/NPU reserved, else CPU RSS."""
    device = record.get("device", "cuda")
    if device != "cpu":
        vals = record.get("peak_reserved_bytes") or record.get("peak_allocated_bytes") or []
        return ("VRAM", max(vals) if vals else None)
    rss = record.get("rss_bytes")
    if rss is None:
        vals = record.get("peak_rss_bytes") or []
        rss = max(vals) if vals else None
    return ("RSS", rss)


def estimated_memory(estimate: dict, device: str, world_size: int = 1) -> int | None:
    """The estimate matching `device_memory`: what nvidia-smi shows per GPU, or per-process CPU RAM."""
    if not estimate:
        return None
    # With the CPU as the device, the estimate's per-"GPU" figure is already the training process's peak
    # memory (model states + activations + the process base; vramplan/estimate/gpu_memory.py), so both
    # cases read it.
    return estimate.get("vram_per_gpu_bytes")


@dataclass
class ProgressState:
    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float | None = None
    memory_label: str = "VRAM"
    memory_bytes: int | None = None
    device: str | None = None
    checkpoints: list = field(default_factory=list)
    ended: bool = False

    def eta_s(self) -> float | None:
        if not self.max_steps or not self.step or self.elapsed_s is None:
            return None
        return self.elapsed_s / self.step * max(0, self.max_steps - self.step)

    def update(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            self.max_steps = ev.get("max_steps", self.max_steps)
            self.device = ev.get("device", self.device)
        elif kind == "step":
            self.step = int(ev.get("step", self.step))
            self.max_steps = ev.get("max_steps", self.max_steps)
            self.loss = ev.get("loss", self.loss)
            self.tokens_per_s = ev.get("tokens_per_s", self.tokens_per_s)
            self.elapsed_s = ev.get("elapsed_s", self.elapsed_s)
            self.device = ev.get("device", self.device)
            label, mem = device_memory(ev)
            if mem is not None:
                self.memory_label, self.memory_bytes = label, max(mem, self.memory_bytes or 0)
        elif kind == "checkpoint":
            self.checkpoints.append(ev)
        elif kind == "end":
            self.ended = True


class ProgressView:
    """Follows `metrics.jsonl` of one attempt. Call `poll()` periodically, `close()` at the end."""

    def __init__(self, run_dir: str | Path, estimate: dict | None = None, *, world_size: int = 1,
                 label: str = "training", stream=None, interval: float = 10.0, tty: bool | None = None):
        self.run_dir = Path(run_dir)
        self.metrics = self.run_dir / "metrics.jsonl"
        self.estimate = estimate or {}
        self.world_size = world_size
        self.label = label
        self.stream = stream or sys.stderr
        self.interval = float(os.environ.get(ENV_PROGRESS_INTERVAL, interval))
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.state = ProgressState()
        self._offset = 0
        self._last_line = time.monotonic()
        self._last_step_printed = -1
        self._progress = None
        self._task = None

    def _info(self) -> str:
        st = self.state
        parts = []
        if st.loss is not None:
            parts.append(f"loss {st.loss:.4f}")
        est = estimated_memory(self.estimate, st.device or "cuda", self.world_size)
        if st.memory_bytes is not None:
            vs = f" (est {fmt_bytes(est)})" if est else ""
            parts.append(f"{st.memory_label} {fmt_bytes(st.memory_bytes)}{vs}")
        if st.tokens_per_s is not None:
            parts.append(f"{st.tokens_per_s:,.0f} tok/s")
        try:
            parts.append(f"{fmt_bytes(shutil.disk_usage(self.run_dir).free)} disk free")
        except OSError:
            pass
        return ", ".join(parts)

    def _line(self) -> str:
        st = self.state
        total = st.max_steps if st.max_steps else "?"
        return f"vramplan: {self.label}: step {st.step}/{total}, {self._info()}, ETA {fmt_clock(st.eta_s())}"

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def poll(self, force: bool = False) -> ProgressState:
        events, self._offset = tail_events(self.metrics, self._offset)
        for ev in events:
            self.state.update(ev)
            if ev.get("event") == "checkpoint" and not self.tty:
                self._print(f"vramplan: {self.label}: checkpoint at step {ev.get('step')} "
                            f"({fmt_bytes(ev.get('bytes'))}, verified={ev.get('verified')})")
        if self.tty:
            self._draw()
        else:
            now = time.monotonic()
            due = now - self._last_line >= self.interval
            first = self._last_step_printed < 0 and self.state.step > 0
            if self.state.step != self._last_step_printed and (force or due or first):
                self._print(self._line())
                self._last_line, self._last_step_printed = now, self.state.step
        return self.state

    def _console(self):
        from vramplan.commands.output import stderr_console

        if self.stream is sys.stderr:
            return stderr_console()
        from rich.console import Console

        return Console(file=self.stream, force_terminal=True, width=100, no_color=True)

    def _draw(self) -> None:
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
            from rich.table import Column

            # on a narrow terminal only the info column is cut short; step/total and ETA always show
            fixed = {"no_wrap": True}
            self._progress = Progress(TextColumn("{task.description}", table_column=Column(**fixed)),
                                      BarColumn(bar_width=20), MofNCompleteColumn(table_column=Column(**fixed)),
                                      TextColumn("ETA {task.fields[eta]}", table_column=Column(**fixed)),
                                      TextColumn("{task.fields[info]}", markup=False,
                                                 table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
                                      console=self._console(), transient=False, expand=True)
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=self.state.max_steps, info="starting", eta="n/a")
        # ETA from the trainer's own clock (elapsed_s), not from how often we happened to poll
        self._progress.update(self._task, completed=self.state.step, total=self.state.max_steps, info=self._info(),
                              eta=fmt_clock(self.state.eta_s()))

    def close(self) -> ProgressState:
        self.poll(force=True)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        return self.state
