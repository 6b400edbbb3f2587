"""The traced path's I/O (docs/estimate.md#the-traced-path): a Job whose model no family module derives (or
any model with --trace) gets its parameter groups and activation peaks from `python -m train.trace_model`,
run as a subprocess (vramplan never imports train/ or torch: docs/contracts.md "Traced step"), its JSON
validated here and cached under the vramplan cache dir by (config, shapes, recipe, library versions).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

from vramplan.contract import (
    TRACE_ERRORS,
    TRACE_REQUEST_SCHEMA,
    TRACE_SCHEMA,
    ContractError,
    require,
    write_json,
)
from vramplan.errors import UsageError, VramplanError
from vramplan.estimate.families import LinearGroup, module_for, targeted
from vramplan.estimate.families.traced import TracedSpec, TracedStep
from vramplan.estimate.types import Quant

MISSING_EXTRA = "this architecture needs the traced path: pip install 'vramplan[train]'"
TRACE_LIBS = ("torch", "transformers", "peft", "bitsandbytes")
ENGINES = {"deepspeed": "deepspeed", "torch": "plain"}  # Strategy.engine -> train/trace.py engine


def wanted(job, o) -> bool:
    """--trace, or a model no family module derives."""
    return bool(o.trace) or job.model.text.family == "traced"


def trace_request(job, train: bool = True) -> dict:
    """The request for the job's shapes and recipe (schema vramplan-trace-request/1). Inference (`train`
    False) needs the parameter groups only: no step is traced."""
    m, r = job.model, job.recipe
    if m.vision is not None:
        raise UsageError(f"--model {m.name}: --trace on a vision-language model a family derives is not done yet "
                         "(a VLM no family knows is traced)", "drop --trace (docs/estimate.md#the-traced-path)")
    spec = job.model.text
    if spec.family == "traced" and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", spec.model_type):
        raise UsageError(f"{job.model.source}: model_type {spec.model_type!r} is no transformers model type",
                         "fix or re-download config.json")
    cfg = json.loads(spec.config_json) if spec.family == "traced" else _config_of(job.model)
    vlm = {}  # a vision-language model's image: its processor config and the planned size
    if spec.family == "traced" and isinstance(cfg.get("vision_config"), dict):
        size = job.model.image_size
        vlm = {"processor": json.loads(spec.processor_json) if spec.processor_json else None,
               "image_size": list(size) if size else None, "images_per_sample": 1,
               "train_projector": bool(r.train_projector and train)}
    if not train:
        return {"schema": TRACE_REQUEST_SCHEMA, "config": cfg, "quant": "none", "double_quant": False,
                "llm_lora": None, "modules_to_save": [], "trainable_dtype": "fp32", "seq_len": 1, "micro_batch": 1,
                "attn": "sdpa", "steps": [], **vlm}
    if job.quant not in (Quant.NF4, Quant.NONE):
        raise UsageError(f"the traced path traces NF4 or unquantized weights, not {job.quant}", "use --quant nf4")
    if not r.llm_lora and not r.train_llm_full:
        raise UsageError(f"--recipe {r.name}: trains no LLM weights of a causal LM", "use --recipe qlora or lora")
    lora = r.llm_lora
    steps = [{"engine": ENGINES[e], "grad_ckpt": gc} for e in ("deepspeed", "torch") if e in job.engines
             and not (e == "deepspeed" and job.device == "cpu") for gc in job.grad_ckpt]
    return {"schema": TRACE_REQUEST_SCHEMA, "config": cfg, "quant": job.quant, "double_quant": r.double_quant,
            "llm_lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout,
                                                   "targets": list(lora.targets)},
            "modules_to_save": list(r.modules_to_save), "trainable_dtype": r.trainable_dtype,
            "seq_len": job.seq_len, "micro_batch": job.micro_batches[0] if len(job.micro_batches) == 1 else 1,
            "attn": "eager" if job.attn == "eager" else "sdpa", "steps": steps, **vlm,
            # only when set: the requests (and their cached traces) of the default stay as they were
            **({"kbit_embed_dtype": r.kbit_embed_dtype} if r.kbit_embed_dtype != "fp32" else {})}


def _config_of(model) -> dict:
    """--trace on a model a family derives: its config.json (a local or cached hub dir)."""
    src = Path(model.source)
    if src.name != "config.json" or not src.is_file():
        raise UsageError(f"--trace: --model {model.name} has no config.json to trace (a built-in profile)",
                         "pass a local Hugging Face model dir or a hub id")
    return json.loads(src.read_text())


def cache_file(req: dict) -> Path:
    from importlib.metadata import PackageNotFoundError, version

    from vramplan.inputs.hub import vramplan_cache_dir

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    train = Path(__file__).resolve().parents[2] / "train"  # the tracer's own code: a change re-traces
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(train.glob("trace*.py")))).hexdigest()
    key = json.dumps({"request": req, "versions": {p: ver(p) for p in TRACE_LIBS}, "code": code}, sort_keys=True)
    return vramplan_cache_dir() / "traces" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def launch(req: dict) -> dict:
    """Run `python -m train.trace_model` on the request; its JSON (an "error" object included)."""
    with tempfile.TemporaryDirectory(prefix="vramplan-trace-") as d:
        req_path, out_path = Path(d) / "request.json", Path(d) / "trace.json"
        write_json(req_path, req)
        env = dict(os.environ)
        root = Path(__file__).resolve().parents[2]  # train/ is installed beside vramplan/ (pyproject packages)
        if (root / "train" / "trace_model.py").is_file():
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
        try:
            p = subprocess.run([sys.executable, "-m", "train.trace_model", str(req_path), str(out_path)],
                               capture_output=True, text=True, env=env)
        except OSError as e:
            raise VramplanError(f"the trace could not start: {e}") from None
        if not out_path.is_file():
            err = p.stderr.strip().splitlines()[-1:] or ["no output"]
            if "No module named" in err[0]:  # train/ itself or what it imports first
                return {"schema": TRACE_SCHEMA, "error": {"kind": "missing_extra", "message": err[0]}}
            return {"schema": TRACE_SCHEMA, "error": {"kind": "failed", "message": err[0][:300]}}
        return json.loads(out_path.read_text())


def _int(obj, key, where, min=0):
    return require(obj, key, int, where, min=min)


def parse(data, where: str) -> dict:
    """Validate a vramplan-trace/1 document (docs/contracts.md "Traced step"); raise ContractError."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: must be a JSON object")
    if require(data, "schema", str, where) != TRACE_SCHEMA:
        raise ContractError(f"{where}: schema must be {TRACE_SCHEMA}, got {data['schema']!r}")
    if "error" in data:
        err = require(data, "error", dict, where)
        require(err, "kind", str, where, label="error.kind", choices=TRACE_ERRORS)
        require(err, "message", str, where, label="error.message")
        return data
    for k in ("model_type", "architecture"):
        require(data, k, str, where)
    dims = require(data, "dims", dict, where)
    for k in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "max_position_embeddings"):
        require(dims, k, int, where, label=f"dims.{k}", min=0)
    require(dims, "tie_word_embeddings", bool, where, label="dims.tie_word_embeddings")
    for i, g in enumerate(require(data, "linears", list, where)):
        lab = f"linears[{i}]"
        if not isinstance(g, dict):
            raise ContractError(f"{where}: {lab}: must be an object")
        require(g, "name", str, where, label=f"{lab}.name")
        for k in ("d_in", "d_out", "count"):
            require(g, k, int, where, label=f"{lab}.{k}", min=1)
        require(g, "bias", bool, where, label=f"{lab}.bias")
        require(g, "component", str, where, label=f"{lab}.component", choices=("llm", "vision", "projector"),
                default="llm")
    other = require(data, "other_params", dict, where)
    for k in ("embed", "lm_head", "norms"):
        require(other, k, int, where, label=f"other_params.{k}", min=0)
    _int(data, "layer_params", where)
    _int(data, "largest_tensor_params", where)
    if not all(isinstance(n, str) for n in require(data, "lora_modules", list, where)):
        raise ContractError(f"{where}: lora_modules: every entry must be a string")
    for i, st in enumerate(require(data, "steps", list, where)):
        lab = f"steps[{i}]"
        if not isinstance(st, dict):
            raise ContractError(f"{where}: {lab}: must be an object")
        require(st, "engine", str, where, label=f"{lab}.engine", choices=tuple(ENGINES.values()))
        require(st, "grad_ckpt", bool, where, label=f"{lab}.grad_ckpt")
        for k, lo in (("micro_batch", 1), ("seq_len", 1), ("saved_bytes", 0), ("transient_bytes", 0)):
            require(st, k, int, where, label=f"{lab}.{k}", min=lo)
        require(st, "peak_phase", str, where, label=f"{lab}.peak_phase")
    require(data, "seconds", float, where, min=0)
    vlm = require(data, "vlm", dict, where, default=None)
    if vlm is not None:
        require(vlm, "image_tokens_per_image", int, where, label="vlm.image_tokens_per_image", min=1)
        size = require(vlm, "image_size", list, where, label="vlm.image_size")
        if len(size) != 2 or not all(isinstance(x, int) and x > 0 for x in size):
            raise ContractError(f"{where}: vlm.image_size must be [height, width]")
    return data


def _error(err: dict, model) -> VramplanError:
    if err["kind"] == "missing_extra":
        return UsageError(MISSING_EXTRA, code="missing_extra")
    if err["kind"] == "unsupported":
        return UsageError(f"--model {model.name}: {err['message']}",
                          "docs/estimate.md#the-traced-path says what the trace builds and what it refuses")
    return VramplanError(f"the trace of --model {model.name} failed: {err['message']}")


def _spec(data: dict, base, cached: str) -> TracedSpec:
    d = data["dims"]
    lin = tuple(LinearGroup(g.get("component", "llm"), g["name"], g["d_in"], g["d_out"], g["bias"], g["count"])
                for g in data["linears"])
    vlm = data.get("vlm") or {}
    steps = tuple(TracedStep(s["engine"], s["grad_ckpt"], s["micro_batch"], s["seq_len"], s["saved_bytes"],
                             s["transient_bytes"], s["peak_phase"]) for s in data["steps"])
    cfg = base.config_json if base.family == "traced" else ""
    return TracedSpec(model_type=data["model_type"], config_json=cfg, architecture=data["architecture"],
                      num_layers=d["num_layers"], hidden_size=d["hidden_size"], vocab_size=d["vocab_size"],
                      num_attention_heads=d["num_attention_heads"], num_key_value_heads=d["num_key_value_heads"],
                      head_dim=d["head_dim"], intermediate_size=d["intermediate_size"],
                      tie_word_embeddings=d["tie_word_embeddings"],
                      max_position_embeddings=d["max_position_embeddings"],
                      linears=lin, other=tuple(sorted(data["other_params"].items())),
                      layer_param_count=data["layer_params"], largest_tensor=data["largest_tensor_params"],
                      lora_modules=tuple(data["lora_modules"]), steps=steps, seconds=float(data["seconds"]),
                      cached=cached, versions=tuple(sorted(data.get("versions", {}).items())),
                      analytic_family="" if base.family == "traced" else base.family,
                      processor_json=getattr(base, "processor_json", ""),
                      image_tokens_per_image=vlm.get("image_tokens_per_image", 0),
                      image_size=tuple(vlm.get("image_size", ())))


def _check_targets(spec: TracedSpec, lora) -> None:
    """vramplan's suffix rule (families.targeted) must pick the Linears PEFT adapted in the trace."""
    ours = sorted({g.name for g in spec.linears if g.component == "llm" and targeted(g, lora.targets)})
    if lora and ours != sorted(spec.lora_modules):
        raise UsageError(f"--lora-targets {','.join(lora.targets)}: PEFT adapts {', '.join(spec.lora_modules)} "
                         f"in this model, vramplan's name rule {', '.join(ours) or 'none'}",
                         "name the Linear modules by their last name part, or use all-linear")


def attach_trace(job, ctx, train: bool = True):
    """The job with its model traced (from the cache when this request was traced before)."""
    req = trace_request(job, train)
    path = cache_file(req)
    data, cached = None, ""
    if path.is_file():
        try:
            data = parse(json.loads(path.read_text()), str(path))
            cached = str(path)
        except (OSError, ValueError, ContractError):
            data = None  # a broken cache entry is traced again
    if data is None:
        t0 = time.time()
        out = launch(req) if all(find_spec(m) for m in TRACE_LIBS) else {
            "schema": TRACE_SCHEMA, "error": {"kind": "missing_extra", "message": "not installed"}}
        try:
            data = parse(out, "train.trace_model output")
        except ContractError as e:
            raise VramplanError(f"the trace's output is not {TRACE_SCHEMA}: {e.message}") from None
        if "error" not in data:
            data["seconds"] = round(max(float(data["seconds"]), time.time() - t0), 2)
        try:  # an "unsupported" answer is cached too: it holds for these library versions
            if data.get("error", {}).get("kind", "unsupported") == "unsupported":
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, data)
        except OSError:
            pass  # an unwritable cache dir: traced again next time
    if "error" in data:
        raise _error(data["error"], job.model)
    spec = _spec(data, job.model.text, cached)
    if job.recipe.llm_lora and train:
        _check_targets(spec, job.recipe.llm_lora)
    ctx.assumptions.append(trace_note(spec, path))
    for note in sorted({n for st in data["steps"] for n in st.get("notes", []) if isinstance(n, str)}):
        ctx.assumptions.append(f"trace: {note}")
    if job.attn == "flash" and spec.steps:
        ctx.assumptions.append("the trace ran SDPA for --attn flash (FlashAttention-2 runs on CUDA only)")
    if job.kbit_saves_inputs and spec.steps:
        ctx.assumptions.append("the trace ran the installed bitsandbytes "
                               f"({dict(spec.versions).get('bitsandbytes', '?')}), not --bnb-version's saved inputs")
    model = replace(job.model, text=spec, chat_template=module_for(spec).chat_template(spec)
                    if job.model.text.family == "traced" else job.model.chat_template)
    return replace(job, model=model)


def trace_note(spec: TracedSpec, path: Path) -> str:
    steps = ", ".join(f"{s.engine} checkpointing {'on' if s.grad_ckpt else 'off'}" for s in spec.steps)
    what = f"traced, not derived: {spec.architecture}'s parameter groups (meta device)"
    if spec.steps:
        what += (f" and activation peaks (whole-step trace: {steps}; micro-batch {spec.steps[0].micro_batch} "
                 "scaled)")
    if spec.image_tokens_per_image:
        h, w = spec.image_size
        what += (f"; {spec.image_tokens_per_image} image tokens per image ({h}x{w} image through the model's own "
                 "image processor and get_image_features), 1 image per sample")
    if spec.analytic_family:
        what += f" instead of the {spec.analytic_family} family's formulas (--trace)"
    if spec.cached:
        return f"{what}; read from the trace cache {path} (traced in {spec.seconds:.1f} s before)"
    return f"{what}; traced in {spec.seconds:.1f} s, cached in {path}: the next estimate of it is instant"


def traced_info(text) -> dict | None:
    """The model's trace, for the JSON output (None: derived by a family module)."""
    if text.family != "traced":
        return None
    return {"architecture": text.architecture, "model_type": text.model_type, "seconds": text.seconds,
            "cached": bool(text.cached), "cache_file": text.cached or None, "instead_of": text.analytic_family or None,
            "image_tokens_per_image": text.image_tokens_per_image or None,
            "image_size": list(text.image_size) or None,
            "steps": [{"engine": s.engine, "grad_ckpt": s.grad_ckpt, "micro_batch": s.micro_batch,
                       "seq_len": s.seq_len, "saved_bytes": s.saved_bytes, "transient_bytes": s.transient_bytes,
                       "peak_phase": s.peak_phase} for s in text.steps]}
