"""Validate a LLaVA-format dataset and measure it (used by `preflight` and `estimate --dataset`).

Format (haotian-liu/LLaVA `LazySupervisedDataset`; the bundled trainer's `train/data.py`):
a JSON list of records `{"id", "image" (path relative to the images folder; optional),
"conversations": [{"from": "human"|"gpt", "value": str}, ...]}`. The turns alternate human/gpt
(starting with human, after an optional leading "system" turn; "user"/"assistant" are accepted as
aliases). A record with an `image` carries exactly one `<image>` placeholder, in its first human
turn; a record without one carries none.

No torch here. Pillow is optional: with it every image is opened and verified
(`Image.verify()`), without it images are only checked for existence and size (the report says so).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.units import fmt_bytes

IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

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
# is 5 special/header tokens (train/data.py template_segments); vicuna_v1's " USER: "/" ASSISTANT:" is similar.
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


def _check_turns(conv) -> tuple[list[str], list[tuple[str, str]]]:
    """Problems with the conversation structure, and the (role, text) turns that could be read."""
    if not isinstance(conv, list) or not conv:
        return ["'conversations' is missing or not a non-empty list"], []
    problems: list[str] = []
    turns: list[tuple[str, str]] = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            problems.append(f"turn {j} needs 'from' (human/gpt) and a string 'value'")
            return problems, turns
        turns.append((ROLES[t["from"]], t["value"]))
    body = turns[1:] if turns[0][0] == "system" else turns
    for j, (role, _) in enumerate(body):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            k = j + (len(turns) - len(body))
            problems.append(f"turn {k} is {conv[k]['from']!r} but the turns must alternate human/gpt "
                            f"starting with human (expected {'human' if want == 'user' else 'gpt'})")
            break
    if not any(r == "assistant" for r, _ in body):
        problems.append("no gpt turn to train on")
    return problems, turns


def _open_image(path: Path) -> str | None:
    """None when Pillow opens and verifies the file, else the error text."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # noqa: BLE001 - any decoder error means the trainer cannot read it
        return f"{type(e).__name__}: {e}"


def scan_dataset(json_path: Path, images_dir: Path | None, *, open_images: bool = True,
                 max_errors: int = 5) -> DatasetReport:
    """Validate every record of a LLaVA-format JSON file and measure it.

    Image paths resolve against `images_dir`, or the JSON file's folder when it is None (noted).
    Raises DatasetError for a file that cannot be read, is not JSON, or is not a list of records.
    """
    json_path = Path(json_path)
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
    if not isinstance(data, list):
        raise DatasetError(f"--dataset {json_path}: the top level is a JSON {type(data).__name__}, not a list of records",
                           "LLaVA format is a JSON list: [{\"id\": ..., \"image\": ..., \"conversations\": [...]}, ...]")

    notes: list[str] = []
    root = Path(images_dir) if images_dir is not None else json_path.parent
    if images_dir is None:
        notes.append(f"no images folder given: image paths resolved against the dataset's folder {root}")
    pil = False
    if open_images:
        try:
            import PIL.Image  # noqa: F401

            pil = True
        except ImportError:
            notes.append("Pillow is not installed: images checked for existence and size only, not opened")
    elif data:
        notes.append("images checked for existence and size only (not opened)")

    errors: list[str] = []
    error_count = 0

    def bad(i: int, rec, problem: str) -> None:
        nonlocal error_count
        error_count += 1
        if len(errors) < max_errors:
            rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
            errors.append(f"record #{i} (id={rid!r}): {problem}")

    if not data:
        bad(0, None, "the dataset has no records")
    chars: list[float] = []
    tokens: list[float] = []
    with_image = found = missing = unreadable = 0
    image_bytes = 0
    seen: set[Path] = set()
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad(i, rec, f"not a JSON object but a {type(rec).__name__}")
            continue
        problems, turns = _check_turns(rec.get("conversations"))
        n_chars = sum(len(v.replace(IMAGE_TOKEN, "")) for _, v in turns)
        chars.append(n_chars)
        tokens.append(math.ceil(n_chars / CHARS_PER_TOKEN) + TEMPLATE_TOKENS_PER_TURN * len(turns) + 1)
        n_img = sum(v.count(IMAGE_TOKEN) for _, v in turns)
        image = rec.get("image")
        if image is not None:
            with_image += 1
            first_user = next((v for r, v in turns if r == "user"), "")
            if not isinstance(image, str) or not image:
                problems.append(f"'image' must be one file name, got {json.dumps(image)[:60]}")
            else:
                if n_img == 0 and turns:
                    problems.append(f"has an image but no {IMAGE_TOKEN} in the text (put one in the first human turn)")
                elif n_img > 1:
                    problems.append(f"has {n_img} {IMAGE_TOKEN} placeholders for one image (exactly one is needed)")
                elif n_img == 1 and IMAGE_TOKEN not in first_user:
                    problems.append(f"its {IMAGE_TOKEN} is not in the first human turn")
                path = Path(image) if Path(image).is_absolute() else root / image
                try:
                    size = path.stat().st_size if path.is_file() else None
                except OSError:
                    size = None
                if size is None:
                    missing += 1
                    problems.append(f"image {image!r} not found in {root}")
                else:
                    found += 1
                    if path not in seen:
                        seen.add(path)
                        image_bytes += size
                    if pil:
                        err = _open_image(path)
                        if err:
                            unreadable += 1
                            problems.append(f"image {image!r} does not open: {err}")
        elif n_img:
            problems.append(f"has {n_img} {IMAGE_TOKEN} in the text but no 'image' field")
        if problems:
            bad(i, rec, "; ".join(problems))

    return DatasetReport(
        path=str(json_path), images_dir=str(root), samples=len(data), with_image=with_image, images_found=found,
        images_missing=missing, images_unreadable=unreadable, image_bytes=image_bytes, images_opened=pil,
        text_chars=_stats(chars), text_tokens=_stats(tokens), error_count=error_count, errors=tuple(errors),
        notes=tuple(notes))
