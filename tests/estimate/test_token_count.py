"""vramplan's token counts equal the trainer's encoded input_ids (minus image tokens), per record."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


@pytest.mark.parametrize("template", ["llama3", "vicuna_v1"])
def test_counts_match_trainer_encoding(tmp_path, template):
    from transformers import AutoTokenizer

    from train.data import encode
    from train.tiny import build
    from vramplan.inputs.token_count import token_stats

    out = build(tmp_path / "t", samples=6, distinct=6)
    records = json.loads((out / "data.json").read_text())
    records.append({"id": "no-image", "conversations": [{"from": "human", "value": "Hello there, how are you?"},
                                                         {"from": "gpt", "value": "Fine."}]})
    (out / "data.json").write_text(json.dumps(records))
    tok = AutoTokenizer.from_pretrained(out / "model")
    lengths = []
    for i, rec in enumerate(records):
        ids = encode(rec, tok, template, image_token_id=-7, image_tokens=5, max_length=10**6, index=i)["input_ids"]
        lengths.append(len([x for x in ids if x != -7]))
    stats = token_stats(out / "data.json", template, str(out / "model"))
    assert stats["method"].startswith("exact")
    assert stats["max"] == max(lengths)
    assert stats["mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_approximation_without_tokenizer(tmp_path):
    from vramplan.inputs.token_count import token_stats

    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"id": 1, "conversations": [{"from": "human", "value": "x" * 400},
                                                          {"from": "gpt", "value": "y" * 40}]}]))
    s = token_stats(p, "llama3", None)
    # 440 characters / 4 + 7 template special tokens; the "\n\n" of the two headers round up with their text
    assert s["method"].startswith("approximate") and 110 <= s["max"] <= 125
