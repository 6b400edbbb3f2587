"""Validate a LLaVA-format dataset and measure it (used by `preflight` and `estimate --dataset`).

Format (haotian-liu/LLaVA `LazySupervisedDataset`; the bundled trainer's `train/data.py`):
a JSON list of records `{"id", "image" (path relative to the images folder; optional),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}`, or with `"messages": [{"role":
"user"|"assistant"|"system", "content": str}, ...]` in place of `conversations` (text-only decoder data in
transformers' chat format). The record rules are the trainer's
(`vramplan.contract.check_record`): turns alternate human/gpt, an `image` has exactly one `<image>`
placeholder in the first human turn, and so on; this module adds the image files and the measurements.

No torch here. Pillow is optional: with it every image is opened and verified
(`Image.verify()`), without it images are only checked for existence and size (the report says so).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vramplan.contract import IMAGE_TOKEN, check_record
from vramplan.errors import UsageError
from vramplan.units import fmt_bytes

# Text tokens are approximated from characters, without loading a tokenizer:
# ~4 characters per token for English text with GPT-style byte-level BPE (OpenAI, "What are tokens and
# how to count them": "one token generally corresponds to ~4 characters of text for common English
# text"). Llama-3 uses a tiktoken-based 128K BPE vocabulary of that family (Meta, "Introducing Meta
# Llama 3", 2024: "a tokenizer with a vocabulary of 128K tokens that encodes language much more
# efficiently"); Llama-2/Vicuna's 32K SentencePiece vocabulary produces more tokens per character, so
# for Vicuna this underestimates by roughly 15% (Meta's "up to 15% fewer tokens" comparison). Non-English
# text and code tokenize denser: treat the number as an estimate, not a count.
CHARS_PER_TOKEN = 4.0
# Chat-template tokens per turn: Llama-3 `<|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>`
# is 5 special/header tokens (vramplan.contract.template_segments); vicuna_v1's " USER: "/" ASSISTANT:" is similar.
TEMPLATE_TOKENS_PER_TURN = 5


class DatasetError(UsageError):
    """The dataset file as a whole cannot be used (unreadable, not JSON, not a list)."""

    default_code = "dataset_invalid"


@dataclass(frozen=True)
class DatasetReport:
    """What `scan_dataset` found. Records with problems are in `errors` (the first `max_errors`
    of `error_count` such records, all problems of a record on its line); file-level problems raise
    DatasetError instead."""

    path: str
    images_dir: str | None  # the folder image paths were resolved against
    samples: int
    with_image: int  # records that have an `image`
    images_found: int  # of those, files that exist
    images_missing: int
    images_unreadable: int  # exist but Pillow cannot open/verify them (0 when not opened)
    image_bytes: int  # total size of the distinct existing image files
    images_opened: bool  # False: Pillow missing or open_images=False (existence and size only)
    text_chars: dict  # per record (all turns, without <image>): mean, p50, p95, max
    text_tokens: dict  # approx. per record incl. template tokens: mean, p50, p95, max (CHARS_PER_TOKEN)
    error_count: int
    errors: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    chars_per_token: float = CHARS_PER_TOKEN
    largest_image: tuple[int, int] | None = None  # (height, width) of the largest image by area (image_sizes=True)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    @property
    def text_tokens_p95(self) -> int:
        return int(self.text_tokens.get("p95", 0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["errors"], d["notes"] = list(self.errors), list(self.notes)
        return d

    def summary(self) -> str:
        """One line: counts and text-length stats."""
        s = (f"{self.samples} samples, {self.with_image} with an image ({self.images_found} found, "
             f"{fmt_bytes(self.image_bytes)}), text ~{self.text_tokens['mean']:.0f} tokens/sample "
             f"(p95 {self.text_tokens['p95']:.0f}, max {self.text_tokens['max']:.0f})")
        return s

    def raise_if_errors(self) -> None:
        """Raise DatasetError naming the first offending records (for commands that must not go on)."""
        if self.errors:
            more = f" (+{self.error_count - len(self.errors)} more)" if self.error_count > len(self.errors) else ""
            raise DatasetError(f"--dataset {self.path}: {self.errors[0]}{more}",
                               "fix or remove the named records; `vramplan preflight --dataset FILE` lists them")


def _stats(values: list[float]) -> dict:
    """mean, p50, p95 (nearest-rank percentiles) and max; zeros for an empty list."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0}
    v = sorted(values)

    def pct(p: float) -> float:
        return float(v[max(0, math.ceil(p / 100 * len(v)) - 1)])

    return {"mean": sum(v) / len(v), "p50": pct(50), "p95": pct(95), "max": float(v[-1])}


def _open_image(path: Path) -> str | None:
    """None when Pillow opens and verifies the file, else the error text."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder error means the trainer cannot read it
        return f"{type(e).__name__}: {e}"


def _read_records(json_path: Path) -> list:
    """The JSON list of records; DatasetError for a file that is unreadable, not JSON or not a list."""
    try:
        raw = json_path.read_bytes()
    except OSError as e:
        raise DatasetError(f"--dataset {json_path}: {e.strerror or e}", "give the path of a LLaVA-format JSON file") \
            from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        hint = "a JSON list of LLaVA records"
        if json_path.suffix == ".jsonl":
            hint += " (JSON Lines is not supported: wrap the records in [ ... ] with commas)"
        raise DatasetError(f"--dataset {json_path}: not valid JSON ({e})", hint) from None
    except RecursionError:  # json's decoder recurses per level: a hostile or broken file, not a dataset
        raise DatasetError(f"--dataset {json_path}: JSON nested too deeply to read (Python's recursion limit, "
                           f"{sys.getrecursionlimit()} levels)",
                           "a LLaVA dataset is a list of flat records, a few levels deep") from None
    if not isinstance(data, list):
        raise DatasetError(
            f"--dataset {json_path}: the top level is a JSON {type(data).__name__}, not a list of records",
            'LLaVA format is a JSON list: [{"id": ..., "image": ..., "conversations": [...]}, ...]',
        )
    return data


def _image_mode(open_images: bool, any_records: bool) -> tuple[bool, list[str]]:
    """(open images with Pillow?, notes saying when they are not)."""
    if not open_images:
        return False, ["images checked for existence and size only (not opened)"] if any_records else []
    try:
        import PIL.Image  # noqa: F401

        return True, []
    except ImportError:
        return False, ["Pillow is not installed: images checked for existence and size only, not opened"]


@dataclass
class _Tally:
    """Counts and problems gathered over the records."""

    max_errors: int
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    chars: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    with_image: int = 0
    found: int = 0
    missing: int = 0
    unreadable: int = 0
    image_bytes: int = 0
    seen: set = field(default_factory=set)
    sizes: bool = False  # read each image's size from its header (Pillow's lazy open decodes no pixels)
    largest: tuple[int, int] | None = None

    def bad(self, i: int, rec, problem: str) -> None:
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
            self.errors.append(f"record #{i} (id={rid!r}): {problem}")


def _image_problems(image: str, root: Path, pil: bool, t: _Tally) -> list[str]:
    """Find (and with Pillow, open) one record's image file; count it."""
    path = Path(image) if Path(image).is_absolute() else root / image
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        t.missing += 1
        return [f"image {image!r} not found in {root}"]
    t.found += 1
    if path not in t.seen:
        t.seen.add(path)
        t.image_bytes += size
        if t.sizes:
            _note_size(path, t)
    err = _open_image(path) if pil else None
    if err:
        t.unreadable += 1
        return [f"image {image!r} does not open: {err}"]
    return []


def _note_size(path: Path, t: _Tally) -> None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - Pillow missing or not an image: no size (the open check reports it)
        return
    if t.largest is None or h * w > t.largest[0] * t.largest[1]:
        t.largest = (h, w)


def _scan_record(i: int, rec, root: Path, pil: bool, t: _Tally) -> None:
    problems, turns = check_record(rec)
    if isinstance(rec, dict):
        n_chars = sum(len(v.replace(IMAGE_TOKEN, "")) for _, v in turns)
        t.chars.append(n_chars)
        t.tokens.append(math.ceil(n_chars / CHARS_PER_TOKEN) + TEMPLATE_TOKENS_PER_TURN * len(turns) + 1)
        image = rec.get("image")
        if image is not None:
            t.with_image += 1
            if isinstance(image, str) and image:
                problems += _image_problems(image, root, pil, t)
    if problems:
        t.bad(i, rec, "; ".join(problems))


def scan_dataset(json_path: Path, images_dir: Path | None, *, open_images: bool = True,
                 max_errors: int = 5, image_sizes: bool = False) -> DatasetReport:
    """Validate every record of a LLaVA-format JSON file and measure it; with `image_sizes`, the largest
    image's (height, width) from the image headers too.

    Image paths resolve against `images_dir`, or the JSON file's folder when it is None (noted).
    Raises DatasetError for a file that cannot be read, is not JSON, or is not a list of records.
    """
    json_path = Path(json_path)
    data = _read_records(json_path)
    root = Path(images_dir) if images_dir is not None else json_path.parent
    notes = [] if images_dir is not None else \
        [f"no images folder given: image paths resolved against the dataset's folder {root}"]
    pil, mode_notes = _image_mode(open_images, bool(data))
    notes += mode_notes
    t = _Tally(max_errors, sizes=image_sizes)
    if not data:
        t.bad(0, None, "the dataset has no records")
    for i, rec in enumerate(data):
        _scan_record(i, rec, root, pil, t)
    return DatasetReport(
        path=str(json_path), images_dir=str(root), samples=len(data), with_image=t.with_image, images_found=t.found,
        images_missing=t.missing, images_unreadable=t.unreadable, image_bytes=t.image_bytes, images_opened=pil,
        text_chars=_stats(t.chars), text_tokens=_stats(t.tokens), error_count=t.error_count, errors=tuple(t.errors),
        notes=tuple(notes), largest_image=t.largest)
