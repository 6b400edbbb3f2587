"""The Hugging Face hub cache resolver: huggingface_hub's precedence of variables, and snapshots by revision."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.inputs.hf_cache import cached_snapshot, hub_cache_dir, repo_dir

HOME = {"HOME": "/home/u"}
ALL = {**HOME, "HF_HUB_CACHE": "/a", "HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HOME": "/h", "XDG_CACHE_HOME": "/x"}


def _without(*names: str) -> dict:
    return {k: v for k, v in ALL.items() if k not in names}


def test_hf_hub_cache_comes_first():
    assert hub_cache_dir(ALL) == Path("/a")


def test_legacy_huggingface_hub_cache_comes_second():
    assert hub_cache_dir(_without("HF_HUB_CACHE")) == Path("/legacy")


def test_hf_home_comes_third():
    assert hub_cache_dir(_without("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")) == Path("/h/hub")


def test_xdg_cache_home_comes_fourth():
    assert hub_cache_dir(_without("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")) == Path("/x/huggingface/hub")


def test_default_is_under_the_environments_home():
    assert hub_cache_dir(HOME) == Path("/home/u/.cache/huggingface/hub")


def test_empty_variables_count_as_unset():
    assert hub_cache_dir({**HOME, "HF_HUB_CACHE": "", "HUGGINGFACE_HUB_CACHE": "", "HF_HOME": "/h"}) == Path("/h/hub")
    assert hub_cache_dir({**HOME, "XDG_CACHE_HOME": ""}) == Path("/home/u/.cache/huggingface/hub")


def test_tilde_and_variables_expand_from_the_given_environment():
    assert hub_cache_dir({**HOME, "HF_HUB_CACHE": "~/hub"}) == Path("/home/u/hub")
    assert hub_cache_dir({**HOME, "HF_HOME": "$SCRATCH/hf", "SCRATCH": "/s"}) == Path("/s/hf/hub")
    assert hub_cache_dir({**HOME, "HUGGINGFACE_HUB_CACHE": "${SCRATCH}/c", "SCRATCH": "/s"}) == Path("/s/c")
    assert hub_cache_dir({**HOME, "HF_HUB_CACHE": "$UNSET/c"}) == Path("$UNSET/c")  # left as is, like expandvars


def test_default_environment_is_this_process(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert hub_cache_dir() == tmp_path / "hub"


CASES = [ALL, _without("HF_HUB_CACHE"), _without("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"),
         _without("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"), HOME,
         {**HOME, "HF_HOME": "~/hf"}, {**HOME, "HF_HUB_CACHE": "$SCRATCH/c", "SCRATCH": "/s"}]


def test_agrees_with_huggingface_hub():
    """The same directory huggingface_hub's constants.py computes, for every rule above (a subprocess per run:
    the constants are read at import)."""
    pytest.importorskip("huggingface_hub")
    code = ("import importlib, json, os, sys\nout = []\n"
            "for env in json.loads(sys.argv[1]):\n"
            "    os.environ.clear(); os.environ.update(env)\n"
            "    import huggingface_hub.constants as c\n"
            "    out.append(importlib.reload(c).HF_HUB_CACHE)\n"
            "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(CASES)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert [Path(d) for d in json.loads(p.stdout.splitlines()[-1])] == [hub_cache_dir(env) for env in CASES]


def _snapshot(cache: Path, commit: str, files=("config.json",), mtime: float | None = None) -> Path:
    snap = repo_dir("org/m", cache) / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).write_text("{}")
    if mtime is not None:
        os.utime(snap, (mtime, mtime))
    return snap


def _ref(cache: Path, revision: str, commit: str) -> None:
    ref = repo_dir("org/m", cache) / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit + "\n")


def test_snapshot_follows_the_revisions_ref(tmp_path):
    assert repo_dir("org/m", tmp_path) == tmp_path / "models--org--m"
    assert cached_snapshot("org/m", tmp_path) is None  # not cached
    old = _snapshot(tmp_path, "a" * 40, mtime=1_000)
    new = _snapshot(tmp_path, "b" * 40, mtime=2_000)
    _ref(tmp_path, "main", "a" * 40)
    _ref(tmp_path, "v1.0", "b" * 40)
    assert cached_snapshot("org/m", tmp_path) == old  # refs/main
    assert cached_snapshot("org/m", tmp_path, revision="v1.0") == new
    assert cached_snapshot("org/m", tmp_path, revision="a" * 40) == old  # a commit hash has no ref
    assert cached_snapshot("org/m", tmp_path, revision="dev") == new  # no such ref: the newest


def test_snapshot_containing_a_file(tmp_path):
    with_config = _snapshot(tmp_path, "a" * 40, mtime=1_000)
    _snapshot(tmp_path, "b" * 40, files=("model.safetensors",), mtime=2_000)
    _ref(tmp_path, "main", "b" * 40)
    assert cached_snapshot("org/m", tmp_path) == tmp_path / "models--org--m" / "snapshots" / ("b" * 40)
    assert cached_snapshot("org/m", tmp_path, containing="config.json") == with_config
    assert cached_snapshot("org/m", tmp_path, containing="tokenizer.json") is None


def test_empty_ref_is_not_the_snapshots_dir(tmp_path):
    snap = _snapshot(tmp_path, "a" * 40)
    _ref(tmp_path, "main", "")
    assert cached_snapshot("org/m", tmp_path) == snap
