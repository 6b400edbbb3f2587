"""`--image-size`: the size of the images a VLM is planned for, which sets its image tokens per image.

The projector family turns (height, width) into the tokens the tower processes and the tokens the image
takes in the LLM's sequence (vramplan/estimate/families/__init__.py, the VLM seam). The size comes from
`--image-size`, else the largest image `--dataset` holds (by area, read from the image headers), else the
processor's default (docs/estimate.md#model-families).
"""

from __future__ import annotations

import re
from dataclasses import replace

from vramplan.errors import UsageError

MAX_SIDE = 65536  # pixels; a larger side is a typo, not an image
_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


def parse_image_size(text: str) -> tuple[int, int]:
    """"672x336" -> (672, 336) as (height, width); "336" -> (336, 336). A bad value names the flag (exit 2)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"--image-size: must be HEIGHTxWIDTH in pixels (e.g. 672x336) or one number for a "
                         f"square, got {text!r}", "e.g. --image-size 672x336 or --image-size 336")
    h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
        raise UsageError(f"--image-size: each side must be 1..{MAX_SIDE} pixels, got {h}x{w}",
                         "e.g. --image-size 672x336")
    return h, w


def size_matters(model) -> bool:
    """Whether the model's image tokens depend on the image size (a --dataset scan reads image headers)."""
    if model.vision is None or model.projector is None:
        return False
    from vramplan.estimate.families import module_for

    return getattr(module_for(model.projector), "IMAGE_SIZE_MATTERS", True)


def default_note(model) -> str:
    """What image_size None stands for: the family's DEFAULT_SIZE_NOTE, else the processor's default size."""
    from vramplan.estimate.families import module_for

    return getattr(module_for(model.projector), "DEFAULT_SIZE_NOTE", "the processor's default size")


def resolve_image_size(o, model, report, assumptions: list[str]):
    """The model with its planned image size: --image-size, else --dataset's largest image (`report`, a
    DatasetReport or None), else the processor's default (image_size None). Says which in `assumptions`."""
    if model.vision is None:  # a VLM no family knows takes --image-size to its trace (plan/traced.py)
        traced = model.text.family == "traced" and o.image_size is not None
        return replace(model, image_size=parse_image_size(o.image_size)) if traced else model
    if o.image_size is not None:
        size, source = parse_image_size(o.image_size), f"--image-size {o.image_size}"
    elif report is not None and report.largest_image is not None and size_matters(model):
        size, source = report.largest_image, "the largest image of --dataset"
    else:
        size, source = None, default_note(model)
        if report is not None and size_matters(model):
            source += "; no image of --dataset could be measured"
    model = replace(model, image_size=size)
    if o.image_size is None and not size_matters(model):
        return model  # LLaVA-1.5 and the like: a fixed resize, nothing to say
    shown = size or model.default_image_size
    at = f"{shown[0]}x{shown[1]} (height x width, {source})" if shown else source
    assumptions.append(f"images: {at}: {model.image_tokens} image tokens per image in the LLM's sequence, "
                       f"{model.tower_tokens} tokens through the vision tower")
    return model


def image_facts(model) -> dict:
    """The image fields of the output's model section (estimate --json, plan.json's estimate)."""
    size = model.image_size or model.default_image_size
    return {"image_tokens": model.image_tokens, "tower_tokens_per_image": model.tower_tokens,
            "image_size": list(size) if size and model.vision is not None else None}
