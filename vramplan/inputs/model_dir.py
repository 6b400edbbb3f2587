"""A local Hugging Face model dir as a ModelSpec: config.json + safetensors headers, no torch, no network.

Architecture comes from `config.json`, read by the family modules (vramplan/estimate/families/): a
LLaVA config (`text_config` + `vision_config` + the projector) or a decoder alone, by `model_type`.
Missing keys take the defaults transformers would use (LlamaConfig, CLIPVisionConfig, LlavaConfig).

Stored sizes are exact: a safetensors file starts with an 8-byte little-endian header length N and
N bytes of JSON mapping tensor name -> {dtype, shape, data_offsets: [begin, end]}
(https://huggingface.co/docs/safetensors/index#format). We read only these headers, from
`model.safetensors` or from every shard named in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from vramplan.contract import ContractError, require, shown, value_problem
from vramplan.errors import UsageError
from vramplan.estimate.specs import ModelSpec
from vramplan.inputs import hf_cache

# safetensors dtype -> (our name, bytes per element)
ST_DTYPES = {"BF16": ("bf16", 2), "F16": ("fp16", 2), "F32": ("fp32", 4), "F64": ("fp64", 8),
             "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
             "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
             "BOOL": ("bool", 1), "F8_E4M3": ("fp8_e4m3", 1), "F8_E5M2": ("fp8_e5m2", 1)}
TORCH_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
MAX_HEADER = 100 * 2**20  # safetensors caps headers at 100 MB

def read_safetensors_header(path: Path) -> dict:
    """The JSON header of one .safetensors file (tensor name -> dtype/shape/data_offsets)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except FileNotFoundError:
        raise UsageError(f"{path}: missing (an incomplete download?)", "re-download the model files") from None
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{path}: not a valid safetensors file ({str(e)[:200]})", "re-download this file") from None
    return header


def tensor_bytes(header: dict, where: Path) -> dict[str, tuple[str, int]]:
    """tensor name -> (dtype name, stored bytes); checks every entry's types and bytes == numel x itemsize."""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        label = f"tensor {shown(name)}"
        try:
            if not isinstance(info, dict):
                raise ContractError(f"{where}: {label}: must be a JSON object, got {shown(info)}")
            dt = require(info, "dtype", str, str(where), label=f"{label} dtype")
            shape = require(info, "shape", list, str(where), label=f"{label} shape")
            offsets = require(info, "data_offsets", list, str(where), label=f"{label} data_offsets")
            for what, values in (("shape", shape), ("data_offsets", offsets)):
                bad = next((value_problem(v, int, min=0) for v in values if value_problem(v, int, min=0)), None)
                if bad:
                    raise ContractError(f"{where}: {label} {what}: every entry {bad}")
            if len(offsets) != 2 or offsets[0] > offsets[1]:
                raise ContractError(f"{where}: {label} data_offsets: must be [begin, end] with begin <= end, "
                                    f"got {shown(offsets)}")
        except ContractError as e:
            raise UsageError(e.message, "the file is corrupt: re-download it") from None
        ours, item = ST_DTYPES.get(dt, (dt.lower(), 0))
        nbytes = offsets[1] - offsets[0]
        if item and nbytes != math.prod(shape) * item:
            raise UsageError(f"{where}: tensor {name!r} holds {nbytes} bytes but {dt}{shape} needs "
                             f"{math.prod(shape) * item}", "the file is corrupt: re-download it")
        out[name] = (ours, nbytes)
    return out


def safetensors_files(d: Path) -> list[Path]:
    """The weight files of a model dir: the index's shards, or model.safetensors, or any *.safetensors."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = require(json.loads(index.read_text()), "weight_map", dict, str(index))
            if not all(isinstance(f, str) and f and Path(f).name == f for f in weight_map.values()):
                raise ContractError(f"{index}: weight_map: every value must be a file name in this dir")
        except ContractError as e:
            raise UsageError(e.message, "re-download the model files") from None
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"{index}: unreadable index ({e})", "re-download the model files") from None
        return [d / f for f in sorted(set(weight_map.values()))]
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    return sorted(d.glob("*.safetensors"))


def stored_sizes(d: Path, headers: dict | None = None) -> tuple[int | None, dict[str, int]]:
    """(total bytes, bytes by dtype) of the weights, exact from headers; (None, {}) without safetensors.
    `headers` (file name -> header, read from the hub by vramplan/inputs/hub.py) stands in for the files."""
    files = safetensors_files(d)
    if headers is not None:
        files = [d / f for f in sorted(headers)]
    if not files:
        return None, {}
    by: dict[str, int] = {}
    for f in files:
        header = read_safetensors_header(f) if headers is None else headers[f.name]
        if not isinstance(header, dict):
            raise UsageError(f"{f}: cached header is not a JSON object", "delete the vramplan cache and fetch again")
        for dt, n in tensor_bytes(header, f).values():
            by[dt] = by.get(dt, 0) + n
    return sum(by.values()), dict(sorted(by.items()))


def _dtype(cfg: dict, by_dtype: dict[str, int]) -> str:
    tc = cfg.get("text_config")
    td = cfg.get("torch_dtype") or cfg.get("dtype") or (tc.get("torch_dtype") if isinstance(tc, dict) else None)
    if isinstance(td, str) and td in TORCH_DTYPES:
        return TORCH_DTYPES[td]
    floats = {k: v for k, v in by_dtype.items() if k in ("bf16", "fp16", "fp32")}
    return max(floats, key=floats.get) if floats else "bf16"


def load_model_dir(path: str | os.PathLike, headers: dict | None = None, name: str | None = None,
                   local_weights: bool = True) -> ModelSpec:
    """ModelSpec of a local HF dir (LlavaForConditionalGeneration or a decoder alone), exact stored sizes.
    For a hub id (vramplan/inputs/hub.py): `headers` replaces the weight files, `name` is the hub id, and
    without `local_weights` the spec has no path (the weights are still to be downloaded)."""
    d = Path(path).expanduser()
    fix = "pass a local Hugging Face model dir (with config.json) or a profile name (`vramplan profiles`)"
    if not d.exists():
        if looks_like_hub_id(str(path)):
            fix = (f"not a local dir and not in the Hugging Face cache ({hf_cache.hub_cache_dir()}): download it first "
                   f"(huggingface-cli download {path}) or pass its local dir, or a profile name (`vramplan profiles`)")
        raise UsageError(f"--model {path}: no such directory", fix, code="model_not_found")
    if not d.is_dir():
        raise UsageError(f"--model {path}: is a file, not a model directory", fix, code="model_not_found")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"--model {path}: no config.json in this directory",
                         "point --model at the dir that holds config.json and the *.safetensors files")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as e:
        raise UsageError(f"{cfg_path}: unreadable ({e})", "re-download config.json") from None
    where = str(cfg_path)
    try:
        mt = require(cfg, "model_type", str, where, allow_none=True, default=None)
        name_or_path = require(cfg, "_name_or_path", str, where, allow_none=True, default=None)
    except ContractError as e:
        raise UsageError(e.message, "fix or re-download config.json") from None
    hf_id = (name.partition("@")[0] if name else None) or name_or_path or d.name
    total, by_dtype = stored_sizes(d, headers)
    common = dict(name=name or d.name, source=str(cfg_path), path=str(d.resolve()) if local_weights else None,
                  stored_total_bytes=total,
                  stored_bytes_by_dtype=by_dtype, stored_dtype=_dtype(cfg, by_dtype))
    from vramplan.estimate.families import for_model_type, known_model_types, module_for

    hint = ("vramplan derives the VLMs of type " + ", ".join(known_model_types("projector"))
            + " and decoders of type " + ", ".join(known_model_types("text"))
            + " and traces any other causal LM; or use a built-in profile (`vramplan profiles`)")
    vlm_family = for_model_type("projector", mt) if isinstance(mt, str) else None
    if vlm_family is not None:
        processor = read_processor_config(d)
        parts = _parse(lambda c, w: vlm_family.from_hf_config(c, w, processor=processor), cfg, where, hint)
        text_family = module_for(parts.text)
        return ModelSpec(text=parts.text, vision=parts.vision, projector=parts.projector,
                         hf_ids={"llava": hf_id},
                         chat_template=text_family.chat_template(parts.text),
                         image_token_added=parts.image_token_added, **common)
    text_family = for_model_type("text", mt) if isinstance(mt, str) else None
    if text_family is not None:
        text = _parse(text_family.from_hf_config, cfg, where, hint)
        return ModelSpec(text=text, vision=None, projector=None, hf_ids={"llm": hf_id},
                         chat_template=text_family.chat_template(text), image_token_added=False, **common)
    if not isinstance(mt, str) or not mt:
        raise UsageError(f"{where}: no model_type", hint)
    from vramplan.estimate.families import traced  # docs/estimate.md#the-traced-path: vramplan/plan/traced.py

    proc = read_processor_config(d) if isinstance(cfg.get("vision_config"), dict) else None  # a VLM's
    text = traced.pending(json.dumps(cfg, sort_keys=True), mt, json.dumps(proc, sort_keys=True) if proc else "")
    return ModelSpec(text=text, vision=None, projector=None,
                     hf_ids={"llm": hf_id}, image_token_added=False, **common)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def read_processor_config(d: Path) -> dict | None:
    """The image processor's settings: preprocessor_config.json, with processor_config.json's keys over them
    (transformers processing_utils.py reads both; newer repos nest the image processor's under
    "image_processor"). None when the dir has neither; a file that is not a JSON object is a UsageError."""
    out = None
    for name in PROCESSOR_FILES:
        f = d / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"{f}: unreadable ({str(e)[:200]})", f"re-download {name}") from None
        nested = data.get("image_processor")
        out = {**(out or {}), **data, **(nested if isinstance(nested, dict) else {})}
    return out


def _parse(from_hf_config, cfg: dict, where: str, hint: str):
    """A family's from_hf_config(cfg, where); a bad value (ContractError: file and field) or an unsupported
    architecture (ValueError) as a UsageError."""
    try:
        return from_hf_config(cfg, where)
    except ContractError as e:
        raise UsageError(e.message, "fix or re-download config.json") from None
    except ValueError as e:
        raise UsageError(f"{where}: {e}", hint) from None


def looks_like_hub_id(arg: str) -> bool:
    """`org/name` or `org/name@revision`, which is not written like a path."""
    repo = arg.partition("@")[0]
    return repo.count("/") == 1 and not repo.startswith(("/", ".", "~")) and not repo.endswith("/")


def looks_like_path(arg: str) -> bool:
    return os.sep in arg or "/" in arg or arg.startswith((".", "~")) or Path(arg).exists()


def resolve_model(arg: str) -> ModelSpec:
    """`--model` value: a local dir -> load_model_dir; a hub id `org/name[@rev]` -> vramplan/inputs/hub.py (the
    hub, or its cache offline); anything else path-like -> load_model_dir (which says what is missing); else a
    profile id."""
    if not Path(arg).expanduser().exists() and looks_like_hub_id(arg):
        from vramplan.inputs.hub import load_hub_model

        return load_hub_model(arg)
    if looks_like_path(arg):
        return load_model_dir(arg)
    from vramplan.inputs.profiles import load_model

    return load_model(arg)
