"""Tokens per dataset record, as the trainer will see them (chat template included, image excluded).

The chat templates are the trainer's own (`vramplan.contract.chat_turns` and `template_segments`, which
train/data.py `encode` tokenizes; tests/estimate/test_token_count.py checks the counts equal the
trainer's input_ids). With a local model dir that has `tokenizer.json`, records are tokenized
exactly with the `tokenizers` library (Rust, no torch); otherwise text is approximated at 4
characters per token (OpenAI's rule of thumb for English BPE) with each template special token
counted as one token. A `messages` record is counted with the same template; the trainer renders it with
the tokenizer's own chat template when it has one (docs/trainer.md "Data"), a few tokens per turn apart.

The longest record sets the plan's sequence length, so it is found over every record, not a sample: a
cheap upper bound per record (its bytes) ranks them and only records whose bound beats the longest
count so far are tokenized. Memory is bounded on huge records (CHUNK_CHARS, MAX_COUNTED_TOKENS).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from vramplan.contract import IMAGE_TOKEN, chat_turns, conversation, template_segments
from vramplan.inputs.dataset import CHARS_PER_TOKEN

SPECIAL = re.compile(r"<\|[a-z_]+\|>|</?s>")
MAX_RECORDS = 5000  # records for the mean and p95 (a deterministic stride sample beyond); the max reads all
CHUNK_CHARS = 1 << 20  # the longest text one tokenizer call sees (bounded memory on huge records)
BATCH = 256  # records per tokenizer call while looking for the longest
MAX_COUNTED_TOKENS = 1_000_000  # a record is counted up to here: longer than any model's max_length


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


def _bound(ps: list[str]) -> int:
    """An upper bound on a record's tokens, without tokenizing: its UTF-8 bytes plus one per piece. A
    byte-level BPE (GPT-2/tiktoken family: Llama 3) never makes more tokens than bytes, and SentencePiece
    with byte fallback (Llama 2, Vicuna) at most one per byte plus its dummy-prefix piece."""
    return sum((len(p) if p.isascii() else len(p.encode("utf-8"))) + 1 for p in ps)


def _chunks(text: str, size: int | None = None):
    """`text` in pieces of at most `size` (CHUNK_CHARS) characters, cut before a space where there is one."""
    size = size or CHUNK_CHARS
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def _count(tok, ps: list[str]) -> int:
    """Tokens of one record's pieces. Memory stays bounded on huge records: a piece longer than
    CHUNK_CHARS is tokenized in whitespace-cut chunks (exact but for merges across a cut: a few tokens in
    a million), and counting stops past MAX_COUNTED_TOKENS (the record is longer than any max_length)."""
    n = 0
    for p in ps:
        if len(p) <= CHUNK_CHARS:
            n += len(tok.encode(p, add_special_tokens=False).ids)
            continue
        for c in _chunks(p):
            n += len(tok.encode(c, add_special_tokens=False).ids)
            if n >= MAX_COUNTED_TOKENS:
                return MAX_COUNTED_TOKENS
    return min(n, MAX_COUNTED_TOKENS)


def _load(json_path: Path) -> list | None:
    try:
        records = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # scan_dataset says what is wrong with the file
        return None
    return records if isinstance(records, list) else None


def _count_many(tok, recs: list[list[str]]) -> list[int]:
    """_count() of several records; records of short pieces go to the tokenizer as one batch (parallel)."""
    small = [ps for ps in recs if all(len(p) <= CHUNK_CHARS for p in ps)]
    flat = [p for ps in small for p in ps]
    lens = iter(len(e.ids) for e in tok.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
    out = []
    for ps in recs:
        big = any(len(p) > CHUNK_CHARS for p in ps)
        out.append(_count(tok, ps) if big else min(sum(next(lens) for _ in ps), MAX_COUNTED_TOKENS))
    return out


def _exact(tok, recs: list[list[str]], sample: list[int]) -> tuple[list[int], int, int]:
    """(counts of the `sample` records, the longest record's count, records tokenized in all).

    The longest is found over every record: records are visited in decreasing order of their cheap bound
    (`_bound`) and tokenized, a batch at a time, until no bound left can beat the longest count so far."""
    counted = dict(zip(sample, _count_many(tok, [recs[i] for i in sample]), strict=True))
    best = max(counted.values(), default=0)
    bounds = [_bound(ps) for ps in recs]
    order = [i for i in sorted(range(len(recs)), key=bounds.__getitem__, reverse=True) if i not in counted]
    k, size = 0, 1  # batches of 1, 2, 4, ... BATCH: the longest is usually among the first few
    while k < len(order) and bounds[order[k]] > best:
        batch = []
        while k < len(order) and bounds[order[k]] > best and len(batch) < size:
            batch.append(order[k])
            k += 1
        size = min(BATCH, 2 * size)
        for i, n in zip(batch, _count_many(tok, [recs[i] for i in batch]), strict=True):
            counted[i] = n
            best = max(best, n)
    return [counted[i] for i in sample], best, len(counted)


def token_stats(json_path: Path, template: str, model_dir: str | None = None) -> dict:
    """{"mean", "max", "p95", "records", "method", "sampled", "tokenized"} of text tokens per record.

    "max" is over every record (the true longest); "mean" and "p95" over all records, or a deterministic
    stride sample of MAX_RECORDS when there are more ("sampled": true). "tokenized": records the
    tokenizer ran on (the sample plus those whose bound could be the longest)."""
    records = _load(json_path)
    if not records:
        return {}
    bos = _bos(model_dir)
    recs = [pieces(r, template, bos) for r in records  # LLaVA `conversations` or `messages` records
            if isinstance(r, dict) and isinstance(conversation(r), list)]
    if not recs:
        return {}
    stride = max(1, len(recs) // MAX_RECORDS)
    sample = list(range(0, len(recs), stride))
    tok = _tokenizer(model_dir)
    if tok is not None:
        counts, longest, tokenized = _exact(tok, recs, sample)
        method = f"exact ({Path(model_dir) / 'tokenizer.json'})"
    else:
        every = [min(sum(_approx(p) for p in ps), MAX_COUNTED_TOKENS) for ps in recs]
        counts, longest, tokenized = [every[i] for i in sample], max(every), 0
        method = f"approximate ({CHARS_PER_TOKEN:g} characters per token, template tokens counted)"
    huge = sum(1 for ps in recs if any(len(p) > CHUNK_CHARS for p in ps))
    if huge and tok is not None:
        method += f"; {huge} record(s) over {CHUNK_CHARS:,} characters tokenized in chunks"
    if longest >= MAX_COUNTED_TOKENS:
        method += f"; the longest counted only up to {MAX_COUNTED_TOKENS:,} tokens"
    counts.sort()
    return {"mean": sum(counts) / len(counts), "max": longest,
            "p95": counts[min(len(counts) - 1, int(0.95 * len(counts)))], "records": len(recs),
            "sampled": stride > 1, "tokenized": tokenized, "method": method}
