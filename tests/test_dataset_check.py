"""scan_dataset: LLaVA-format validation and measurements on datasets built in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.inputs.dataset import CHARS_PER_TOKEN, TEMPLATE_TOKENS_PER_TURN, DatasetError, scan_dataset


def _png(path: Path, size=(24, 16), color=(200, 30, 30)) -> int:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.stat().st_size


def _rec(i, image=None, q="<image>\nDescribe.", a="A red square."):
    r = {"id": f"s{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        r["image"] = image
    return r


def _write(tmp_path: Path, records) -> Path:
    p = tmp_path / "data.json"
    p.write_text(json.dumps(records))
    return p


@pytest.fixture
def good(tmp_path):
    imgs = tmp_path / "images"
    sizes = [_png(imgs / f"{i}.png", size=(20 + i, 10)) for i in range(3)]
    recs = [_rec(i, f"{i}.png") for i in range(3)] + [_rec(3, None, q="Tell a joke.", a="No.")]
    return _write(tmp_path, recs), imgs, sum(sizes)


def test_valid_dataset_counts_and_stats(good):
    path, imgs, total = good
    rep = scan_dataset(path, imgs)
    assert rep.ok and rep.errors == () and rep.error_count == 0
    assert (rep.samples, rep.with_image, rep.images_found, rep.images_missing) == (4, 3, 3, 0)
    assert rep.image_bytes == total and rep.images_opened
    # text chars exclude the <image> placeholder: "\nDescribe." (10) + "A red square." (13) = 23
    assert rep.text_chars["max"] == 23 and rep.text_chars["p50"] == 23
    assert rep.text_chars["mean"] == pytest.approx((23 * 3 + len("Tell a joke.No.")) / 4)
    expected_tokens = -(-23 // CHARS_PER_TOKEN) + 2 * TEMPLATE_TOKENS_PER_TURN + 1
    assert rep.text_tokens["max"] == expected_tokens and rep.text_tokens_p95 == int(expected_tokens)
    assert "4 samples" in rep.summary()
    assert json.loads(json.dumps(rep.to_dict()))["samples"] == 4


def test_same_image_counted_once_for_bytes(tmp_path):
    size = _png(tmp_path / "images" / "a.png")
    rep = scan_dataset(_write(tmp_path, [_rec(0, "a.png"), _rec(1, "a.png")]), tmp_path / "images")
    assert rep.images_found == 2 and rep.image_bytes == size


@pytest.mark.parametrize("records, problem", [
    ([_rec(0, "0.png"), _rec(1, "missing.png")], "record #1 (id='s1'): image 'missing.png' not found"),
    ([_rec(0, "0.png", q="Describe.")], "record #0 (id='s0'): has an image but no <image>"),
    ([_rec(0, "0.png", q="<image><image>\nDescribe.")], "record #0 (id='s0'): has 2 <image> placeholders"),
    ([_rec(0, None)], "record #0 (id='s0'): has 1 <image> in the text but no 'image' field"),
    ([{"id": "x", "image": "0.png", "conversations": [{"from": "gpt", "value": "<image>hi"},
                                                      {"from": "human", "value": "q"}]}],
     "record #0 (id='x'): turn 0 is 'gpt' but the turns must alternate"),
    ([{"id": "y", "conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}],
     "record #0 (id='y'): turn 1 is 'human'"),
    ([{"id": "z"}], "record #0 (id='z'): 'conversations' is missing"),
    ([_rec(0, "0.png"), "not a record"], "record #1 (id='?'): not a JSON object but a str"),
    ([_rec(0, ["0.png", "1.png"], q="<image><image>")], "record #0 (id='s0'): 'image' must be one file name"),
    ([{"id": "w", "image": "0.png", "conversations": [{"from": "human", "value": "q"},
                                                      {"from": "gpt", "value": "a"},
                                                      {"from": "human", "value": "<image>"},
                                                      {"from": "gpt", "value": "b"}]}],
     "record #0 (id='w'): its <image> is not in the first human turn"),
    ([], "record #0 (id='?'): the dataset has no records"),
])
def test_bad_records_are_named(tmp_path, records, problem):
    _png(tmp_path / "images" / "0.png")
    rep = scan_dataset(_write(tmp_path, records), tmp_path / "images")
    assert not rep.ok
    assert any(e.startswith(problem) for e in rep.errors), rep.errors
    with pytest.raises(DatasetError, match="record #"):
        rep.raise_if_errors()


def test_system_turn_and_aliases_are_accepted(tmp_path):
    rec = {"id": 7, "conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "q"},
                                      {"from": "assistant", "value": "a"}]}
    assert scan_dataset(_write(tmp_path, [rec]), None).ok


def test_unreadable_image_fails_only_when_opened(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(b"this is not a png")
    path = _write(tmp_path, [_rec(0, "0.png")])
    rep = scan_dataset(path, tmp_path / "images")
    assert rep.images_unreadable == 1 and "does not open: UnidentifiedImageError" in rep.errors[0]
    quick = scan_dataset(path, tmp_path / "images", open_images=False)
    assert quick.ok and not quick.images_opened and quick.image_bytes == 17
    assert any("not opened" in n for n in quick.notes)


def test_errors_are_capped_but_counted(tmp_path):
    rep = scan_dataset(_write(tmp_path, [_rec(i, f"{i}.png") for i in range(9)]), tmp_path, max_errors=3)
    assert rep.error_count == 9 and len(rep.errors) == 3
    with pytest.raises(DatasetError, match=r"\(\+6 more\)"):
        rep.raise_if_errors()


def test_images_resolve_against_json_folder_without_images_dir(tmp_path):
    _png(tmp_path / "0.png")
    rep = scan_dataset(_write(tmp_path, [_rec(0, "0.png")]), None)
    assert rep.ok and rep.images_found == 1
    assert any("resolved against the dataset's folder" in n for n in rep.notes)


def test_malformed_json_and_non_list(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"id": 1,}')
    with pytest.raises(DatasetError, match=r"bad.json: not valid JSON \(") as ei:
        scan_dataset(p, None)
    assert ei.value.exit_code == 2
    p.write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="top level is a JSON dict, not a list"):
        scan_dataset(p, None)
    with pytest.raises(DatasetError, match="No such file"):
        scan_dataset(tmp_path / "nope.json", None)


def test_without_pillow_checks_existence_only(tmp_path):
    """Pillow blocked in a subprocess: existence and size are still checked, and the report says so."""
    _png(tmp_path / "images" / "0.png")
    path = _write(tmp_path, [_rec(0, "0.png"), _rec(1, "gone.png")])
    code = ("import sys, json; sys.modules['PIL'] = None\n"
            "from vramplan.inputs.dataset import scan_dataset\n"
            f"r = scan_dataset({str(path)!r}, {str(tmp_path / 'images')!r})\n"
            "print(json.dumps(r.to_dict()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    d = json.loads(out)
    assert d["images_opened"] is False and d["images_found"] == 1 and d["images_missing"] == 1
    assert any("Pillow is not installed" in n for n in d["notes"])


def test_no_torch_import():
    code = ("import sys; import vramplan.inputs.dataset\n"
            "bad = [m for m in ('torch', 'transformers', 'PIL') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
