"""LLaVA-format dataset: label masking, pad-to-square images, safe truncation.

Record: {"id", "image" (relative to --images; optional), "conversations": [{"from": "human"|"gpt", "value"}...]};
the record rules, chat roles and templates are shared with vramplan (`vramplan.contract`: check_record,
chat_turns, template_segments; llama3 = XTuner llama3_chat, vicuna_v1 = LLaVA conv_vicuna_v1). Only assistant
("gpt") turns are trained on (labels of everything else are -100), like LLaVA's `preprocess_v1` and XTuner's
`template_map_fn` + `encode_fn`. The `<image>` placeholder becomes `image_seq_length` image tokens (LLaVA's
expansion in HF format).
"""

from __future__ import annotations

import json
from pathlib import Path

from train.exit_codes import DatasetError
from vramplan.contract import IMAGE_TOKEN, chat_turns, check_record, template_segments

IGNORE = -100


def validate_record(rec, index: int, images_dir: Path | None) -> None:
    """Raise DatasetError naming the record (index and id) and all its problems when it cannot be trained on."""
    rid = rec.get("id", "?") if isinstance(rec, dict) else "?"
    problems, _ = check_record(rec)
    image = rec.get("image") if isinstance(rec, dict) else None
    if isinstance(image, str) and image:
        if images_dir is None:
            problems.append("has an image but no --images folder was given (pass --images DIR)")
        elif not (images_dir / image).is_file():
            problems.append(f"image {image!r} not found in {images_dir}")
    if problems:
        raise DatasetError(f"dataset record {index} (id {rid!r}): {'; '.join(problems)}",
                           "each record is {'id', 'image', 'conversations'}; "
                           "`vramplan preflight --dataset FILE` lists every bad record")


def load_records(path: str, images: str | None) -> list[dict]:
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
        validate_record(rec, i, img_dir)
    return data


def encode(rec: dict, tokenizer, template: str, image_token_id: int, image_tokens: int, max_length: int,
           index: int = 0) -> dict:
    """input_ids and labels (assistant tokens only). Truncation drops text after the image, never image tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for seg in template_segments(chat_turns(rec), template, tokenizer.bos_token or "<s>"):
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
        img_pos = [i for i, x in enumerate(ids) if x == image_token_id]
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
    """A map-style dataset of encoded records + pixel values (torch Dataset protocol)."""

    def __init__(self, records: list[dict], tokenizer, image_processor, template: str, image_token_id: int,
                 image_tokens: int, max_length: int, images_dir: str | None) -> None:
        self.records, self.tok, self.proc = records, tokenizer, image_processor
        self.template, self.image_token_id, self.image_tokens = template, image_token_id, image_tokens
        self.max_length, self.images_dir = max_length, Path(images_dir) if images_dir else None
        mean = getattr(image_processor, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        self.background = tuple(int(x * 255) for x in mean)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image, UnidentifiedImageError

        rec = self.records[i]
        item = encode(rec, self.tok, self.template, self.image_token_id, self.image_tokens, self.max_length, i)
        if rec.get("image"):
            path = self.images_dir / rec["image"]
            try:
                img = Image.open(path).convert("RGB")
            except (OSError, UnidentifiedImageError) as e:
                raise DatasetError(f"dataset record {i} (id {rec.get('id', '?')!r}): cannot read image {path}: {e}",
                                   "replace or remove the file") from e
            img = expand2square(img, self.background)
            item["pixel_values"] = self.proc(images=img, return_tensors="pt")["pixel_values"][0]
        return item


def collate(batch: list[dict], pad_id: int) -> dict:
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
    if pix:
        out["pixel_values"] = torch.stack(pix)
    return out
