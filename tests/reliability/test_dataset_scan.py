"""The dataset scan (issue: "The dataset scan can miss the longest record"): the true longest record over
every record, bounded memory on huge records, exit 2 for JSON nested too deeply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.inputs import token_count

from . import figures

pytest.importorskip("tokenizers")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")


def short(i: int) -> dict:
    return {"id": i, "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "ok"}]}


def one_long_between_stride_points(tmp_path: Path, n: int = 10_001) -> Path:
    """n records (stride 2 for a 5,000 sample): the one long record at index 1, where a stride skips it."""
    records = [short(i) for i in range(n)]
    records[1]["conversations"][1]["value"] = "word " * 300
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    return p


def vramplan(*args):
    return subprocess.run([sys.executable, "-m", "vramplan", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_longest_record_is_found_where_a_stride_sample_skips_it(tiny, tmp_path):
    data = one_long_between_stride_points(tmp_path)
    exact = token_count.token_stats(data, "vicuna_v1", str(tiny / "model"))  # the tiny model's template
    approx = token_count.token_stats(data, "vicuna_v1", None)
    assert exact["sampled"] and exact["max"] > 300 and approx["max"] > 300
    assert exact["tokenized"] < 5010  # the sample and the few records whose bound could be longer
    p = vramplan("estimate", "--model", str(tiny / "model"), "--dataset", str(data), "--device", "cpu",
                 "--gpus", "1x16G", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)["data"]
    assert d["seq_len"] == exact["max"]  # no image in these records: the plan's length is the longest text
    assert any(f"longest record {exact['max']} text tokens" in a for a in d["assumptions"])


def test_bound_ranks_and_the_count_is_the_trainers(tiny, tmp_path):
    """Every record tokenized (few records): the max is the exact maximum, and no bound is below its count."""
    records = [short(i) for i in range(40)]
    for i, n in ((7, 50), (23, 90), (31, 10)):
        records[i]["conversations"][0]["value"] = "ünïcode and words " * n
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "model" / "tokenizer.json"))
    recs = [token_count.pieces(r, "llama3") for r in records]
    counts = [sum(len(tok.encode(x, add_special_tokens=False).ids) for x in ps) for ps in recs]
    assert all(token_count._bound(ps) >= c for ps, c in zip(recs, counts, strict=True))
    assert token_count.token_stats(p, "llama3", str(tiny / "model"))["max"] == max(counts)


def test_huge_record_is_tokenized_in_bounded_chunks(tiny, monkeypatch):
    """A record far longer than CHUNK_CHARS never reaches the tokenizer in one piece (a 1 GB record made
    the tokenizer allocate 16 GiB), and its count stays that of the whole text but for chunk cuts."""
    from tokenizers import Tokenizer

    monkeypatch.setattr(token_count, "CHUNK_CHARS", 10_000)
    tok = Tokenizer.from_file(str(tiny / "model" / "tokenizer.json"))
    seen = []

    class Spy:
        def encode(self, text, add_special_tokens=False):
            seen.append(len(text))
            return tok.encode(text, add_special_tokens=add_special_tokens)

    text = "the quick brown fox jumps " * 4000  # 104,000 characters
    whole = len(tok.encode(text, add_special_tokens=False).ids)
    n = token_count._count(Spy(), [text])
    assert max(seen) <= 10_000 and len(seen) >= 10
    assert abs(n - whole) <= len(seen)
    monkeypatch.setattr(token_count, "MAX_COUNTED_TOKENS", 1000)
    assert token_count._count(Spy(), [text]) == 1000  # counting stops: longer than any max_length


def test_huge_record_in_a_dataset_is_said(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(token_count, "CHUNK_CHARS", 10_000)
    records = [short(i) for i in range(3)]
    records[2]["conversations"][1]["value"] = "many words here " * 2000
    p = tmp_path / "d.json"
    p.write_text(json.dumps(records))
    s = token_count.token_stats(p, "vicuna_v1", str(tiny / "model"))
    assert "1 record(s) over 10,000 characters tokenized in chunks" in s["method"] and s["max"] > 4000


def test_dataset_nested_200000_deep_is_exit_2(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" * 200_000 + "]" * 200_000)
    r = vramplan("estimate", "--dataset", str(p), "--gpus", "1x24G")
    figures.tally("inputs_fuzzed")
    figures.exit_code(r.returncode)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "nested too deeply" in lines[0] and str(p) in lines[0] and "Traceback" not in r.stderr
