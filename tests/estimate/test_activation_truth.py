"""Truth test: the activation formulas against bytes measured with saved_tensors_hooks
(docs/estimate.md#checked-against-reality).

Per-layer bytes = saved(L=2) - saved(L=1) for real transformers Llama/CLIP layers in bf16 (the
dtype DeepSpeed casts the module to), over a grid of shapes, batch sizes and sequence lengths.
Stated tolerance: 2% per layer (the formulas are op-level counts, so they are exact on this grid).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from vramplan.estimate.activations import llm_layer_bytes_per_token, vision_layer_bytes_per_token  # noqa: E402
from vramplan.estimate.specs import LoraSpec, TextSpec, VisionSpec  # noqa: E402

from .act_measure import saved_bytes  # noqa: E402

TOL = 0.02
LLM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(h, i, a, kv, L, attn, mode, lora, gc):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=a, num_key_value_heads=kv,
                      num_hidden_layers=L, vocab_size=500, attn_implementation=attn)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "full":
        m.requires_grad_(True)
    else:
        m.requires_grad_(False)
    if mode == "lora":
        m = peft.get_peft_model(m, peft.LoraConfig(r=lora.r, lora_alpha=16, lora_dropout=lora.dropout,
                                                   target_modules=list(lora.targets)),
                                autocast_adapter_dtype=False).to(torch.bfloat16)
        inner = m.base_model.model.model
    else:
        inner = m.model
    m.train()
    return m, inner


def _measure_llm(h, i, a, kv, attn, mode, lora, gc, b, s):
    from train.trace_fake import cuda_dropout  # dropout as the CUDA kernel allocates it (a 1-byte mask)

    out = []
    with cuda_dropout():
        for L in (1, 2):
            out.append(_measure_once(h, i, a, kv, attn, mode, lora, gc, b, s, L))
    return out[1] - out[0]


def _measure_once(h, i, a, kv, attn, mode, lora, gc, b, s, L):
    m, inner = _llama(h, i, a, kv, L, attn, mode, lora, gc)
    emb = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    return saved_bytes(lambda: inner(inputs_embeds=emb).last_hidden_state, list(m.parameters()))


GRID = [
    # h, i, heads, kv_heads, attn, mode, lora (r, dropout), b, s
    (64, 128, 4, 4, "sdpa", "full", None, 1, 64),
    (64, 192, 4, 2, "sdpa", "full", None, 2, 48),
    (128, 256, 8, 2, "sdpa", "full", None, 1, 96),
    (64, 128, 4, 4, "eager", "full", None, 1, 64),
    (64, 128, 4, 4, "eager", "full", None, 2, 32),
    (64, 128, 4, 4, "sdpa", "lora", (8, 0.0), 1, 64),
    (64, 128, 4, 4, "sdpa", "lora", (8, 0.05), 2, 64),
    (96, 256, 4, 2, "sdpa", "lora", (16, 0.05), 1, 80),
    (64, 128, 4, 4, "sdpa", "frozen", None, 1, 64),
    (128, 320, 8, 4, "sdpa", "frozen", None, 2, 40),
]


@pytest.mark.parametrize("h,i,a,kv,attn,mode,lr,b,s", GRID)
def test_llm_layer_activation_bytes(h, i, a, kv, attn, mode, lr, b, s):
    lora = LoraSpec(r=lr[0], alpha=16, dropout=lr[1], targets=tuple(LLM_LINEARS)) if lr else None
    measured = _measure_llm(h, i, a, kv, attn, mode, lora, False, b, s)
    spec = TextSpec(num_layers=1, hidden_size=h, intermediate_size=i, num_attention_heads=a,
                    num_key_value_heads=kv, vocab_size=500)
    predicted = llm_layer_bytes_per_token(spec, mode, lora, attn, s) * b * s
    assert predicted == pytest.approx(measured, rel=TOL), (predicted, measured)


# LoRA on some Linears only: the frozen 4-bit/16-bit base layers save no input (bitsandbytes 0.50.2)
PARTIAL = [(("q_proj", "v_proj"), 0.05), (("q_proj", "v_proj"), 0.0), (("o_proj",), 0.0), (("down_proj",), 0.05),
           (("gate_proj", "up_proj", "down_proj"), 0.0)]


@pytest.mark.parametrize("targets,dropout", PARTIAL)
def test_llm_layer_activation_bytes_partial_lora(targets, dropout):
    lora = LoraSpec(r=8, alpha=16, dropout=dropout, targets=targets)
    measured = _measure_llm(96, 256, 4, 2, "sdpa", "lora", lora, False, 1, 64)
    spec = TextSpec(num_layers=1, hidden_size=96, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=500)
    assert llm_layer_bytes_per_token(spec, "lora", lora, "sdpa", 64) * 64 == measured


@pytest.mark.parametrize("mode,lr", [("full", None), ("lora", (8, 0.05))])
@pytest.mark.parametrize("b,s", [(1, 64), (2, 48)])
def test_gradient_checkpointing_keeps_layer_inputs_only(mode, lr, b, s):
    lora = LoraSpec(r=lr[0], alpha=16, dropout=lr[1], targets=tuple(LLM_LINEARS)) if lr else None
    measured = _measure_llm(64, 128, 4, 4, "sdpa", mode, lora, True, b, s)
    assert measured == pytest.approx(2 * 64 * b * s, rel=TOL)  # one bf16 hidden state per token per layer
    no_gc = _measure_llm(64, 128, 4, 4, "sdpa", mode, lora, False, b, s)
    assert measured < no_gc


def _clip(h, i, a, L, lora, img=56):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=h, intermediate_size=i, num_attention_heads=a, num_hidden_layers=L,
                           image_size=img, patch_size=14, attn_implementation="sdpa")
    m = CLIPVisionModel(cfg).to(torch.bfloat16).train()
    m.requires_grad_(False)
    if lora:
        m = peft.get_peft_model(m, peft.LoraConfig(r=lora.r, lora_alpha=16, lora_dropout=lora.dropout,
                                                   target_modules=list(lora.targets)),
                                autocast_adapter_dtype=False).to(torch.bfloat16)
    px = torch.randn(1, 3, img, img, dtype=torch.bfloat16)
    return saved_bytes(lambda: m(pixel_values=px, output_hidden_states=True).hidden_states[-2], list(m.parameters()))


@pytest.mark.parametrize("h,i,r,d", [(64, 128, 8, 0.05), (96, 256, 16, 0.0), (0, 0, 0, 0)])
def test_vision_layer_activation_bytes(h, i, r, d):
    if h == 0:  # frozen tower without adapters saves nothing
        assert _clip(64, 128, 4, 2, None) == 0
        spec = VisionSpec(num_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          image_size=56, patch_size=14)
        assert vision_layer_bytes_per_token(spec, None) == 0
        return
    lora = LoraSpec(r=r, alpha=16, dropout=d, targets=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
    measured = _clip(h, i, 4, 3, lora) - _clip(h, i, 4, 2, lora)
    spec = VisionSpec(num_layers=1, hidden_size=h, intermediate_size=i, num_attention_heads=4, image_size=56,
                      patch_size=14)
    predicted = vision_layer_bytes_per_token(spec, lora) * spec.num_positions
    assert predicted == pytest.approx(measured, rel=TOL)
