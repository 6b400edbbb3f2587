"""The traced path's launcher: any architecture transformers builds, measured instead of derived.

    python -m train.trace_model REQUEST.json OUT.json

vramplan writes REQUEST (schema vramplan-trace-request/1: a config.json dict, the recipe's quantization and
LoRA, the shapes, the (engine, checkpointing) steps to trace) and reads OUT (schema vramplan-trace/1), both
described in docs/contracts.md "Traced step". For the model of `config` this writes:
  * its parameter groups, from the model built on the meta device (train/trace_meta.py);
  * per step, the activation and transient peak of the whole-step trace (train/trace.py trace_step) at the
    requested micro-batch and sequence length.
Each step is traced in a child process of its own (tracing several models in one process can crash at a
later garbage collection: tests/trace/isolated.py).
Exit 0; 2 with an "error" object in OUT (kind missing_extra: torch/transformers/peft/bitsandbytes not
importable; unsupported: transformers cannot build a causal LM from this config; failed: the trace raised).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from vramplan.contract import (
    ALL_LINEAR,
    TRACE_ERRORS,
    TRACE_REQUEST_SCHEMA,
    TRACE_SCHEMA,
    ContractError,
    LoraSpec,
    require,
    write_json,
)

FWD_BWD = ("forward", "loss", "loss backward", "backward")
STATES = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer_states", "buffers",
          "inputs")
DROPPED_KEYS = ("quantization_config", "auto_map")  # a pre-quantized checkpoint's settings; remote code


class TraceError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        assert kind in TRACE_ERRORS
        self.kind, self.message = kind, message


def hf_config(d: dict):
    """The transformers config object of a config.json dict (AutoConfig.for_model by model_type)."""
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise TraceError("missing_extra", f"{e}") from None

    d = {k: v for k, v in d.items() if k not in DROPPED_KEYS}
    mt = d.pop("model_type", None)
    if not isinstance(mt, str):
        raise TraceError("unsupported", "config.json has no model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if mt not in CONFIG_MAPPING:
        import difflib

        near = difflib.get_close_matches(mt, list(CONFIG_MAPPING.keys()), n=1)
        raise TraceError("unsupported", f"model_type {mt!r} is unknown to transformers {_versions()['transformers']}"
                                        + (f" (did you mean {near[0]!r}?)" if near else ""))
    try:
        return AutoConfig.for_model(mt, **d)
    except Exception as e:  # noqa: BLE001  (ValueError, huggingface_hub's StrictDataclassClassValidationError...)
        msg = " ".join(str(e).split())[:160]
        raise TraceError("unsupported", f"model_type {mt!r}: transformers cannot read this config ({msg})") from None


def prepare_peft(model, tc):
    """train.model.prepare for any causal LM: k-bit preparation or checkpointing, then LoRA with PEFT's own
    target_modules semantics ("all-linear" or module-name suffixes), trainable weights in fp32 (bf16 for
    pure-bf16 plain PyTorch)."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tc.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        if getattr(tc, "kbit_embed_dtype", "fp32") == "bf16":
            from train.model import cast_embeddings_back

            cast_embeddings_back(model, torch.bfloat16)
    elif tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    if tc.llm_lora is None:  # full fine-tune
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    t = tc.llm_lora.targets
    target = getattr(tc, "vlm_targets", None) or (ALL_LINEAR if ALL_LINEAR in t else list(t))
    lc = LoraConfig(r=tc.llm_lora.r, lora_alpha=tc.llm_lora.alpha, lora_dropout=tc.llm_lora.dropout, bias="none",
                    target_modules=target,
                    modules_to_save=list(tc.modules_to_save) or None)
    try:
        model = get_peft_model(model, lc)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise TraceError("unsupported", f"LoRA targets {','.join(t)}: {str(e).splitlines()[0][:200]}") from None
    want = torch.bfloat16 if tc.trainable_dtype == "bf16" and tc.ds_config is None else torch.float32
    for p in model.parameters():
        if p.requires_grad and p.dtype != want:
            p.data = p.data.to(want)
    return model


def step_peaks(rep: dict) -> dict:
    """The forward/backward activation + transient peak of one trace (benchmarks/trace_step.py's rule):
    the phase where allocated minus the model states, batch and buffers is largest; what autograd saved
    there, and the rest."""
    fb = [(p, rep["phases"][p]) for p in FWD_BWD if p in rep["phases"]]
    phase, top = max(fb, key=lambda x: x[1]["peak"] - sum(x[1][k] for k in STATES))
    act = top["peak"] - sum(top[k] for k in STATES)
    return {"peak_phase": phase, "saved_bytes": top["activations"], "transient_bytes": act - top["activations"],
            "params": rep["params"]}


def trace_one(cfg_dict: dict, req: dict, engine: str, grad_ckpt: bool) -> dict:
    """One traced step (run in its own process by main)."""
    from train import trace_vlm
    from train.trace import TraceJob, trace_step

    vlm = trace_vlm.setup(hf_config(cfg_dict), req, req.get("vlm", {}).get("image_tokens_per_image"))
    lora = req.get("llm_lora")
    spec = LoraSpec(lora["r"], lora["alpha"], lora["dropout"], tuple(lora["targets"])) if lora else None
    job = TraceJob(text={}, hf_config=cfg_dict, quant=req["quant"], double_quant=req["double_quant"],
                   llm_lora=spec, micro_batch=req["micro_batch"], seq=req["seq_len"],
                   images_per_sample=int(req.get("images_per_sample", 1)) if vlm else 0, vlm=vlm,
                   train_projector=bool(req.get("train_projector", True)),
                   grad_ckpt=grad_ckpt, attn=req["attn"], engine=engine,
                   modules_to_save=tuple(req.get("modules_to_save") or ()),
                   trainable_dtype=req.get("trainable_dtype") or "fp32",
                   kbit_embed_dtype=req.get("kbit_embed_dtype") or "fp32")
    t0 = time.time()
    try:
        out = step_peaks(trace_step(job))
    except Exception as e:
        if vlm is None or not trace_vlm.data_dependent(e):
            raise
        raise TraceError("unsupported", trace_vlm.data_dependent_message(job.hf_config["model_type"], e)) from None
    return {"engine": engine, "grad_ckpt": grad_ckpt, "micro_batch": req["micro_batch"], "seq_len": req["seq_len"],
            **out, "attn": job.attn, "notes": list(job.notes), "seconds": round(time.time() - t0, 2)}


def child(arg: str) -> None:
    """A child process's entry: one traced step, or its TraceError, as one '@@' JSON line."""
    try:
        print("@@" + json.dumps({"step": trace_one(*json.loads(arg))}))
    except TraceError as e:
        print("@@" + json.dumps({"error": {"kind": e.kind, "message": e.message}}))


def read_request(path: str) -> dict:
    where = str(path)
    try:
        req = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise TraceError("failed", f"{where}: unreadable ({e})") from None
    try:
        if require(req, "schema", str, where) != TRACE_REQUEST_SCHEMA:
            raise ContractError(f"{where}: schema must be {TRACE_REQUEST_SCHEMA}")
        require(req, "config", dict, where)
        require(req, "quant", str, where, choices=("nf4", "none"))
        require(req, "double_quant", bool, where)
        require(req, "seq_len", int, where, min=1)
        require(req, "micro_batch", int, where, min=1)
        require(req, "attn", str, where, choices=("sdpa", "eager"))
        require(req, "steps", list, where)
        require(req, "llm_lora", dict, where, allow_none=True, default=None)
        # a vision-language model's (optional: a request without them traces a causal LM)
        require(req, "processor", dict, where, allow_none=True, default=None)
        size = require(req, "image_size", list, where, allow_none=True, default=None)
        if size is not None and (len(size) != 2 or not all(isinstance(x, int) and x > 0 for x in size)):
            raise ContractError(f"{where}: image_size must be [height, width] in pixels")
        require(req, "images_per_sample", int, where, min=1, default=1)
        require(req, "train_projector", bool, where, default=True)
    except ContractError as e:
        raise TraceError("failed", e.message) from None
    return req


def _versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "peft", "bitsandbytes")}


def _import_stack() -> None:
    """torch, transformers, peft, bitsandbytes importable, or TraceError missing_extra."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise TraceError("missing_extra", f"{e}") from None


def _child_step(req: dict, st: dict) -> dict:
    """One step traced in a child process (see the module text)."""
    args = json.dumps([req["config"], req, st["engine"], st["grad_ckpt"]])
    p = subprocess.run([sys.executable, "-c", "import sys; from train.trace_model import child; child(sys.argv[1])",
                        args], capture_output=True, text=True)
    if p.returncode != 0 or "@@" not in p.stdout:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise TraceError("failed", last[:300])
    got = json.loads(p.stdout.split("@@", 1)[1])
    if "error" in got:
        raise TraceError(got["error"]["kind"], got["error"]["message"])
    return got["step"]


def run(req: dict) -> dict:
    """The trace document of a request: the config first (cheap: transformers' config classes only), then the
    stack, the meta-device groups, and the steps (the last one in this process, the others in children)."""
    from importlib.util import find_spec

    missing = [m for m in ("torch", "transformers", "peft", "bitsandbytes") if find_spec(m) is None]
    if missing:
        raise TraceError("missing_extra", f"No module named {missing[0]!r}")
    t0 = time.time()
    try:
        import torch  # noqa: F401  (first: transformers imports it anyway)
    except ImportError as e:
        raise TraceError("missing_extra", f"{e}") from None
    cfg = hf_config(req["config"])
    _import_stack()
    from train import trace_vlm
    from train.trace_meta import meta_groups

    vlm = trace_vlm.setup(cfg, req)  # first: what a VLM lacks is said before the meta build
    out = {"schema": TRACE_SCHEMA, **meta_groups(cfg, req.get("llm_lora"), req["quant"]), "versions": _versions(),
           "steps": []}
    if vlm is not None:  # counted once here; each step reuses the count
        out["vlm"] = {"image_size": vlm["image_size"], "image_tokens_per_image": vlm["image_tokens"],
                      "images_per_sample": int(req.get("images_per_sample", 1))}
        req = {**req, "vlm": out["vlm"]}
    steps = req["steps"]
    for i, st in enumerate(steps):
        what = f"tracing engine {st['engine']}, checkpointing {'on' if st['grad_ckpt'] else 'off'}"
        try:
            last = i == len(steps) - 1
            out["steps"].append(trace_one(req["config"], req, st["engine"], st["grad_ckpt"]) if last
                                else _child_step(req, st))
        except TraceError as e:
            raise TraceError(e.kind, f"{what}: {e.message}") from None
    out["seconds"] = round(time.time() - t0, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m train.trace_model REQUEST.json OUT.json", file=sys.stderr)
        return 2
    try:
        out = run(read_request(argv[0]))
    except TraceError as e:
        write_json(argv[1], {"schema": TRACE_SCHEMA, "error": {"kind": e.kind, "message": e.message}})
        print(f"train.trace_model: {e.message}", file=sys.stderr)
        return 2
    write_json(argv[1], out)
    return 0


if __name__ == "__main__":  # through the imported module: one TraceError class for train/trace_*.py
    from train.trace_model import main as _main

    sys.exit(_main())
