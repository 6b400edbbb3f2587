"""Disk that scales with the data (docs/estimate.md#cpu-ram-and-disk): the dataset scaled by --samples,
checkpoints bounded by the saves the run makes, every part's source named."""

from __future__ import annotations

import math

import pytest

from vramplan.estimate.host import checkpoint_saves, checkpoints_on_disk, trainer_steps

from .test_estimate_cli import est, est_json

RECIPE_SAMPLES, RECIPE_BYTES = 665298, 80530000000  # profiles/recipes/qlora.toml


def _train_candidates(*args):
    d = est_json("--gpus", "1x24G", *args)["data"]
    return d, [c for c in d["candidates"] if c["compatible"]]


def test_trainer_steps_and_saves():
    assert trainer_steps(1200, 1, 16) == 75
    assert trainer_steps(1201, 2, 16) == 2 * 76  # the HF Trainer rounds up per epoch
    assert checkpoint_saves(75, 500) == 1  # no save at a multiple of 500: only the one at the last step
    assert checkpoint_saves(75, 10) == 8  # steps 10..70, then the last step (75)
    assert checkpoint_saves(100, 50) == 2  # the last step is a multiple: no extra save
    assert checkpoints_on_disk(2, 1) == 1 and checkpoints_on_disk(2, 8) == 3 and checkpoints_on_disk(2, None) == 3


def test_short_run_is_not_charged_for_saves_it_never_makes():
    d, cands = _train_candidates("--samples", "1200")
    scaled = int(RECIPE_BYTES * 1200 / RECIPE_SAMPLES)
    assert any("1200 samples" in a and "per sample" in a for a in d["assumptions"])
    for c in cands:
        steps = math.ceil(1200 / c["global_batch"])
        assert c["checkpoint_saves"] == math.ceil(steps / 500) == 1
        assert c["checkpoints_on_disk"] == 1
        assert c["disk_breakdown"]["checkpoints"] == c["checkpoint_bytes"]
        assert c["disk_breakdown"]["dataset"] == scaled
        assert c["disk_sources"] == {"base_weights": "assumed", "dataset": "scaled", "checkpoints": "computed",
                                     "final_export": "computed", "logs": "assumed"}
        assert c["disk_bytes"] == sum(c["disk_breakdown"].values())
        assert c["disk_present"] == {}


@pytest.mark.parametrize("save_steps,keep,saves,at_once", [("10", None, 8, 3), ("40", None, 2, 2),
                                                           ("10", "10", 8, 8)])
def test_checkpoints_on_disk_is_min_of_keep_plus_one_and_saves(save_steps, keep, saves, at_once):
    args = ["--samples", "1200", "--save-steps", save_steps] + (["--keep-checkpoints", keep] if keep else [])
    _, cands = _train_candidates(*args)
    for c in cands:
        assert c["global_batch"] == 16  # 75 steps
        assert c["checkpoint_saves"] == saves and c["checkpoints_on_disk"] == at_once
        assert c["disk_breakdown"]["checkpoints"] == at_once * c["checkpoint_bytes"]


def test_full_dataset_on_45gb_does_not_fit():
    d = est_json("--gpus", "1x24G", "--disk", "45GB", code=3)["data"]
    assert d["pick"] is None and d["samples"] == RECIPE_SAMPLES
    fits_but_disk = [c for c in d["candidates"] if c["compatible"] and len(c["reasons"]) == 1]
    assert fits_but_disk and all("disk" in c["reasons"][0] for c in fits_but_disk)
    c = fits_but_disk[0]
    assert c["disk_breakdown"]["dataset"] == RECIPE_BYTES and c["disk_sources"]["dataset"] == "assumed"
    assert c["checkpoints_on_disk"] == 3  # keep 2 + the one being written: the full run saves ~84 times


def test_human_disk_line_names_sources():
    p = est("--gpus", "1x24G", "--samples", "1200", check_code=0)
    line = " ".join(p.stdout.split())  # rich may wrap the line
    assert "Disk:" in line and "dataset 138.52 MiB (scaled)" in line
    assert "(computed: 1 on disk at once of 1 save(s))" in line and "logs 47.68 MiB (assumed)" in line
