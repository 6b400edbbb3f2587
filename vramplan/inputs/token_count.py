"""Tokens per dataset record, as the trainer will see them (chat template included, image excluded).

The chat templates are the trainer's own (`vramplan.contract.chat_turns` and `template_segments`, which
train/data.py `encode` tokenizes; tests/estimate/test_token_count.py checks the counts equal the
trainer's input_ids). With a local model dir that has `tokenizer.json`, records are tokenized
exactly with the `tokenizers` library (Rust, no torch); otherwise text is approximated at 4
characters per token (OpenAI's rule of thumb for English BPE) with each template special token
counted as one token.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from vramplan.contract import IMAGE_TOKEN, chat_turns, template_segments
from vramplan.inputs.dataset import CHARS_PER_TOKEN

SPECIAL = re.compile(r"<\|[a-z_]+\|>|</?s>")
MAX_RECORDS = 5000  # records tokenized for the statistics (a deterministic stride sample beyond)


def pieces(record: dict, template: str, bos: str = "<s>") -> list[str]:
    """The record's text pieces as the trainer tokenizes them: each template segment, split at
    `<image>` (whose tokens are counted separately as the model's image tokens)."""
    segs = template_segments(chat_turns(record), template, bos)
    return [p for seg in segs for p in seg.text.split(IMAGE_TOKEN) if p]


def _approx(text: str) -> int:
    specials = SPECIAL.findall(text)
    rest = SPECIAL.sub("", text)
    return len(specials) + math.ceil(len(rest) / CHARS_PER_TOKEN)


def _tokenizer(model_dir: str | None):
    if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - a tokenizer we cannot read falls back to the approximation
        return None


def _bos(model_dir: str | None) -> str:
    try:
        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
        bos = cfg.get("bos_token")
        return (bos.get("content") if isinstance(bos, dict) else bos) or "<s>"
    except (OSError, ValueError, TypeError, AttributeError):
        return "<s>"


def token_stats(json_path: Path, template: str, model_dir: str | None = None) -> dict:
    """{"mean", "max", "p95", "records", "method"} of text tokens per record."""
    try:
        records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(records, list) or not records:
        return {}
    stride = max(1, len(records) // MAX_RECORDS)
    sample = [r for r in records[::stride] if isinstance(r, dict) and isinstance(r.get("conversations"), list)]
    recs = [pieces(r, template, _bos(model_dir)) for r in sample]
    if not recs:
        return {}
    tok = _tokenizer(model_dir)
    if tok is not None:
        flat = [p for ps in recs for p in ps]
        lens = iter(len(e.ids) for e in tok.encode_batch(flat, add_special_tokens=False))
        counts = [sum(next(lens) for _ in ps) for ps in recs]
        method = f"exact ({Path(model_dir) / 'tokenizer.json'})"
    else:
        counts = [sum(_approx(p) for p in ps) for ps in recs]
        method = f"approximate ({CHARS_PER_TOKEN:g} characters per token, template tokens counted)"
    counts.sort()
    return {"mean": sum(counts) / len(counts), "max": counts[-1],
            "p95": counts[min(len(counts) - 1, int(0.95 * len(counts)))], "records": len(counts),
            "sampled": stride > 1, "method": method}
