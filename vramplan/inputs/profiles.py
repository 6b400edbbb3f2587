"""Profiles: TOML data files for models, hardware and recipes, validated on load.

Layout: `<profiles dir>/{models,hardware,recipes}/<id>.toml`; the file stem is the id. Every
file has `schema_version = 1`, `kind`, `description`, `source` (where the numbers come from)
and a `[sources]` table citing each key group (see profiles/README.md). Lookup order:
`$VRAMPLAN_PROFILES` (one or more dirs, os.pathsep-separated) > the repo's `profiles/` next to
the package > the copy bundled in the wheel (`vramplan/_profiles`). The first dir holding an id
wins, so a user dir can override a shipped profile.

Nothing is read at import time; each call parses the files it needs (stdlib tomllib). The schema and
the validation of a parsed file are in profile_schema.py.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from pathlib import Path

from vramplan.contract import ContractError, LoraSpec, profile_dirs, tomllib
from vramplan.errors import ProfileError, UsageError
from vramplan.estimate.specs import HardwareSpec, ModelSpec, ProjectorSpec, RecipeSpec, VisionSpec
from vramplan.inputs.profile_schema import KINDS, SCHEMA_VERSION, SCHEMAS, SUBDIR, validate_data  # noqa: F401 (re-exported)


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
    except UnicodeDecodeError:  # a binary file: TOML is UTF-8 text
        raise ProfileError(name, "", "not valid TOML: not UTF-8 text (a binary file?)",
                           "pass a .toml profile (https://toml.io)") from None
    except RecursionError:
        raise ProfileError(name, "", "not valid TOML: nested too deeply", "fix the syntax (https://toml.io)") from None
    except OSError as e:
        raise UsageError(f"{name}: cannot read it ({e.strerror or e})", "check the path and its permissions") from None


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
                      learning_rate=float(data["learning_rate"]),
                      modules_to_save=tuple(data.get("modules_to_save", ())))
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
