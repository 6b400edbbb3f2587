"""Profiles: TOML data files for models, hardware and recipes, validated on load.

Layout: `<profiles dir>/{models,hardware,recipes}/<id>.toml`; the file stem is the id. Every
file has `schema_version = 1`, `kind`, `description`, `source` (where the numbers come from)
and a `[sources]` table citing each key group (see profiles/README.md). Lookup order:
`$VRAMPLAN_PROFILES` (one or more dirs, os.pathsep-separated) > the repo's `profiles/` next to
the package > the copy bundled in the wheel (`vramplan/_profiles`). The first dir holding an id
wins, so a user dir can override a shipped profile.

Nothing is read at import time; each call parses the files it needs (stdlib tomllib).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path

from vramplan.contract import TEMPLATES, ContractError, LoraSpec, profile_dirs, tomllib
from vramplan.errors import ProfileError, UsageError
from vramplan.estimate.specs import HardwareSpec, ModelSpec, ProjectorSpec, RecipeSpec, VisionSpec

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

    mods = {m.__name__.rsplit(".", 1)[1]: m for m in family_modules() if m.ROLE == role}
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
            "bnb_4bit_supported": _f(bool, False)}
LORA = {"r": _f(int, lo=1, hi=65536), "alpha": _f(int, lo=1), "dropout": _f(NUM, lo=0, hi=0.999),
        "targets": _f(list)}
RECIPE = {**COMMON, "quant": _f(str, choices=("nf4", "int8", "none")), "double_quant": _f(bool),
          "compute_dtype": _f(str, choices=("bf16", "fp16", "fp32")), "llm_lora": LORA, "vision_lora": LORA,
          "train_projector": _f(bool), "train_llm_full": _f(bool), "learning_rate": _f(NUM, lo=1e-9, hi=1),
          "epochs": _f(int, lo=1, hi=1000), "micro_batch": _f(int, lo=1, hi=4096),
          "global_batch": _f(int, lo=1, hi=1 << 20), "max_length": _f(int, lo=2, hi=1 << 20),
          "text_tokens": _f(int, lo=1, hi=1 << 20), "gradient_checkpointing": _f(bool),
          "save_steps": _f(int, lo=1), "keep_checkpoints": _f(int, lo=1, hi=1000),
          "optimizer": _f(str, False, choices=("adamw_torch", "adamw_8bit", "paged_adamw_8bit")),
          "weight_decay": _f(NUM, False, lo=0, hi=1), "warmup_ratio": _f(NUM, False, lo=0, hi=1),
          "samples": _f(int, False, lo=0), "dataset_bytes": _f(int, False, lo=0)}
SCHEMAS = {"model": MODEL, "llm": MODEL, "vision": MODEL, "hardware": HARDWARE, "recipe": RECIPE}
OPTIONAL_TABLES = {"hf_ids", "vision", "projector", "llm_lora", "vision_lora"}
# tables that must carry a [sources] entry, per kind (hardware: every number; see _check_sources)
SOURCED_TABLES = {"model": ("text", "vision", "projector"), "llm": ("text",), "vision": ("vision",)}


def profiles_dirs() -> list[Path]:
    """Existing profile roots in lookup order (vramplan.contract.profile_dirs: $VRAMPLAN_PROFILES, repo
    profiles/, bundled copy)."""
    try:
        return profile_dirs()
    except ContractError as e:
        raise UsageError(e.message, e.hint) from None


def _index(subdir: str) -> dict[str, Path]:
    """id -> file, first dir wins."""
    found: dict[str, Path] = {}
    for root in profiles_dirs():
        d = root / subdir
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found.setdefault(p.stem, p)
    return found


def list_profiles(kind: str) -> list[str]:
    """Ids of every profile of `kind` ("model", "llm", "vision", "hardware", "recipe"; "models" = all
    files in models/)."""
    sub = SUBDIR.get(kind, kind)
    if sub not in ("models", "hardware", "recipes"):
        raise UsageError(f"unknown profile kind {kind!r}", "one of: model, llm, vision, hardware, recipe")
    ids = sorted(_index(sub))
    if kind in ("model", "llm", "vision"):
        ids = [i for i in ids if _read(_index(sub)[i]).get("kind") == kind]
    return ids


def _read(path: Path) -> dict:
    name = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"{name}: no such file", "check the path") from None
    except IsADirectoryError:
        raise UsageError(f"{name}: is a directory, not a .toml profile", "pass the .toml file") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(name, "", f"not valid TOML: {e}", "fix the syntax (https://toml.io)") from None


def _typename(t) -> str:
    t = t if isinstance(t, tuple) else (t,)
    return " or ".join({int: "integer", float: "number", str: "string", bool: "true/false", list: "list",
                        dict: "table"}[x] for x in t)


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
        ok = isinstance(val, typ) and not (isinstance(val, bool) and typ is not bool and bool not in
                                            (typ if isinstance(typ, tuple) else (typ,)))
        if not ok:
            raise ProfileError(file, path, f"must be {_typename(typ)}, got {val!r}")
        if spec["choices"] and val not in spec["choices"]:
            raise ProfileError(file, path, f"{val!r} is not one of {', '.join(spec['choices'])}")
        if (spec["lo"] is not None and val < spec["lo"]) or (spec["hi"] is not None and val > spec["hi"]):
            raise ProfileError(file, path, f"{val!r} is out of range [{spec['lo']}, {spec['hi']}]")
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
        raise ProfileError(file, "schema_version", f"{data['schema_version']!r} is not supported "
                           f"(this vramplan reads schema_version = {SCHEMA_VERSION})", "upgrade vramplan or fix the file")
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


def _family_spec(table: dict, default_family: str):
    """The family's config dataclass from a [text]/[vision] table (`family` names the module)."""
    import importlib

    mod = importlib.import_module(f"vramplan.estimate.families.{table.get('family', default_family)}")
    return mod.SPEC(**{k: v for k, v in table.items() if k != "family"})


def _to_spec(data: dict, name: str, kind: str):
    src = data["source"]
    if kind == "hardware":
        fields = {k: v for k, v in data.items() if k in HardwareSpec.__dataclass_fields__}
        fields.update(memory_gib=float(data["memory_gib"]))
        return HardwareSpec(name=name, **fields)
    if kind == "recipe":
        def lora(t):
            return LoraSpec(t["r"], t["alpha"], float(t["dropout"]), tuple(t["targets"])) if t else None
        fields = {k: v for k, v in data.items() if k in RecipeSpec.__dataclass_fields__}
        fields.update(llm_lora=lora(data.get("llm_lora")), vision_lora=lora(data.get("vision_lora")),
                      learning_rate=float(data["learning_rate"]))
        return RecipeSpec(name=name, **fields)
    vision = _family_spec(data["vision"], "clip") if "vision" in data and kind != "llm" else None
    if kind == "vision":
        return vision
    text = _family_spec(data["text"], "llama")
    proj = None
    if vision is not None:
        proj = ProjectorSpec(data["projector"]["kind"], vision.hidden_size, text.hidden_size)
    extra = {k: data[k] for k in ("stored_dtype", "chat_template", "image_token_added") if k in data}
    if kind == "llm":
        extra["image_token_added"] = False
    spec = ModelSpec(name=name, source=src, text=text, vision=vision, projector=proj,
                     hf_ids=dict(data.get("hf_ids", {})), **extra)
    # built-in profiles: stored bytes derived from the exact parameter count x the stored dtype
    from vramplan.estimate.params import count_params

    dt = spec.stored_dtype
    stored = count_params(spec).total * {"fp32": 4, "bf16": 2, "fp16": 2}[dt]
    return replace(spec, stored_total_bytes=stored, stored_bytes_by_dtype={dt: stored})


def load_file(path: str | os.PathLike, expected_kind: str | None = None):
    """Parse + validate one profile file; return ModelSpec | HardwareSpec | RecipeSpec | VisionSpec."""
    p = Path(path)
    data = _read(p)
    kind = validate_data(data, str(p), expected_kind)
    return _to_spec(data, p.stem, kind)


def validate_file(path: str | os.PathLike) -> list[str]:
    """Problems with one profile file (empty list = valid). Stops at the first problem per file."""
    try:
        load_file(path)
    except UsageError as e:
        return [e.message + (f" ({e.hint})" if e.hint else "")]
    return []


def _find(kind: str, name: str) -> Path:
    sub = SUBDIR[kind]
    idx = _index(sub)
    if name in idx:
        return idx[name]
    label = {"models": "model", "hardware": "hardware", "recipes": "recipe"}[sub]
    close = difflib.get_close_matches(name, list(idx), n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(close)}? " if close else "") + "`vramplan profiles` lists them"
    if not idx:
        hint = "no profiles found: set VRAMPLAN_PROFILES to a profiles dir, or reinstall vramplan"
    raise UsageError(f"unknown {label} profile {name!r}", hint, code="unknown_profile")


def load_model(name: str) -> ModelSpec:
    """A LLaVA model profile (kind "model") or an LLM alone (kind "llm": vision None)."""
    path = _find("model", name)
    spec = load_file(path, "model")
    if not isinstance(spec, ModelSpec):
        raise UsageError(f"{name!r} is a vision tower alone, not a model to train",
                         "use a LLaVA profile such as llava-llama3-8b-instruct (`vramplan profiles`)")
    return spec


def load_vision(name: str) -> VisionSpec:
    path = _find("vision", name)
    data = _read(path)
    kind = validate_data(data, str(path), "vision")
    if kind == "llm":
        raise UsageError(f"{name!r} has no vision tower", "`vramplan profiles` lists the vision parts")
    return _to_spec(data, path.stem, "vision")


def load_hardware(name: str) -> HardwareSpec:
    return load_file(_find("hardware", name), "hardware")


def load_recipe(name: str) -> RecipeSpec:
    return load_file(_find("recipe", name), "recipe")


def load_raw(kind: str, name: str) -> tuple[Path, dict]:
    """(file, validated parsed TOML) — for `profiles show` (units and sources)."""
    path = _find(kind, name)
    data = _read(path)
    validate_data(data, str(path), kind)
    return path, data


def all_hardware() -> list[HardwareSpec]:
    return [load_hardware(n) for n in sorted(_index("hardware"))]


def hardware_raw() -> dict[str, dict]:
    """id -> parsed TOML for every hardware profile (aliases, detect_names)."""
    out = {}
    for n, p in sorted(_index("hardware").items()):
        d = _read(p)
        validate_data(d, str(p), "hardware")
        out[n] = d
    return out
