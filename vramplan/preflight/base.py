"""The pieces every check shares: the result type, the context a check reads, small helpers."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("PASS", "WARN", "FAIL", "SKIP")


@dataclass(frozen=True)
class CheckResult:
    """One line of the preflight table.

    Args:
        name: the check's name (what `--check NAME` selects).
        status: PASS | WARN | FAIL | SKIP.
        detail: what was found, with the numbers (one or two sentences).
        fix: copy-pasteable command(s) that fix it, one per line ("" when nothing to fix).
        facts: machine-readable measurements behind the detail.
    """

    name: str
    status: str
    detail: str
    fix: str = ""
    facts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status must be one of {STATUSES}, not {self.status!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix,
                "facts": dict(self.facts)}


@dataclass
class Context:
    """What the checks read: the plan (or why there is none), the paths, the environment, probe results."""

    plan: dict | None
    output_dir: Path
    dataset: Path | None = None
    images: Path | None = None
    model_paths: list[Path] = field(default_factory=list)
    hf_cache: Path | None = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    no_plan_reason: str = "no plan given"
    probes: Any = None  # vramplan.preflight.probes.ProbeSet
    cache: dict = field(default_factory=dict)  # shared lazily computed facts (e.g. the NVML snapshot)

    # --- plan accessors: tolerant of missing keys -------------------------------------------
    def section(self, key: str) -> dict:
        v = (self.plan or {}).get(key)
        return v if isinstance(v, dict) else {}

    @property
    def estimate(self) -> dict:
        return self.section("estimate")

    @property
    def device(self) -> str | None:
        return self.section("hardware").get("device")

    @property
    def quant(self) -> str | None:
        return self.section("recipe").get("quant")

    @property
    def zero_stage(self) -> int | None:
        z = self.section("strategy").get("zero_stage", self.estimate.get("zero_stage"))
        return int(z) if isinstance(z, (int, float)) else None

    @property
    def offload(self) -> str | None:
        return self.section("strategy").get("offload", self.estimate.get("offload"))

    @property
    def uses_deepspeed(self) -> bool | None:
        if self.plan is None:
            return None
        s = self.section("strategy")
        return bool(self.plan.get("ds_config")) or s.get("launcher") == "deepspeed" or bool(self.zero_stage)

    @property
    def gpus_per_node(self) -> int | None:
        h = self.section("hardware")
        v = h.get("gpus_per_node", h.get("total_gpus"))
        return int(v) if isinstance(v, (int, float)) else None

    def need_note(self) -> str:
        """Why a need-based comparison cannot be made."""
        return "no plan, so the run's needs are unknown" + (
            f" ({self.no_plan_reason})" if len(self.no_plan_reason) <= 80 else "")


def plan_hint() -> str:
    return "vramplan preflight --plan plan.json   # or: vramplan preflight --gpus 1x24G"


def nearest_existing(path: Path) -> Path:
    """`path` or its closest existing ancestor (a run dir may not exist yet)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p.parent != p:
        p = p.parent
    return p
