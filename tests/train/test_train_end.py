"""The end of a run: a full disk while final/ or summary.json is written (exit 7, nothing partial left, the
last verified checkpoint intact), readable sizes in the disk-full message, and --resume of a finished run
(no extra step, final/ not rewritten)."""

from __future__ import annotations

import errno
import json
import os

import pytest
from trainhelpers import base_args, read_jsonl, run_train

from train import checkpoint as ck
from train.config import TrainConfig
from train.exit_codes import DiskFullError


def _cfg(tiny, out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), dataset=str(tiny / "data.json"), images=str(tiny / "images"),
                model_path=str(tiny / "model"), compute_dtype="fp32", max_steps=2, save_steps=2,
                vision_lora=None, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _enospc(what: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)


def test_small_sizes_in_the_disk_full_message_name_a_readable_unit(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    monkeypatch.setattr(ck, "free_bytes", lambda _p: 3 * 2**10)
    with pytest.raises(DiskFullError) as e:
        ck.ensure_space(root, 5 * 2**20, keep=1)
    assert "3.00 KiB free" in e.value.message and "5.50 MiB needed" in e.value.message
    assert "0.00 GiB" not in e.value.message


def test_stale_final_tmp_of_a_dead_writer_is_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f"{ck.FINAL_TMP_PREFIX}{dead}").mkdir()
    (tmp_path / f"{ck.FINAL_TMP_PREFIX}{os.getppid()}").mkdir()  # a live writer: left alone
    assert ck.remove_stale_final_tmp(tmp_path) == [f"{ck.FINAL_TMP_PREFIX}{dead}"]
    assert (tmp_path / f"{ck.FINAL_TMP_PREFIX}{os.getppid()}").is_dir()


def test_enospc_while_exporting_final_exit_7_no_partial_left(tiny, tmp_path, monkeypatch):
    """The adapter file is half written when the disk fills: exit 7, failure.json, no .tmp-final-*, no final/,
    checkpoint-2 intact."""
    import train.export as export
    from train.training import run

    real = export.export_final

    def half_then_full(model, cfg, dest, is_main):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
        raise _enospc(str(dest / "adapter_model.safetensors"))

    monkeypatch.setattr(export, "export_final", half_then_full)
    out = tmp_path / "run"
    code, _ = run(_cfg(tiny, out))
    assert code == 7
    assert not list(out.glob(".tmp-final-*")) and not (out / "final").exists()
    f = json.loads((out / "failure.json").read_text())
    assert f["kind"] == "disk_full" and f["exit_code"] == 7 and "final/" in f["message"]
    assert ck.verify(out / "checkpoints" / "checkpoint-2")
    # the resume after space was freed writes final/ and leaves nothing behind
    monkeypatch.setattr(export, "export_final", real)
    code, _ = run(_cfg(tiny, out, resume=True))
    assert code == 0 and ck.verify(out / "final")["step"] == 2
    assert not list(out.glob(".tmp-final-*"))
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "step"] == [1, 2]


def test_enospc_writing_summary_exit_7_no_partial_left(tiny, tmp_path, monkeypatch):
    """The disk fills while summary.json is written: exit 7 (disk_full), no .summary.json.tmp* left."""
    import builtins

    from train.training import run
    from vramplan import contract

    def full_open(path, mode="r", *a, **k):
        if "summary.json" in str(path) and "w" in mode:
            with builtins.open(path, mode, *a, **k) as f:
                f.write("{\n  \"status\"")  # part of it reaches the disk, then it is full
            raise _enospc(str(path))
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(contract, "open", full_open, raising=False)
    out = tmp_path / "run"
    code, _ = run(_cfg(tiny, out))
    assert code == 7
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert not (out / "summary.json").exists()
    assert json.loads((out / "failure.json").read_text())["kind"] == "disk_full"
    assert ck.verify(out / "checkpoints" / "checkpoint-2")


@pytest.mark.slow
def test_resume_at_max_steps_trains_nothing_and_keeps_final(tiny, tmp_path):
    out = tmp_path / "run"
    args = base_args(tiny, out, "--max-steps", "4", "--save-steps", "2")
    p = run_train(args)
    assert p.returncode == 0, p.stderr[-2000:]
    manifest = (out / "final" / ck.MANIFEST).read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    # the checkpoint at max_steps is the newest, final/ verifies and summary.json says ok
    p = run_train([*args, "--resume"])
    assert p.returncode == 0 and "already finished" in p.stderr, p.stderr[-2000:]
    # without the summary the trainer resumes at checkpoint-4, trains no step and keeps final/
    (out / "summary.json").unlink()
    p = run_train([*args, "--resume"])
    assert p.returncode == 0 and "already finished" in p.stderr, p.stderr[-2000:]
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if e["event"] == "step"] == [1, 2, 3, 4]
    assert (out / "final" / ck.MANIFEST).read_bytes() == manifest and ck.verify(out / "final")
    assert [c.name for _s, c in ck.list_checkpoints(out / "checkpoints")] == ["checkpoint-2", "checkpoint-4"]
    again = json.loads((out / "summary.json").read_text())
    assert again["status"] == "ok" and again["steps"] == summary["steps"] == 4
    assert again["final_dir"] == summary["final_dir"]
