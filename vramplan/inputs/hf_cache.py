"""The Hugging Face hub cache on disk: where it is and which snapshot of a repo it holds. No network, and no
import of huggingface_hub (the estimate path stays light).

Where (huggingface_hub constants.py): HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else `$HF_HOME/hub`,
HF_HOME defaulting to `$XDG_CACHE_HOME/huggingface` and XDG_CACHE_HOME to `~/.cache`; `~` and `$VAR` are expanded.
The variables are read from a given environment: preflight judges the trainer's, which may differ from its own.
One difference: an empty variable counts as unset here (huggingface_hub would take "" as the current directory).

Layout (huggingface_hub docs, "Understand caching"; file_download.py try_to_load_from_cache):
`<cache>/models--{org}--{name}/refs/<revision>` holds the commit hash of a branch or tag, and
`snapshots/<commit>/` holds the files (symlinks into `blobs/`). A revision that has no ref is taken as a commit hash.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_VAR = re.compile(r"\$(\w+|\{[^}]*\})")  # what os.path.expandvars replaces


def _expand(value: str, env: Mapping[str, str]) -> str:
    """os.path.expanduser(os.path.expandvars(value)) against `env` instead of this process's environment."""
    value = _VAR.sub(lambda m: env.get(m.group(1).strip("{}"), m.group(0)), value)
    if value == "~" or value.startswith("~/"):
        return (env.get("HOME") or os.path.expanduser("~")) + value[1:]
    return os.path.expanduser(value)


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The hub cache directory huggingface_hub would use under `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(_expand(env[var], env))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(_expand(home, env)) / "hub"


def repo_dir(repo_id: str, cache: Path) -> Path:
    """`models--{org}--{name}` (huggingface_hub file_download.py repo_folder_name, repo type model)."""
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(repo_id: str, cache: Path, revision: str = "main", containing: str | None = None) -> Path | None:
    """The snapshot dir of `repo_id` in the cache: the commit refs/<revision> names (or `revision` itself as a
    commit), else the newest snapshot. With `containing`, only a snapshot that holds that file counts.
    None when there is none or the cache cannot be read."""
    repo = repo_dir(repo_id, cache)
    snaps = repo / "snapshots"

    def usable(p: Path) -> bool:
        return p.is_dir() and (containing is None or (p / containing).is_file())

    try:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        if commit and usable(snaps / commit):
            return snaps / commit
        found = [p for p in snaps.iterdir() if usable(p)] if snaps.is_dir() else []
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    except (OSError, ValueError):  # unreadable ref or dir (ValueError: a ref that is not text)
        return None
