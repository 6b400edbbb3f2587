"""The default run dir of `vramplan run`: ./runs/<model>-<recipe>-<UTC time> (docs/run.md#a-real-run)."""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

from vramplan.errors import UsageError

RUNS_DIR = "runs"


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"


def run_name(saved: dict | None, estimate_kwargs: dict) -> tuple[str, str]:
    """(model, recipe) for the default run dir: the model profile id or its dir's name, the recipe name."""
    from vramplan.plan.request import DEFAULT_MODEL, DEFAULT_RECIPE

    if saved is not None:
        m = saved.get("model") or {}
        model = m.get("profile") or m.get("path") or m.get("llm_path") or "model"
        recipe = (saved.get("recipe") or {}).get("name") or "plan"
    else:
        model = estimate_kwargs.get("model") or DEFAULT_MODEL
        recipe = estimate_kwargs.get("recipe") or DEFAULT_RECIPE
    if "/" in model or os.sep in model or Path(model).is_dir():
        model = Path(model).resolve().name
    return _safe_name(model), _safe_name(recipe)


def default_run_dir(model: str, recipe: str, now: datetime | None = None) -> str:
    """runs/<model>-<recipe>-<UTC time, e.g. 20261201T203000Z>, with -2, -3, ... if it exists already."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    base = os.path.join(RUNS_DIR, f"{model}-{recipe}-{stamp}")
    for k in range(1, 1000):
        name = base if k == 1 else f"{base}-{k}"
        if not os.path.exists(name):
            return name
    raise UsageError(f"too many {base}* dirs", "pass --output DIR")
