"""What vramplan/ and train/ share: exit codes, plan.json, LoRA specs, recipe defaults, chat templates,
dataset record rules, environment-variable names and two file/network helpers (docs/contracts.md).

Standard library only, and no other vramplan module: train/ imports this module and nothing else of
vramplan, so the planner and the trainer read one definition of each thing they must agree on.
"""

from __future__ import annotations

import enum
import fcntl
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ExitCode(enum.IntEnum):
    """Exit codes of every `vramplan` command and of `python -m train` (README "Exit codes")."""

    OK = 0  # success; for `estimate`, at least one candidate fits
    ERROR = 1  # unexpected internal error (a bug: please report it with VRAMPLAN_DEBUG=1)
    USAGE = 2  # bad input: unknown flag/GPU/model, broken profile, missing path, bad plan or dataset record
    NO_FIT = 3  # estimate/plan: no candidate fits the given hardware
    PREFLIGHT_FAILED = 4  # preflight: at least one check FAILed (or WARNed under --strict)
    TRAIN_FAILED = 5  # run: the trainer exited with an error that is not OOM or disk-full
    OUT_OF_MEMORY = 6  # trainer: out of GPU/CPU memory, failure.json written (run --auto: every fallback too)
    DISK_FULL = 7  # trainer: a checkpoint could not be written safely; last verified one kept; failure.json written
    INTERRUPTED = 130  # Ctrl-C / SIGTERM: stopped cleanly at a step boundary, last verified checkpoint kept


class ContractError(ValueError):
    """A shared file (plan, profile) is unusable: one line and a fix hint. Each side turns it into its
    own usage error (exit 2)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


# Environment variables read or set by vramplan and the trainer (README "Environment").
ENV_PROFILES = "VRAMPLAN_PROFILES"  # profile dirs searched first, os.pathsep-separated
ENV_DEBUG = "VRAMPLAN_DEBUG"  # "1": tracebacks for internal errors
ENV_NO_COLOR = "VRAMPLAN_NO_COLOR"  # "1": no colour (also NO_COLOR)
ENV_PROGRESS_INTERVAL = "VRAMPLAN_PROGRESS_INTERVAL"  # seconds between `vramplan run` progress lines
ENV_PREFLIGHT_TIMEOUT = "VRAMPLAN_PREFLIGHT_TIMEOUT"  # seconds for each preflight probe
# test-only switches, ignored unless set (docs/contracts.md "Launch")
ENV_TEST_INJECT_OOM_AT_STEP = "VRAMPLAN_TEST_INJECT_OOM_AT_STEP"  # the trainer raises an OOM at step N
ENV_TEST_INJECT_OOM_ATTEMPTS = "VRAMPLAN_TEST_INJECT_OOM_ATTEMPTS"  # `vramplan run`: only the first K attempts (1)
ENV_TEST_FREE_BYTES = "VRAMPLAN_TEST_FREE_BYTES"  # the trainer's free-space check sees N bytes


def write_json(path: str | os.PathLike, obj) -> None:
    """Atomic: written to a temp file beside `path`, fsynced, then renamed over it (os.replace), so a
    reader never sees half a file and a crash leaves the old one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(obj, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fmt_bytes(n: float | None) -> str:
    """Human size in binary units (KiB/MiB/GiB/TiB), always naming the unit; None (not measured) is 'n/a'.
    vramplan.units re-exports it; the trainer's messages use it too."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# One owner per run dir (docs/run.md "One owner per run dir"): flock(2) locks, released by the kernel
# when their holder dies. `vramplan run` holds VRAMPLAN_LOCK, the trainer's rank 0 holds TRAINER_LOCK.
VRAMPLAN_LOCK = ".vramplan.lock"
TRAINER_LOCK = ".trainer.lock"


def lock_holder(path: str | os.PathLike) -> dict | None:
    """Who holds the lock file `path` ({"pid", "pgid", "command", ...}; {} when unreadable), or None when free."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode())
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}
    finally:
        os.close(fd)


class RunLock:
    """An exclusive flock on a lock file holding its owner's pid, process group and command. `release()`
    (or the end of a `with`) removes the file while still holding it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def update(self, **info) -> None:
        """Add keys to the owner record (e.g. the trainer's process group once it is started)."""
        data = json.loads(os.pread(self.fd, 65536, 0).decode() or "{}")
        data.update(info)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(data).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            Path(self.path).unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_lock(path: str | os.PathLike, owner: str) -> RunLock:
    """Take the lock file `path` (its dir must exist) for this process, `owner` naming it ("vramplan run",
    "trainer"). ContractError naming the holder's pid when another process holds it."""
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = lock_holder(path)
            if who is None:  # released meanwhile: try again
                continue
            raise ContractError(f"{path.parent} is in use by {owner_line(who)} (lock {path.name})",
                                "wait for it to end, or stop it (kill PID) first") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we opened it
            break
        os.close(fd)
    os.ftruncate(fd, 0)  # a file left by a holder that died still holds its record
    lock = RunLock(path, fd)
    argv0 = sys.argv[0]  # `python -m pkg` runs pkg/__main__.py: say it as typed
    argv0 = f"python -m {Path(argv0).parent.name}" if argv0.endswith("__main__.py") else argv0
    lock.update(pid=os.getpid(), pgid=os.getpgid(0), owner=owner, command=" ".join([argv0, *sys.argv[1:]])[:500],
                since_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return lock


def owner_line(who: dict) -> str:
    """'vramplan run (pid 123: python -m vramplan run ...)' for a lock_holder() record."""
    if not who.get("pid"):
        return "another process (pid unknown)"
    return f"{who.get('owner', 'a process')} (pid {who['pid']}: {str(who.get('command', '?'))[:120]})"


# --- validation: one layer for every file planner and trainer read (docs/contracts.md "Validation") ---------
_MISSING = object()
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               dict: "a table (JSON object)", list: "a list"}


def _is_kind(value, kind) -> bool:
    """isinstance, except that a bool is never a number and an int is a number (float)."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def shown(value, width: int = 60) -> str:
    """A value as a message shows it: JSON-ish (null, true), cut to `width` characters."""
    text = {None: "null", True: "true", False: "false"}[value] if isinstance(value, (bool, type(None))) else repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def value_problem(value, kind, *, min=None, max=None, choices=None) -> str | None:
    """What is wrong with `value` as a `kind` (int, float = any finite number, str, bool, dict, list, or a
    tuple of them) within [min, max] and `choices`: "must be an integer >= 1, got -2"; None when fine."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    desc = " or ".join(_KIND_NAMES[k] for k in kinds)
    if min is not None and max is not None:
        desc += f" in [{min}, {max}]"
    elif min is not None:
        desc += f" >= {min}"
    elif max is not None:
        desc += f" <= {max}"
    if not any(_is_kind(value, k) for k in kinds):
        return f"must be {desc}, got {shown(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {shown(value)}"
    if (min is not None and value < min) or (max is not None and value > max):
        return f"must be {desc}, got {shown(value)} (out of range)"
    return None


def require(obj, key: str, kind, where: str, *, label: str | None = None, min=None, max=None,
            choices=None, allow_none: bool = False, default=_MISSING, hint: str = ""):
    """`obj[key]` checked by value_problem; ContractError "WHERE: LABEL: must be an integer >= 1, got -2"
    (LABEL defaults to `key`). A missing key gives `default` (an error without one); null is refused
    unless `allow_none`."""
    name = label or key
    if not isinstance(obj, dict):
        raise ContractError(f"{where}: {name.rpartition('.')[0] or name}: must be a table (JSON object), "
                            f"got {shown(obj)}", hint)
    if key not in obj:
        if default is _MISSING:
            raise ContractError(f"{where}: {name}: missing", hint)
        return default
    value = obj[key]
    if value is None and allow_none:
        return None
    problem = value_problem(value, kind, min=min, max=max, choices=choices)
    if problem:
        raise ContractError(f"{where}: {name}: {problem}", hint)
    return value


# What the trainer can train (one rule for the planner's flags, plan.json and the trainer's flags).
RECIPES = ("qlora", "lora", "pretrain", "full")
QUANTS = ("nf4", "int8", "none")
DTYPES = ("bf16", "fp16", "fp32")
PLAN_DEVICES = ("cuda", "npu", "cpu")
DEVICE_VENDORS = {"cuda": "nvidia", "npu": "ascend"}  # a device kind and the GPU vendor it runs on


# The model families the trainer trains (family module names, vramplan/estimate/families/; for a decoder
# also its config.json model_type, less a "_text" suffix: Gemma 3's "gemma3_text"): a decoder alone through
# AutoModelForCausalLM, a VLM through its transformers class (train/model.py load_base). MoE decoders (mixtral,
# qwen2_moe, qwen3_moe) are planned but not trained: transformers 5 stores their experts as fused 3-D
# parameters (models/mixtral/modeling_mixtral.py MixtralExperts), which LoRA "all-linear" and bitsandbytes
# leave untouched, so the run would not be the plan.
TRAINER_TEXT_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
TRAINER_VLM_FAMILIES = {"llava": ("clip",), "llava_next": ("clip",)}  # projector family -> its vision families
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
FAMILY_KEYS = ("text_family", "vision_family", "projector_family")  # plan.json model.* (None: not recorded)


def family_refusal(model: dict | None, recipe: str = "") -> str | None:
    """Why the trainer cannot train this model (plan.json `model` keys FAMILY_KEYS), or None when it can
    or when the plan does not say (a plan written before the keys existed)."""
    model = model or {}
    text, vision, proj = (model.get(k) for k in FAMILY_KEYS)
    if not text:
        return None
    trains = (f"it trains decoders ({', '.join(TRAINER_TEXT_FAMILIES)}) and LLaVA-1.5/LLaVA-NeXT with CLIP "
              "(docs/trainer.md)")
    if text not in TRAINER_TEXT_FAMILIES:
        why = " (MoE: LoRA and 4-bit do not reach its fused expert weights yet)" if text in MOE_FAMILIES else ""
        return f"the bundled trainer cannot train the {text} family yet{why}; {trains}"
    if vision is None and proj is None:
        if recipe == "pretrain":
            return "recipe pretrain trains a projector: a decoder alone has none (use qlora, lora or full)"
        return None
    if vision not in TRAINER_VLM_FAMILIES.get(proj or "", ()):
        return f"the bundled trainer cannot train a {proj or 'VLM'} with a {vision} tower yet; {trains}"
    return None


def training_refusal(recipe: str, quant: str, train_llm_full: bool, device: str | None = None,
                     vendor: str | None = None, model: dict | None = None) -> tuple[str, str, str] | None:
    """(what, other, why) when the trainer cannot train this combination: `what` and `other` name the two
    settings in conflict ("recipe", "quant", "device", "hardware", "model"); None when it can. On an Ascend NPU
    bitsandbytes has no kernels, so there qlora trains a bf16 LoRA (quant none; train/model.py quant_config).
    `model` holds the model's families (FAMILY_KEYS, family_refusal)."""
    why = family_refusal(model, recipe)
    if why:
        return "model", "recipe", why
    if recipe == "qlora" and quant == "none" and device != "npu":
        return "recipe", "quant", "recipe qlora trains LoRA on a quantized LLM: it needs quant nf4 or int8"
    if train_llm_full and quant != "none":
        return "recipe", "quant", f"a full fine-tune trains the LLM weights themselves: {quant} weights cannot be"
    want = DEVICE_VENDORS.get(device or "")
    if want and vendor in DEVICE_VENDORS.values() and vendor != want:
        return "device", "hardware", f"device {device} runs on {want} hardware, not on {vendor}"
    return None


# plan.json (docs/contracts.md "plan.json")
PLAN_SCHEMA = "vramplan-plan/1"
PLAN_HINT = "write one with `vramplan estimate --save-plan FILE`"
_STR = dict(kind=str, allow_none=True, default=None)
PLAN_FIELDS = {  # section -> {key: require() keywords}; a missing key is allowed, a wrong type is not
    "model": {"profile": _STR, "path": _STR, "llm_path": _STR, "vision_path": _STR, "projector_path": _STR,
              "hf_ids": dict(kind=dict, allow_none=True, default=None),
              "chat_template": dict(kind=str, choices=("llama3", "vicuna_v1"), allow_none=True, default=None),
              **{k: _STR for k in FAMILY_KEYS}},
    "recipe": {"name": dict(kind=str, choices=RECIPES, default=None),
               "quant": dict(kind=str, choices=QUANTS, default=None),
               "compute_dtype": dict(kind=str, choices=DTYPES, default=None),
               **{k: dict(kind=bool, default=None) for k in ("double_quant", "train_projector", "train_llm_full",
                                                               "gradient_checkpointing")},
               "learning_rate": dict(kind=float, min=1e-12, max=10, default=None),
               "weight_decay": dict(kind=float, min=0, max=10, default=None),
               "warmup_ratio": dict(kind=float, min=0, max=1, default=None),
               "lr_scheduler": dict(kind=str, default=None), "optimizer": dict(kind=str, default=None),
               "epochs": dict(kind=float, min=1e-6, max=1e6, default=None),
               "max_steps": dict(kind=int, min=1, allow_none=True, default=None),
               "max_length": dict(kind=int, min=2, default=None),
               "image_tokens": dict(kind=int, min=0, default=None),
               "attn_implementation": dict(kind=str, choices=("sdpa", "eager"), default=None),
               "save_steps": dict(kind=int, min=1, default=None),
               "keep_checkpoints": dict(kind=int, min=1, default=None),
               "dataloader_workers": dict(kind=int, min=0, default=None), "seed": dict(kind=int, default=None)},
    "batch": {k: dict(kind=int, min=1, default=None) for k in ("micro_batch", "grad_accum", "global_batch")},
    "hardware": {"device": dict(kind=str, choices=PLAN_DEVICES, default=None), "gpu_profile": _STR,
                 "gpu_memory_bytes": dict(kind=int, min=0, allow_none=True, default=None),
                 **{k: dict(kind=int, min=1, default=None) for k in ("nodes", "gpus_per_node", "total_gpus")}},
    "strategy": {"zero_stage": dict(kind=int, min=0, max=3, default=None),
                 "offload": dict(kind=str, choices=("none", "optimizer", "optimizer+params"), default=None),
                 "launcher": dict(kind=str, choices=("python", "torchrun", "deepspeed"), default=None)},
    "data": {"dataset": _STR, "images": _STR, "samples": dict(kind=int, min=0, allow_none=True, default=None)},
    "estimate": {**{k: dict(kind=float, min=0, allow_none=True, default=None)
                    for k in ("vram_per_gpu_bytes", "vram_allocated_per_gpu_bytes", "cpu_ram_bytes", "checkpoint_bytes",
                              "disk_bytes", "pinned_cpu_bytes", "time_seconds", "steps")},
                 "disk_breakdown": dict(kind=dict, allow_none=True, default=None)},
    "options": {},
}


def check_plan(plan, where: str) -> dict:
    """`plan` if it is a vramplan plan whose every field the trainer or the launcher reads has the right
    type and range, and that the trainer can train; else ContractError "WHERE: section.key: what is wrong"."""
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
        raise ContractError(f"{where}: not a vramplan plan (schema must be {PLAN_SCHEMA!r})", PLAN_HINT)
    for section, keys in PLAN_FIELDS.items():
        table = require(plan, section, dict, where, default={}, hint=PLAN_HINT)
        for key, kw in keys.items():
            require(table, key, where=where, label=f"{section}.{key}", hint=PLAN_HINT, **kw)
    require(plan, "ds_config", dict, where, allow_none=True, default=None, hint=PLAN_HINT)
    require(plan, "output_dir", str, where, allow_none=True, default=None, hint=PLAN_HINT)
    require(plan, "candidate_index", int, where, min=0, allow_none=True, default=None, hint=PLAN_HINT)
    recipe = plan.get("recipe") or {}
    for key in ("llm_lora", "vision_lora"):
        LoraSpec.from_dict(recipe.get(key), f"{where}: recipe.{key}")
    hw = plan.get("hardware") or {}
    name, quant = recipe.get("name"), recipe.get("quant")  # None: the recipe profile's, judged by the trainer
    full = bool(recipe.get("train_llm_full")) and quant is not None
    refused = training_refusal(name or "", quant or "", full, hw.get("device"), model=plan.get("model"))
    if refused and refused[0] == "model":
        raise ContractError(f"{where}: model {_family_name(plan['model'])}: {refused[2]}",
                            "`vramplan estimate` still plans it; docs/trainer.md lists what the trainer trains")
    if refused and name is not None and quant is not None:
        raise ContractError(f"{where}: recipe.name {name!r} with recipe.quant {quant!r}: {refused[2]}", PLAN_HINT)
    return plan


def _family_name(model: dict) -> str:
    """"llava: llama + clip" or "mistral" (vramplan.estimate.specs.ModelSpec.family's form)."""
    text, vision, proj = (model.get(k) for k in FAMILY_KEYS)
    return f"{proj or 'vlm'}: {text} + {vision}" if vision or proj else str(text)


def read_plan(path: str | os.PathLike) -> dict:
    """A checked plan.json (check_plan) as a dict; ContractError "PATH: what is wrong" for a file that is not one."""
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as e:
        raise ContractError(f"{path}: {e.strerror or e}", PLAN_HINT) from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ContractError(f"{path}: not valid JSON ({str(e)[:200]})", PLAN_HINT) from None
    return plan_paths_here(check_plan(plan, str(path)), Path(os.path.abspath(path)).parent)


# The plan's file and dir paths ((section or None for the top level, key)). In a run dir's plan.json
# those inside the run dir are written "./x" or "../x", relative to the plan file's dir, so a copied or
# moved run dir trains into itself (docs/run.md "Copying or moving a run dir").
PLAN_PATH_KEYS = ((None, "output_dir"), ("data", "dataset"), ("data", "images"), ("model", "path"),
                  ("model", "llm_path"), ("model", "vision_path"), ("model", "projector_path"),
                  ("options", "model"), ("options", "dataset"), ("options", "images"),
                  ("options", "output_dir"), ("options", "calibration"))


def plan_paths_here(plan: dict, plan_dir: str | os.PathLike) -> dict:
    """`plan` with its "./x" and "../x" paths (and ".") made absolute against `plan_dir`; other values as
    they are (absolute paths, hub or profile ids)."""
    out = dict(plan)
    for section, key in PLAN_PATH_KEYS:
        holder = out if section is None else out.get(section)
        value = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(value, str) and (value in (".", "..") or value.startswith(("./", "../"))):
            if section is not None:
                holder = out[section] = dict(holder)
            holder[key] = os.path.normpath(os.path.join(plan_dir, value))
    return out


# The traced path (docs/contracts.md "Traced step"): vramplan writes a request, `python -m train.trace_model
# REQUEST OUT` writes the trace; both are JSON files with these schemas.
TRACE_REQUEST_SCHEMA = "vramplan-trace-request/1"
TRACE_SCHEMA = "vramplan-trace/1"
TRACE_ERRORS = ("missing_extra", "unsupported", "failed")  # the kinds of a trace's "error" object


ALL_LINEAR = "all-linear"  # every nn.Linear except lm_head (XTuner xtuner/model/llava.py find_all_linear_names)


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA adapter (peft LoraConfig r, lora_alpha, lora_dropout, target module-name suffixes)."""

    r: int
    alpha: int
    dropout: float = 0.05
    targets: tuple[str, ...] = (ALL_LINEAR,)  # a str or list is stored as a tuple: "all-linear" -> ("all-linear",)

    def __post_init__(self) -> None:
        t = self.targets
        object.__setattr__(self, "targets", (t,) if isinstance(t, str) else tuple(t))

    @classmethod
    def from_dict(cls, d: dict | None, where: str) -> LoraSpec | None:
        """From a plan or profile table {"r", "alpha", "dropout", "targets"}; None stays None."""
        if d is None:
            return None
        hint = "see docs/contracts.md"
        if not isinstance(d, dict) or "r" not in d or "alpha" not in d:
            raise ContractError(f"{where}: needs r, alpha (ints), dropout, targets (got {shown(d)})", hint)
        r, alpha = (require(d, k, int, where, min=1, hint=hint) for k in ("r", "alpha"))
        dropout = require(d, "dropout", float, where, min=0, max=0.999, default=0.05, hint=hint)
        targets = require(d, "targets", (str, list), where, default=ALL_LINEAR, hint=hint)
        if isinstance(targets, list) and not (targets and all(isinstance(t, str) and t for t in targets)):
            raise ContractError(f"{where}: targets: must be a non-empty list of module names, got {shown(targets)}",
                                hint)
        return cls(r, alpha, float(dropout), targets)


def profile_dirs() -> list[Path]:
    """Existing profile roots in lookup order: $VRAMPLAN_PROFILES (one or more dirs, os.pathsep-separated),
    the repo's profiles/ next to the package, the copy bundled in the wheel (vramplan/_profiles)."""
    pkg = Path(__file__).resolve().parent
    cands = [Path(p).expanduser() for p in os.environ.get(ENV_PROFILES, "").split(os.pathsep) if p.strip()]
    for c in cands:
        if not c.is_dir():
            raise ContractError(f"{ENV_PROFILES}: {c} is not a directory",
                                "point it at a dir holding models/, hardware/ or recipes/, or unset it")
    cands += [pkg.parent / "profiles", pkg / "_profiles"]
    out: list[Path] = []
    for c in cands:
        if c.is_dir() and c.resolve() not in [o.resolve() for o in out]:
            out.append(c)
    return out


# What a recipe profile says about training itself, with the defaults of the optional keys
# (those of vramplan.estimate.specs.RecipeSpec). The batch shape is not here: the planner picks it per
# hardware, and the trainer without a plan uses --micro-batch/--grad-accum (default 1 x 1).
RECIPE_TRAIN_KEYS = ("quant", "double_quant", "compute_dtype", "train_projector", "train_llm_full", "learning_rate",
                     "weight_decay", "warmup_ratio", "optimizer", "epochs", "max_length", "gradient_checkpointing",
                     "save_steps", "keep_checkpoints")
RECIPE_OPTIONAL = {"optimizer": "adamw_torch", "weight_decay": 0.0, "warmup_ratio": 0.03}


def recipe_defaults(name: str) -> dict:
    """The training settings of recipe profile `name` (profiles/recipes/<name>.toml, first profile dir
    holding it), keyed like the trainer's TrainConfig, with llm_lora/vision_lora as LoraSpec or None."""
    path = next((d / "recipes" / f"{name}.toml" for d in profile_dirs() if (d / "recipes" / f"{name}.toml").is_file()),
                None)
    if path is None:
        raise ContractError(f"unknown recipe profile {name!r}", "`vramplan profiles` lists the recipes")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ContractError(f"{path}: {e}", "`vramplan profiles validate` names the problem") from None
    out = {}
    for key in RECIPE_TRAIN_KEYS:
        if key not in data and key not in RECIPE_OPTIONAL:
            raise ContractError(f"{path}: {key}: missing required key", "see profiles/README.md for the schema")
        checked = require(data, key, where=str(path), hint="`vramplan profiles validate` names the problem",
                          **PLAN_FIELDS["recipe"][key])  # the same types and ranges as a plan's recipe
        out[key] = RECIPE_OPTIONAL.get(key) if checked is None else checked
    out["learning_rate"] = float(out["learning_rate"])
    for key in ("llm_lora", "vision_lora"):
        out[key] = LoraSpec.from_dict(data.get(key), f"{path}: {key}")
    return out


# Chat format: LLaVA-format records -> template text pieces, each trained on (assistant answers) or not.
IMAGE_TOKEN = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# LLaVA llava/conversation.py conv_vicuna_v1 system prompt
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATES = ("llama3", "vicuna_v1")


class Segment(NamedTuple):
    text: str
    train: bool  # True: its tokens are labels (an assistant answer); False: masked


def conversation(rec: dict):
    """The record's turns in LLaVA form ([{"from", "value"}]); a `messages` record ([{"role", "content"}], the
    chat format of transformers' apply_chat_template) is read the same way. Not a list: returned as it is."""
    if "conversations" in rec or "messages" not in rec:
        return rec.get("conversations")
    msgs = rec["messages"]
    if not isinstance(msgs, list):
        return msgs
    return [{"from": m.get("role"), "value": m.get("content")} if isinstance(m, dict) else m for m in msgs]


def chat_turns(rec: dict) -> list[tuple[str, str]]:
    """(role, text) per turn of a record. A record with an image but no <image> gets one in front of its
    first user turn, where LLaVA puts the image (LLaVA llava/train/train.py preprocess_multimodal)."""
    conv = conversation(rec)
    turns = [(ROLES.get(str(t.get("from", "")).lower(), "user"), str(t.get("value", "")))
             for t in (conv if isinstance(conv, list) else []) if isinstance(t, dict)]
    if rec.get("image") and not any(IMAGE_TOKEN in v for _, v in turns):
        first = next((i for i, (r, _) in enumerate(turns) if r == "user"), None)
        if first is not None:
            turns[first] = (turns[first][0], f"{IMAGE_TOKEN}\n{turns[first][1]}")
    return turns


def template_segments(turns: list[tuple[str, str]], template: str, bos: str = "<s>") -> list[Segment]:
    """Turns -> text segments with a train flag.
    llama3:    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>
               <|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>
               (XTuner xtuner/utils/templates.py PROMPT_TEMPLATE.llama3_chat)
    vicuna_v1: {bos}{system} USER: {q} ASSISTANT: {a}</s>   (LLaVA llava/conversation.py conv_vicuna_v1)
    """
    segs: list[Segment] = []
    if template == "llama3":
        segs.append(Segment("<|begin_of_text|>", False))
        for role, text in turns:
            head = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            if role == "assistant":
                segs += [Segment(head, False), Segment(f"{text}<|eot_id|>", True)]
            else:
                segs.append(Segment(f"{head}{text}<|eot_id|>", False))
        return segs
    system = next((t for r, t in turns if r == "system"), VICUNA_SYSTEM)
    segs.append(Segment(f"{bos}{system}", False))
    for role, text in turns:
        if role == "user":
            segs.append(Segment(f" USER: {text} ASSISTANT:", False))
        elif role == "assistant":
            segs.append(Segment(f" {text}</s>", True))
    return segs


def _turn_problems(conv, messages: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """Problems with the conversation structure, and the (role, text) turns that could be read. `messages`:
    the record is in `messages` form (the problems name its keys and roles)."""
    key, frm, val, user, bot = (("messages", "role", "content", "user", "assistant") if messages
                                else ("conversations", "from", "value", "human", "gpt"))
    if not isinstance(conv, list) or not conv:
        return [f"'{key}' is missing or not a non-empty list"], []
    turns: list[tuple[str, str]] = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or t.get("from") not in ROLES or not isinstance(t.get("value"), str):
            return [f"turn {j} needs '{frm}' ({user}/{bot}/system) and a string '{val}'"], turns
        turns.append((ROLES[t["from"]], t["value"]))
    problems: list[str] = []
    lead = 1 if turns[0][0] == "system" else 0
    for j, (role, _) in enumerate(turns[lead:]):
        want = "user" if j % 2 == 0 else "assistant"
        if role != want:
            k = j + lead
            problems.append(f"turn {k} is {conv[k]['from']!r} but the turns must alternate {user}/{bot} "
                            f"starting with {user} (expected {user if want == 'user' else bot})")
            break
    if not any(r == "assistant" for r, _ in turns[lead:]):
        problems.append(f"no assistant ('{bot}') turn to train on")
    return problems, turns


def check_record(rec) -> tuple[list[str], list[tuple[str, str]]]:
    """(problems, readable turns) of one LLaVA-format record (the file named by `image` is not looked at).

    Rules (haotian-liu/LLaVA LazySupervisedDataset format): a JSON object whose `conversations` alternate
    human/gpt, starting with human after an optional leading "system" turn ("user"/"assistant" are aliases),
    with at least one gpt turn; a record with an `image` (one file name) has exactly one <image>, in its first
    human turn; a record without one has none. A `messages` record ([{"role": "user"|"assistant"|"system",
    "content": str}]) follows the same rules (`conversation`).
    """
    if not isinstance(rec, dict):
        return [f"not a JSON object but a {type(rec).__name__}"], []
    problems, turns = _turn_problems(conversation(rec), "conversations" not in rec and "messages" in rec)
    n_img = sum(v.count(IMAGE_TOKEN) for _, v in turns)
    image = rec.get("image")
    if image is None:
        if n_img:
            problems.append(f"has {n_img} {IMAGE_TOKEN} in the text but no 'image' field")
    elif not isinstance(image, str) or not image:
        problems.append(f"'image' must be one file name, got {json.dumps(image)[:60]}")
    elif n_img == 0 and turns:
        problems.append(f"has an image but no {IMAGE_TOKEN} in the text (put one in the first human turn)")
    elif n_img > 1:
        problems.append(f"has {n_img} {IMAGE_TOKEN} placeholders for one image (exactly one is needed)")
    elif n_img == 1 and IMAGE_TOKEN not in next((v for r, v in turns if r == "user"), ""):
        problems.append(f"its {IMAGE_TOKEN} is not in the first human turn")
    return problems, turns
