"""The VLM seam: image tokens come from the projector family at the planned image size (`--image-size`, the
largest image of `--dataset`, else the processor's default), and the output says how many
(vramplan/estimate/families/__init__.py, docs/estimate.md#model-families)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vramplan.errors import UsageError
from vramplan.inputs import profiles as P
from vramplan.inputs.model_dir import read_processor_config
from vramplan.plan.image_size import parse_image_size, resolve_image_size
from vramplan.plan.request import EstimateOptions


@pytest.mark.parametrize("text,want", [("672x336", (672, 336)), ("336", (336, 336)), (" 1000 X 700 ", (1000, 700))])
def test_image_size_grammar(text, want):
    assert parse_image_size(text) == want
    assert EstimateOptions(image_size=text).image_size == text


@pytest.mark.parametrize("text", ["0", "336x", "x336", "336x336x3", "big", "-3x4", "70000x10", ""])
def test_bad_image_size_names_the_flag(text):
    with pytest.raises(UsageError, match="--image-size"):
        EstimateOptions(image_size=text)


def test_llava15_tokens_do_not_move_with_the_size():
    m = P.load_model("llava-v1.5-7b")
    assert (m.image_tokens, m.tower_tokens, m.projector_tokens) == (576, 577, 576)
    big = replace(m, image_size=(1000, 700))
    assert (big.image_tokens, big.tower_tokens) == (576, 577)
    notes: list[str] = []
    assert resolve_image_size(EstimateOptions(), m, None, notes).image_size is None and notes == []
    sized = resolve_image_size(EstimateOptions(image_size="1000x700"), m, None, notes)
    assert sized.image_size == (1000, 700) and "576 image tokens" in notes[0] and "577 tokens" in notes[0]


def test_processor_config_files_merge(tmp_path):
    assert read_processor_config(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 336, "size": {"shortest_edge": 336}}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"num_image_tokens": 729,
                                                                "image_processor": {"crop_size": 384}}))
    assert read_processor_config(tmp_path) == {"crop_size": 384, "size": {"shortest_edge": 336},
                                               "num_image_tokens": 729, "image_processor": {"crop_size": 384}}
    (tmp_path / "processor_config.json").write_text("[1]")
    with pytest.raises(UsageError, match="processor_config.json"):
        read_processor_config(tmp_path)
