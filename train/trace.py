"""A whole training step of the bundled trainer, traced at real size on CPU without computing anything.

`trace_step(job)` builds the model the trainer trains (transformers' Llama/LLaVA classes, bitsandbytes NF4
Linear4bit, peft LoRA via train.model.prepare, gradient checkpointing as the trainer enables it) under
torch's FakeTensorMode, runs two micro-steps and the optimizer step under train.trace_mem.MemTracker, and
returns the peak per phase, split by component (docs/estimate.md#checked-against-reality).

What is traced: the model code, peft, bitsandbytes' autograd functions, the loss (transformers
loss_utils.py ForCausalLMLoss), gradient checkpointing, HF Trainer's compute_loss (the model output is
dropped before backward: transformers trainer.py compute_loss/training_step).
What is emulated, as torch ops with the same allocations:
  * engine "deepspeed" (what vramplan's ZeRO-0 plan runs): DeepSpeed 0.19.8 casts the module to bf16
    (runtime/engine.py _configure_distributed_model), flattens the bf16 gradients in buckets of 5e8
    elements for the all-reduce at the accumulation boundary (engine.py buffered_allreduce_fallback), and
    FP16_Optimizer (runtime/fp16/fused_optimizer.py step) makes fp32 copies of the gradients, flattens
    them, drops the bf16 ones, and FusedAdam steps the fp32 flat master (exp_avg, exp_avg_sq: fp32).
  * engine "plain" (HF Trainer without DeepSpeed): torch.autocast(bf16) around the forward (accelerate),
    torch.optim.AdamW(foreach=True) as on CUDA, model weights as the trainer leaves them.
  * bitsandbytes gemm_4bit on CUDA dequantizes the weight into a temporary [N, K] buffer (plus fp32
    absmax) above 512 rows on sm90; its fake implementation hides that, so the op is replaced by the
    same dequant ops (csrc ops.cu gemm_4bit_inference dispatch; bitsandbytes backends/cuda/ops.py).
What a trace cannot see: memory inside kernels (cuBLAS workspace, FlashAttention's fp32 dq accumulator),
allocator fragmentation and reserved memory, the CUDA context, NCCL buffers.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from train.trace_mem import MemTracker

SKIP_QUANT_LLAVA = ("model.vision_tower", "model.multi_modal_projector", "lm_head")  # train.model.SKIP_QUANT
DS_ALLREDUCE_BUCKET = 500_000_000  # DeepSpeed engine allreduce bucket (elements), runtime/engine.py
DEQUANT_ROWS = 512  # bitsandbytes gemm_4bit dequantizes above this many rows on sm90 (H100/H200)


@dataclass
class TraceJob:
    """One training configuration. `text`/`vision` are transformers config kwargs of the decoder (its
    `model_type`; with a vision tower, Llama) and of CLIPVisionConfig; `hf_config` (a config.json dict) instead
    builds any AutoModelForCausalLM (train/trace_model.py)."""

    text: dict
    vision: dict | None = None
    quant: str = "nf4"  # nf4 | none
    double_quant: bool = True
    llm_lora: object = None  # vramplan.contract.LoraSpec
    vision_lora: object = None
    train_projector: bool = True
    micro_batch: int = 1
    seq: int = 2048
    images_per_sample: int = 1
    grad_ckpt: bool = True
    attn: str = "sdpa"
    engine: str = "deepspeed"  # deepspeed (ZeRO-0 bf16, emulated) | plain (HF Trainer + torch AdamW)
    fake: bool = True  # False: the same program on real CPU tensors (reduced sizes only)
    dequant_rows: int = DEQUANT_ROWS
    notes: list = field(default_factory=list)
    hf_config: dict | None = None
    modules_to_save: tuple = ()  # peft modules_to_save (embed_tokens, lm_head)
    trainable_dtype: str = "fp32"  # the trained weights' dtype under plain PyTorch (train.model.prepare)
    kbit_embed_dtype: str = "fp32"  # bf16: k-bit's frozen embeddings + lm_head cast back (train.model.prepare)
    model_type: str = "llama"  # the decoder's config.json model_type (text-only jobs: any AutoModelForCausalLM)
    vlm: dict | None = None  # hf_config of a VLM: image_tokens, image_token, tensors (train/trace_vlm.py)


def _config(job: TraceJob):
    from transformers import AutoConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

    if job.hf_config is not None:
        from train.trace_model import hf_config

        return hf_config(job.hf_config), (job.vlm or {}).get("image_tokens", 0)
    if job.vision is None:
        return AutoConfig.for_model(job.model_type, **job.text), 0
    text = LlamaConfig(**job.text)
    v = CLIPVisionConfig(**job.vision)
    n_img = (v.image_size // v.patch_size) ** 2
    return LlavaConfig(vision_config=v, text_config=text, image_token_index=text.vocab_size - 1,
                       image_seq_length=n_img, vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu"), n_img


def build(job: TraceJob, fake_mode):
    """The model as train.model.load_base + prepare leave it (quantized LLM, LoRA, checkpointing)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from train.model import prepare
    from train.trace_fake import adopt_fake_tensors, quantize_linears

    cfg, _ = _config(job)
    if job.hf_config is not None:  # any architecture: transformers' auto class, PEFT's own target rules
        from transformers import AutoModelForCausalLM

        from train.trace_meta import head_name
        from train.trace_model import prepare_peft as prepare

        make = AutoModelForCausalLM.from_config
        if job.vlm is not None:
            from train import trace_vlm

            make = trace_vlm.build_meta
    else:
        make = (LlavaForConditionalGeneration if job.vision is not None
                else MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)])._from_config
    torch.manual_seed(0)
    try:
        model = make(cfg, dtype=torch.bfloat16, attn_implementation=job.attn)
    except ValueError:  # an architecture without SDPA (BLOOM): transformers' own fallback is eager
        if job.hf_config is None or job.attn == "eager":
            raise
        job.attn = "eager"
        job.notes.append("eager attention: transformers has no SDPA for this architecture")
        model = make(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    if job.quant == "nf4":
        skip = SKIP_QUANT_LLAVA if job.vision is not None else ("lm_head",)
        if job.hf_config is not None:
            skip = (head_name(model),)
            if job.vlm is not None:  # the tower and projector stay 16-bit (train.model.SKIP_QUANT)
                pp = trace_vlm.parts(model)
                skip += (*pp["vision"], *pp["projector"])
        quantize_linears(model, skip, job.double_quant, torch.bfloat16, fake=job.fake)
        model.is_loaded_in_4bit = True
    recipe = "qlora" if job.quant == "nf4" else "lora"
    tc = SimpleNamespace(recipe=recipe, llm_lora=job.llm_lora, vision_lora=job.vision_lora,
                         train_projector=job.train_projector and job.vision is not None, train_llm_full=False,
                         gradient_checkpointing=job.grad_ckpt, modules_to_save=job.modules_to_save,
                         trainable_dtype=job.trainable_dtype, kbit_embed_dtype=job.kbit_embed_dtype,
                         compute_dtype="bf16",
                         ds_config={} if job.engine == "deepspeed" else None)
    if job.vlm is not None:  # LoRA on the language model, the projector trained (train/trace_vlm.py)
        pp = trace_vlm.parts(model)
        tc.vlm_targets = trace_vlm.lora_regex(model, pp, job.llm_lora.targets) if job.llm_lora else None
        tc.modules_to_save = (*tc.modules_to_save, *(pp["projector"] if job.train_projector else ()))
    model = prepare(model, tc)
    if job.vlm is not None and job.train_projector:  # the inner model's own projector weights (query_tokens)
        for n, p in model.named_parameters():
            if n.rpartition(".")[2] in {x.rpartition(".")[2] for x in pp["params"]}:
                p.requires_grad_(True)
    if fake_mode is not None:
        adopt_fake_tensors(model, fake_mode)
    if job.engine == "deepspeed":
        _cast_bf16(model)
    model.train()
    return model


def _cast_bf16(model) -> None:
    """DeepSpeed runtime/engine.py _configure_distributed_model: module.bfloat16() (floating parameters and
    buffers). Done through .data / _buffers, which allocates the same: nn.Module._apply would swap fake
    parameters, which fails for some of peft's."""
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
        for k, b in m._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.bfloat16:
                m._buffers[k] = b.to(torch.bfloat16)


def batch(job: TraceJob, n_img: int, image_token: int) -> dict:
    """The trainer's collated batch (train/data.py collate) for samples of exactly `seq` tokens."""
    b, s = job.micro_batch, job.seq
    ids = torch.ones((b, s), dtype=torch.long)
    # the fake run passes no mask: a real run drops an all-ones mask (see trace_fake); it is allocated alike
    out = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones((b, s), dtype=torch.long)}
    if job.vlm is not None and job.images_per_sample:  # the image processor's tensors, one set per image
        ids[:, : n_img * job.images_per_sample] = image_token
        out["labels"][:, : n_img * job.images_per_sample] = -100
        for k, t in job.vlm["tensors"].items():
            rep = t.repeat(b * job.images_per_sample, *([1] * (t.dim() - 1)))
            out[k] = torch.zeros(rep.shape, dtype=t.dtype) if t.is_floating_point() else rep
    elif job.vision is not None and job.images_per_sample:
        ids[:, : n_img * job.images_per_sample] = image_token
        out["labels"][:, : n_img * job.images_per_sample] = -100
        size = job.vision["image_size"]
        out["pixel_values"] = torch.zeros((b * job.images_per_sample, 3, size, size))
    return out


def _gemm_4bit_dequant(rows: int):
    """bitsandbytes gemm_4bit as the CUDA backend runs it for many rows: dequantize, then a dense matmul."""

    def run(tr, args, kwargs):
        names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
                 "absmax_offset")
        a = dict(zip(names[: len(args)], args, strict=True), **kwargs)
        A = a["A"]
        op = torch.ops.bitsandbytes
        if A.numel() // A.shape[-1] <= rows:
            return op.gemm_4bit.default(*args, **kwargs)
        absmax = a["absmax"]
        if a.get("absmax_8bit") is not None:
            absmax = op.dequantize_blockwise.default(a["absmax_8bit"], a["absmax"], a["absmax_code"], 256,
                                                     torch.float32)
            tr.track(absmax)
            absmax += a["absmax_offset"]
        w = op.dequantize_4bit.default(a["B"], absmax, a["blocksize"], a["quant_type"], list(a["shapeB"]), A.dtype)
        tr.track(w)
        return torch.nn.functional.linear(A, w, a.get("bias"))

    return run


def _quant_tensors(qs) -> list:
    """The tensors of a bitsandbytes QuantState (absmax, code; nested: offset + the second state's)."""
    ts = [qs.absmax, qs.code]
    if qs.nested:
        ts += [qs.offset, qs.state2.absmax, qs.state2.code]
    return [t for t in ts if isinstance(t, torch.Tensor)]


def _quantized(model) -> dict:
    """id(packed weight) -> its QuantState, for every bitsandbytes Linear4bit."""
    import bitsandbytes as bnb

    return {id(m.weight): getattr(m.weight, "quant_state", None) or m.quant_state
            for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}


def _label_states(tr: MemTracker, model) -> None:
    quant = _quantized(model)
    for p in model.parameters():
        qs = quant.get(id(p))
        if qs is not None:
            tr.track(p, "weights_quantized", relabel=True)
            for t in _quant_tensors(qs):
                tr.track(t, "weights_quantized", relabel=True)
        else:
            tr.track(p, "weights_trainable" if p.requires_grad else "weights_frozen", relabel=True)
    for b in model.buffers():
        tr.track(b, "buffers", relabel=True)


def _phase_hooks(tr: MemTracker, model) -> None:
    head = model.get_output_embeddings()

    def pre(mod, inp):
        tr.set_phase("loss")
        if inp[0].requires_grad:
            inp[0].register_hook(lambda g: tr.set_phase("backward"))

    head.register_forward_pre_hook(pre)
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: tr.track(q.grad, "gradients", relabel=True))


def _micro_step(tr: MemTracker, model, inputs: dict, engine: str) -> None:
    """HF Trainer training_step: compute_loss returns the loss only (outputs dropped), then backward."""

    def compute_loss():
        if engine == "plain":  # accelerate's autocast (Trainer.autocast_smart_context_manager)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(**inputs).loss
        return model(**inputs).loss

    tr.set_phase("forward")
    with tr.saved_as_activations():
        loss = compute_loss()
        tr.set_phase("loss backward")
        loss.backward()
    del loss


def _ds_state(tr: MemTracker, params) -> tuple:
    n = sum(p.numel() for p in params)
    st = tuple(torch.zeros(n, dtype=torch.float32) for _ in range(3))  # fp32 flat master, exp_avg, exp_avg_sq
    for t in st:
        tr.track(t, "optimizer_states", relabel=True)
    return st


def _ds_boundary_and_step(tr: MemTracker, params, state) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    tr.set_phase("all-reduce")
    for p in params:  # engine.py _get_gradients_for_reduction: a parameter without a gradient gets zeros
        if p.grad is None:
            p.grad = torch.zeros(p.size(), dtype=p.dtype)
            tr.track(p.grad, "gradients", relabel=True)
    bucket, size = [], 0
    for p in params + [None]:
        if p is None or (bucket and size + p.numel() > DS_ALLREDUCE_BUCKET):
            flat = _flatten_dense_tensors([q.grad for q in bucket])
            for q, f in zip(bucket, _unflatten_dense_tensors(flat, [q.grad for q in bucket]), strict=True):
                q.grad.copy_(f)
            del flat, f
            bucket, size = [], 0
        if p is not None:
            bucket.append(p)
            size += p.numel()
    tr.set_phase("optimizer step")
    master, m, v = state
    g32 = _flatten_dense_tensors([p.grad.to(torch.float32) for p in params])
    for p in params:
        p.grad = None
    m.lerp_(g32, 0.1)
    v.mul_(0.999).addcmul_(g32, g32, value=0.001)
    master.addcdiv_(m, v, value=-1e-4)  # FusedAdam: one fused kernel, no temporaries
    del g32
    for p, f in zip(params, _unflatten_dense_tensors(master, params), strict=True):
        p.data.copy_(f)
    del f


def trace_step(job: TraceJob) -> dict:
    """Trace two micro-steps and the optimizer step; the per-phase peaks split by component."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from train.trace_fake import masked_select_known, patched, warm_bnb_tables

    warm_bnb_tables()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if job.fake else None
    _, n_img = _config(job)
    overrides = {torch.ops.bitsandbytes.gemm_4bit.default: _gemm_4bit_dequant(job.dequant_rows)}
    if job.fake and (job.vision is not None or job.vlm is not None):
        hidden = job.vlm["hidden_size"] if job.vlm is not None else job.text["hidden_size"]
        count = job.micro_batch * job.images_per_sample * n_img * hidden
        overrides[torch.ops.aten.masked_select.default] = masked_select_known(count)
    with patched(fake), (fake if fake is not None else nullcontext()):
        model = build(job, fake)
        image_token = model.config.image_token_index if job.vision is not None else 0
        image_token = job.vlm["image_token"] if job.vlm is not None else image_token
        inputs = batch(job, n_img, image_token)
        params = [p for p in model.parameters() if p.requires_grad]
        tr = MemTracker(overrides)
        _label_states(tr, model)
        for t in inputs.values():
            tr.track(t, "inputs", relabel=True)
        batch_held = dict(inputs)  # the collated batch stays alive for the whole step
        if job.fake:
            inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        _phase_hooks(tr, model)
        with tr:
            if job.engine == "deepspeed":
                state = _ds_state(tr, params)
            else:
                opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
                for p in params:
                    p.grad = torch.zeros_like(p)
                opt.step()
                opt.zero_grad(set_to_none=True)
                for s in opt.state.values():
                    for t in s.values():
                        tr.track(t, "optimizer_states", relabel=True)
            tr.peaks.clear()
            for _ in range(2):  # the second micro-step starts with the first one's gradients alive
                _micro_step(tr, model, inputs, job.engine)
            if job.engine == "deepspeed":
                _ds_boundary_and_step(tr, params, state)
            else:
                tr.set_phase("optimizer step")
                opt.step()
        rep = tr.report()
        tr.close()
        rep["params"] = _param_bytes(model)
        del model, inputs, batch_held, params, tr
        state = opt = None  # the optimizer states go before the fake mode does
        gc.collect()
    return rep


def _param_bytes(model) -> dict:
    """Raw bytes of the model's states by group (no allocator rounding): the exact comparison."""
    out = {"weights_quantized": 0, "weights_frozen": 0, "weights_trainable": 0, "trainable_params": 0}
    quant = _quantized(model)
    for p in model.parameters():
        qs = quant.get(id(p))
        if qs is not None:
            out["weights_quantized"] += p.nbytes + sum(t.nbytes for t in _quant_tensors(qs))
        elif p.requires_grad:
            out["weights_trainable"] += p.nbytes
            out["trainable_params"] += p.numel()
        else:
            out["weights_frozen"] += p.nbytes
    return out
