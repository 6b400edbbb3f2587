"""Is a Hugging Face repo already in the local hub cache, complete? (no network, no huggingface_hub needed)

Where the cache is and which snapshot it holds: vramplan/inputs/hf_cache.py (huggingface_hub's precedence of
HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME), read from the trainer's environment.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vramplan.inputs.hf_cache import cached_snapshot, hub_cache_dir
from vramplan.preflight.base import Context

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def base_repo_ids(hf_ids: dict | None) -> list[str]:
    """The repos the base weights come from: the assembled HF-format LLaVA repo when the profile names one
    (`llava`), else the parts (`llm`, `vision`). The parts of a `llava` profile are provenance only."""
    ids = {k: v for k, v in (hf_ids or {}).items() if isinstance(v, str) and v}
    if "llava" in ids:
        return [ids["llava"]]
    return list(ids.values())


def trainer_hub_cache(ctx: Context) -> Path:
    """The hub cache the trainer will use: --hf-cache when given, else the one its environment selects."""
    return ctx.hf_cache if ctx.hf_cache is not None else hub_cache_dir(ctx.env)


@dataclass(frozen=True)
class ModelDirState:
    path: str
    exists: bool
    has_config: bool
    complete: bool  # config + every weight file (all shards of an index)
    weight_bytes: int
    problem: str  # "" when complete


def inspect_model_dir(d: Path) -> ModelDirState:
    """Does a HF-format model dir hold config.json and all its weights? Sizes follow symlinks (cache blobs)."""
    d = Path(d)
    if not d.is_dir():
        return ModelDirState(str(d), d.exists(), False, False, 0, "not a directory" if d.exists() else "does not exist")
    has_config = (d / "config.json").is_file()
    files: list[Path] = []
    problem = ""
    index = next((d / f for f in INDEX_FILES if (d / f).is_file()), None)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            shards = []
            problem = f"{index.name} is unreadable ({type(e).__name__})"
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            problem = f"{len(missing)} of {len(shards)} weight shards missing (e.g. {missing[0]})"
        files = [d / s for s in shards if (d / s).is_file()]
    else:
        files = [d / f for f in WEIGHT_FILES if (d / f).is_file()]
        if not files:
            problem = f"no weights ({' or '.join(WEIGHT_FILES)} or a sharded index)"
    if not has_config:
        problem = "no config.json" + (f"; {problem}" if problem else "")
    size = 0
    seen = set()
    for f in files:
        real = os.path.realpath(f)
        if real not in seen:
            seen.add(real)
            size += os.path.getsize(real)
    return ModelDirState(str(d), True, has_config, not problem, size, problem)


def cached_model(repo_id: str, cache: Path) -> ModelDirState:
    snap = cached_snapshot(repo_id, cache)
    if snap is None:
        return ModelDirState(repo_id, False, False, False, 0, f"not in the Hugging Face cache {cache}")
    st = inspect_model_dir(snap)
    return ModelDirState(str(snap), True, st.has_config, st.complete, st.weight_bytes,
                         st.problem and f"in the cache but incomplete: {st.problem}")
