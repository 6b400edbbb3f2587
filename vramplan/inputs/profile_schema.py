"""The profile schema: every key of a model, hardware or recipe TOML with its type, range and choices,
and the validation of one parsed file (pure: no file is read here). Errors name the file and the key.

Model tables take their fields from the family module they name (`family`, default llama / clip):
vramplan/estimate/families/<family>.py PROFILE_FIELDS. profiles/README.md documents the schema.
"""

from __future__ import annotations

import difflib

from vramplan.contract import TEMPLATES, value_problem
from vramplan.errors import ProfileError

SCHEMA_VERSION = 1
SUBDIR = {"model": "models", "llm": "models", "vision": "models", "hardware": "hardware", "recipe": "recipes"}
KINDS = ("model", "llm", "vision", "hardware", "recipe")


def _f(typ, required=True, lo=None, hi=None, choices=None):
    """One schema field: a python type (or tuple), required?, inclusive range, allowed values."""
    return {"type": typ, "required": required, "lo": lo, "hi": hi, "choices": choices}


POS = 1
COMMON = {"schema_version": _f(int, lo=1, hi=1), "kind": _f(str, choices=KINDS), "description": _f(str),
          "source": _f(str), "sources": _f(dict)}


def _family_schema(role: str, family: str | None) -> dict:
    """A [text]/[vision]/[projector] table's schema: the family module's PROFILE_FIELDS plus `family`."""
    from vramplan.estimate.families import family_modules

    mods = {m.__name__.rsplit(".", 1)[1]: m for m in family_modules() if role == m.ROLE}
    fields = mods[family].PROFILE_FIELDS if family in mods else {}
    return {"family": _f(str, False, choices=tuple(sorted(mods))),
            **{k: _f(t, req, lo=lo) for k, (t, req, lo) in fields.items()}}


TEXT = _family_schema("text", "llama")
VISION = _family_schema("vision", "clip")
PROJECTOR = {"kind": _f(str, choices=("mlp2x_gelu", "linear"))}  # LLaVA's (families/llava.py KINDS)
HF_IDS = {"llava": _f(str, False), "llm": _f(str, False), "vision": _f(str, False)}
MODEL = {**COMMON, "stored_dtype": _f(str, False, choices=("bf16", "fp16", "fp32")),
         "chat_template": _f(str, False, choices=TEMPLATES), "image_token_added": _f(bool, False),
         "hf_ids": HF_IDS, "text": TEXT, "vision": VISION, "projector": PROJECTOR}
NUM = (int, float)
HARDWARE = {**COMMON, "vendor": _f(str, choices=("nvidia", "ascend")), "display_name": _f(str),
            "aliases": _f(list, False), "detect_names": _f(list, False),
            "memory_gib": _f(NUM, lo=0.5, hi=4096), "marketed_memory_gb": _f(int, lo=1, hi=4096),
            "bf16_tflops": _f(NUM, lo=0, hi=100000), "fp16_tflops": _f(NUM, lo=0.001, hi=100000),
            "bf16_supported": _f(bool), "hbm_bandwidth_gbps": _f(NUM, lo=1, hi=1e6),
            "host_link_gbps": _f(NUM, lo=0.1, hi=1e5), "interconnect": _f(str),
            "interconnect_gbps": _f(NUM, lo=0, hi=1e5), "compute_capability": _f(str, False),
            "bnb_4bit_supported": _f(bool, False), "pcie_generation": _f(int, False, lo=1, hi=8),
            "gpu_p2p": _f(bool, False), "internode_gbps": _f(NUM, False, lo=0.01, hi=1e5),
            "sm_count": _f(int, False, lo=1, hi=100000)}
LORA = {"r": _f(int, lo=1, hi=65536), "alpha": _f(int, lo=1), "dropout": _f(NUM, lo=0, hi=0.999),
        "targets": _f(list)}
RECIPE = {**COMMON, "quant": _f(str, choices=("nf4", "int8", "none")), "double_quant": _f(bool),
          "compute_dtype": _f(str, choices=("bf16", "fp16", "fp32")), "llm_lora": LORA, "vision_lora": LORA,
          "train_projector": _f(bool), "train_llm_full": _f(bool), "learning_rate": _f(NUM, lo=1e-9, hi=1),
          "epochs": _f(int, lo=1, hi=1000), "micro_batch": _f(int, lo=1, hi=4096),
          "global_batch": _f(int, lo=1, hi=1 << 20), "max_length": _f(int, lo=2, hi=1 << 20),
          "text_tokens": _f(int, lo=1, hi=1 << 20), "gradient_checkpointing": _f(bool),
          "save_steps": _f(int, lo=1), "keep_checkpoints": _f(int, lo=1, hi=1000),
          "optimizer": _f(str, False, choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")),
          "trainable_dtype": _f(str, False, choices=("fp32", "bf16", "peft")), "modules_to_save": _f(list, False),
          "kbit_embed_dtype": _f(str, False, choices=("fp32", "bf16")),
          "weight_decay": _f(NUM, False, lo=0, hi=1), "warmup_ratio": _f(NUM, False, lo=0, hi=1),
          "samples": _f(int, False, lo=0), "dataset_bytes": _f(int, False, lo=0)}
SCHEMAS = {"model": MODEL, "llm": MODEL, "vision": MODEL, "hardware": HARDWARE, "recipe": RECIPE}
OPTIONAL_TABLES = {"hf_ids", "vision", "projector", "llm_lora", "vision_lora"}
# tables that must carry a [sources] entry, per kind (hardware: every number; see _check_sources)
SOURCED_TABLES = {"model": ("text", "vision", "projector"), "llm": ("text",), "vision": ("vision",)}


def _check_table(file: str, data: dict, schema: dict, prefix: str, skip: set[str] = frozenset()) -> None:
    for key, val in data.items():
        path = prefix + key
        if key not in schema or key in skip:
            close = difflib.get_close_matches(key, [k for k in schema if k not in skip], n=1, cutoff=0.6)
            raise ProfileError(file, path, "unknown key", f"did you mean {close[0]!r}?" if close else
                               f"valid keys here: {', '.join(k for k in schema if k not in skip)}")
        spec = schema[key]
        if "type" not in spec:  # a sub-table
            if not isinstance(val, dict):
                raise ProfileError(file, path, f"must be a table ([{path}]), got {type(val).__name__}")
            _check_table(file, val, spec, path + ".")
            continue
        typ = spec["type"]
        kind = float if typ == NUM else typ  # NUM = int or float: any finite number (the shared check)
        problem = value_problem(val, kind, min=spec["lo"], max=spec["hi"], choices=spec["choices"])
        if problem:
            raise ProfileError(file, path, problem)
        if typ is list and not all(isinstance(x, str) and x for x in val):
            raise ProfileError(file, path, "must be a list of non-empty strings")
        if typ is dict and key == "sources" and not all(isinstance(x, str) and x for x in val.values()):
            raise ProfileError(file, path, "every entry must be a non-empty string (a URL or citation)")
    for key, spec in schema.items():
        if key in skip or key in data:
            continue
        if "type" in spec and spec["required"]:
            raise ProfileError(file, prefix + key, "missing required key", "see profiles/README.md for the schema")
        if "type" not in spec and key not in OPTIONAL_TABLES:
            raise ProfileError(file, prefix + key, f"missing required table [{prefix + key}]")


def _check_sources(file: str, data: dict, kind: str) -> None:
    sources = data["sources"]
    for k in sources:
        if k not in data:
            raise ProfileError(file, f"sources.{k}", "cites a key that is not in this file",
                               "each [sources] key names a key or table of this file")
    need = [k for k in SOURCED_TABLES.get(kind, ()) if k in data]
    if kind == "hardware":
        need = [k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "schema_version"]
    for k in need:
        if k not in sources:
            raise ProfileError(file, f"sources.{k}", "missing: every number needs a source",
                               f"add  {k} = \"<URL or citation>\"  under [sources]")


def validate_data(data: dict, file: str, expected_kind: str | None = None) -> str:
    """Check one parsed profile; return its kind. Raises ProfileError naming file and key."""
    kind = data.get("kind")
    if kind is None:
        raise ProfileError(file, "kind", "missing required key", f"one of: {', '.join(KINDS)}")
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise ProfileError(
            file,
            "schema_version",
            f"{data['schema_version']!r} is not supported (this vramplan reads schema_version = {SCHEMA_VERSION})",
            "upgrade vramplan or fix the file",
        )
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        raise ProfileError(file, "kind", f"{kind!r} is not one of {', '.join(KINDS)}",
                           f"did you mean {close[0]!r}?" if close else "")
    if expected_kind and SUBDIR[kind] != SUBDIR[expected_kind]:
        raise ProfileError(file, "kind", f"is {kind!r} but the file is in {SUBDIR[expected_kind]}/")
    skip = set()
    if kind == "llm":
        skip = {"vision", "projector"}
    elif kind == "vision":
        skip = {"text", "projector", "chat_template", "image_token_added"}
    schema = dict(SCHEMAS[kind])
    for table, role in (("text", "text"), ("vision", "vision")):
        if table in schema and isinstance(data.get(table), dict) and "family" in data[table]:
            schema[table] = _family_schema(role, data[table]["family"])
    _check_table(file, data, schema, "", skip)
    if kind == "model" and ("vision" not in data or "projector" not in data):
        missing = "vision" if "vision" not in data else "projector"
        raise ProfileError(file, missing, "a LLaVA model needs [vision] and [projector]",
                           "or set kind = \"llm\" for a language model alone")
    if kind == "vision" and "vision" not in data:
        raise ProfileError(file, "vision", "missing required table [vision]")
    if kind in ("model", "llm"):
        t = data["text"]
        if t["num_attention_heads"] % t["num_key_value_heads"]:
            raise ProfileError(file, "text.num_key_value_heads", "must divide text.num_attention_heads")
        if not t.get("head_dim") and t["hidden_size"] % t["num_attention_heads"]:
            raise ProfileError(file, "text.hidden_size", "must be a multiple of num_attention_heads (or set head_dim)")
    if "vision" in data and data["vision"]["image_size"] % data["vision"]["patch_size"]:
        raise ProfileError(file, "vision.image_size", "must be a multiple of vision.patch_size")
    if kind == "recipe":
        if data["global_batch"] % data["micro_batch"]:
            raise ProfileError(file, "global_batch", "must be a multiple of micro_batch")
        if data["text_tokens"] > data["max_length"]:
            raise ProfileError(file, "text_tokens", "must be <= max_length")
        if data["train_llm_full"] and data["quant"] != "none":
            raise ProfileError(file, "quant", "a full fine-tune needs quant = \"none\"")
    _check_sources(file, data, kind)
    return kind
