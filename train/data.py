"""LLaVA-format and `messages`-format datasets: label masking, pad-to-square images, safe truncation.

Record: {"id", "image" (relative to --images; optional), "conversations": [{"from": "human"|"gpt", "value"}...]},
or {"id", "messages": [{"role": "user"|"assistant"|"system", "content"}...]} (transformers' chat format);
the record rules, chat roles and templates are shared with vramplan (`vramplan.contract`: check_record,
chat_turns, template_segments; llama3 = XTuner llama3_chat, vicuna_v1 = LLaVA conv_vicuna_v1). A `messages`
record is rendered with the tokenizer's own chat template when it has one (`chat_template_segments`). Only assistant
("gpt") turns are trained on (labels of everything else are -100), like LLaVA's `preprocess_v1` and XTuner's
`template_map_fn` + `encode_fn`. The `<image>` placeholder becomes `image_seq_length` image tokens (LLaVA's
expansion in HF format).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from train.exit_codes import DatasetError
from vramplan.contract import IMAGE_TOKEN, Segment, chat_turns, check_record, template_segments

IGNORE = -100
log = logging.getLogger("train")


def validate_record(rec, index: int, images_dir: Path | None, vision: bool = True) -> None:
    """Raise DatasetError naming the record (index and id) and all its problems when it cannot be trained on.
    `vision`: the model has an image tower (a decoder alone trains on text-only records)."""
    rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
    problems, _ = check_record(rec)
    image = rec.get("image") if isinstance(rec, dict) else None
    if image is not None and not vision:
        problems.append("has an image, but the model is a decoder without a vision tower (text-only records)")
    elif isinstance(image, str) and image:
        if images_dir is None:
            problems.append("has an image but no --images folder was given (pass --images DIR)")
        elif not (images_dir / image).is_file():
            problems.append(f"image {image!r} not found in {images_dir}")
    if problems:
        raise DatasetError(f"dataset record {index} (id {rid!r}): {'; '.join(problems)}",
                           "each record is {'id', 'image', 'conversations'} or {'id', 'messages'}; "
                           "`vramplan preflight --dataset FILE` lists every bad record")


def load_records(path: str, images: str | None, vision: bool = True) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise DatasetError(f"--dataset {path}: {e.strerror or e}", "check the path") from e
    except ValueError as e:
        raise DatasetError(f"--dataset {path}: not valid JSON ({e})", "a JSON list of LLaVA records") from e
    if not isinstance(data, list) or not data:
        raise DatasetError(f"--dataset {path}: must be a non-empty JSON list of records", "")
    img_dir = Path(images) if images else None
    for i, rec in enumerate(data):
        validate_record(rec, i, img_dir, vision)
    return data


def chat_template_segments(turns: list[tuple[str, str]], tokenizer) -> list[Segment] | None:
    """The tokenizer's chat template (transformers apply_chat_template) cut into segments: each assistant
    answer (and the end-of-turn text the template puts after it) is trained, the rest masked. The cuts come
    from rendering the conversation up to each answer, with and without it; None when the template cannot
    render the turns or its renderings are not prefixes of one another (the caller falls back to the plan's)."""
    msgs = [{"role": r, "content": t} for r, t in turns]

    def render(m, gen=False):
        return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)

    segs, done = [], ""
    try:
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            head, full = render(msgs[:i], True), render(msgs[:i + 1])
            if not (head.startswith(done) and full.startswith(head)):
                return None
            segs += [Segment(head[len(done):], False), Segment(full[len(head):], True)]
            done = full
        rest = render(msgs)
    except Exception:  # noqa: BLE001 - a template that refuses these roles (jinja raise_exception)
        return None
    if not rest.startswith(done):
        return None
    return [s for s in segs + [Segment(rest[len(done):], False)] if s.text]


_warned: set = set()


def segments(rec: dict, tokenizer, template: str) -> list[Segment]:
    """The record's text segments: a `messages` record through the tokenizer's chat template when it has one,
    everything else (and a template that does not fit, logged once) through the plan's `template`."""
    turns = chat_turns(rec)
    if "messages" in rec and "conversations" not in rec and getattr(tokenizer, "chat_template", None):
        segs = chat_template_segments(turns, tokenizer)
        if segs is not None:
            return segs
        if "template" not in _warned:
            _warned.add("template")
            log.warning("the tokenizer's chat template cannot be cut into turns: using the %s template", template)
    return template_segments(turns, template, tokenizer.bos_token or "<s>")


def encode(rec: dict, tokenizer, template: str, image_token_id: int | None, image_tokens: int, max_length: int,
           index: int = 0) -> dict:
    """input_ids and labels (assistant tokens only). Truncation drops text after the image, never image tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments(rec, tokenizer, template):
        pieces = seg.text.split(IMAGE_TOKEN)
        for k, piece in enumerate(pieces):
            if k > 0:
                ids += [image_token_id] * image_tokens
                labels += [IGNORE] * image_tokens
            if piece:
                t = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += t
                labels += t if seg.train else [IGNORE] * len(t)
    if len(ids) > max_length:
        img_pos = [i for i, x in enumerate(ids) if image_token_id is not None and x == image_token_id]
        if img_pos and img_pos[-1] >= max_length:
            raise DatasetError(
                f"dataset record {index} (id {rec.get('id', '?')!r}): its image tokens end at position "
                f"{img_pos[-1] + 1}, beyond max_length {max_length}",
                "raise --max-length (it counts the image tokens) or shorten the text before <image>")
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def expand2square(img, background: tuple[int, ...]):
    """Pad to a square with the image mean colour, centred (LLaVA/XTuner `expand2square`)."""
    from PIL import Image

    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


class LlavaDataset:
    """A map-style dataset of encoded records + pixel values (torch Dataset protocol). `anyres` (LLaVA-NeXT):
    `image_processor` is the model's processor; an image keeps its aspect (no pad to square) and takes the
    tokens of its anyres grid, counted by the processor's own `<image>` expansion
    (transformers models/llava_next/processing_llava_next.py)."""

    def __init__(self, records: list[dict], tokenizer, image_processor, template: str, image_token_id: int | None,
                 image_tokens: int, max_length: int, images_dir: str | None, anyres: bool = False) -> None:
        self.records, self.tok, self.proc = records, tokenizer, image_processor
        self.template, self.image_token_id, self.image_tokens = template, image_token_id, image_tokens
        self.max_length, self.images_dir = max_length, Path(images_dir) if images_dir else None
        self.anyres = anyres
        mean = getattr(image_processor, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]  # CLIP's
        self.background = tuple(int(x * 255) for x in mean)

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, rec: dict, i: int):
        from PIL import Image, UnidentifiedImageError

        path = self.images_dir / rec["image"]
        try:
            return Image.open(path).convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"dataset record {i} (id {rec.get('id', '?')!r}): cannot read image {path}: {e}",
                               "replace or remove the file") from e

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        img = self._image(rec, i) if rec.get("image") else None
        if img is not None and self.anyres:
            out = self.proc(images=img, text=IMAGE_TOKEN, return_tensors="pt")
            n = int((out["input_ids"] == self.image_token_id).sum())
            item = encode(rec, self.tok, self.template, self.image_token_id, n, self.max_length, i)
            item["pixel_values"], item["image_sizes"] = out["pixel_values"][0], out["image_sizes"][0]
            return item
        item = encode(rec, self.tok, self.template, self.image_token_id, self.image_tokens, self.max_length, i)
        if img is not None:
            img = expand2square(img, self.background)
            item["pixel_values"] = self.proc(images=img, return_tensors="pt")["pixel_values"][0]
        return item


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-padded ids/labels/mask; the images of the records that have one stacked (anyres: their
    patch stacks zero-padded to the longest, which LLaVA-NeXT cuts back by `image_sizes`)."""
    import torch

    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for k, b in enumerate(batch):
        L = len(b["input_ids"])
        ids[k, :L] = torch.tensor(b["input_ids"])
        labels[k, :L] = torch.tensor(b["labels"])
        mask[k, :L] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pix = [b["pixel_values"] for b in batch if "pixel_values" in b]
    if pix and pix[0].dim() == 4:  # anyres: (patches, 3, H, W) per image
        most = max(p.shape[0] for p in pix)
        pix = [torch.cat([p, p.new_zeros((most - p.shape[0], *p.shape[1:]))]) for p in pix]
    if pix:
        out["pixel_values"] = torch.stack(pix)
    sizes = [b["image_sizes"] for b in batch if "image_sizes" in b]
    if sizes:
        out["image_sizes"] = torch.stack(sizes)
    return out
