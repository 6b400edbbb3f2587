"""The sliding-window mask under SDPA (families/mistral.py window_mask_bytes_per_token): once the sequence reaches
the window, transformers hands SDPA an explicit (b, 1, s, s) mask, and each windowed layer keeps it (2 B per
query-key pair in bf16) with k and v repeated to every query head. Measured with saved_tensors_hooks on one real
bf16 Mistral layer, windowed minus windowless, at two sequence lengths (so the s^2 term and the per-token term
are both pinned), and composed by activation_bytes over the layers that slide (docs/estimate.md#activations)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.estimate.test_families import layer_saved_bytes  # noqa: E402
from vramplan.estimate.activations import activation_bytes  # noqa: E402
from vramplan.estimate.families import gemma, mistral, module_for  # noqa: E402

# q = 4 x 24 = 96, kv = 2 x 24 = 48: the repeated k/v show (4(q - kv) = 192 B per token)
SHAPE = dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             vocab_size=320, max_position_embeddings=1024)


def _layer(s: int, window: int | None, b: int = 2) -> int:
    return layer_saved_bytes(lambda n: transformers.MistralForCausalLM(transformers.MistralConfig(
        **SHAPE, num_hidden_layers=n, sliding_window=window)), "frozen", None, b, s)


@pytest.mark.parametrize("s", [32, 96])
def test_the_window_mask_grows_with_the_square_of_the_sequence(s):
    b, window = 2, 16
    t = mistral.from_hf_config({"model_type": "mistral", **SHAPE, "num_hidden_layers": 1, "sliding_window": window},
                               "config.json")
    layers, per_token = mistral.window_mask_bytes_per_token(t, "sdpa", s)
    assert layers == 1 and per_token == 2 * s + 4 * (t.q_dim - t.kv_dim)
    assert _layer(s, window, b) - _layer(s, None, b) == per_token * b * s  # 2*b*s^2 + 192*b*s, exactly
    assert mistral.window_mask_bytes_per_token(t, "eager", s) == (0, 0.0)  # eager: one shared mask, kept by none
    assert mistral.window_mask_bytes_per_token(t, "flash", s) == (0, 0.0)  # the window is the kernel's own


def test_a_window_past_the_sequence_costs_nothing():
    """s < window: transformers hands SDPA is_causal=True and no mask (masking_utils.py _ignore_causal_mask_sdpa)."""
    t = mistral.from_hf_config({"model_type": "mistral", **SHAPE, "sliding_window": 64}, "config.json")
    assert mistral.window_mask_bytes_per_token(t, "sdpa", 48) == (0, 0.0)
    assert _layer(48, 64) == _layer(48, None)


def test_activation_bytes_counts_the_sliding_layers_only():
    """Gemma 3 at 6 layers: five slide (sliding_window_pattern 6), the full one keeps is_causal; with checkpointing
    the recomputed layer is a sliding one. Gemma 2's "sdpa" is eager: no mask."""
    cfg = {"model_type": "gemma3_text", **SHAPE, "num_hidden_layers": 6, "sliding_window": 64}
    near, far = (gemma.from_hf_config({**cfg, "sliding_window": w}, "config.json") for w in (64, 4096))
    kw = dict(v=None, micro_batch=2, seq=512, images_per_sample=0, llm_mode="lora", llm_lora=None, vision_lora=None)
    per_token = 2 * 512 + 4 * (near.q_dim - near.kv_dim)
    assert module_for(near).window_mask_bytes_per_token(near, "sdpa", 512) == (5, per_token)
    for ckpt, field, layers in ((False, "llm_saved", 5), (True, "llm_recompute", 1)):
        a, b = (getattr(activation_bytes(t, **kw, grad_ckpt=ckpt), field) for t in (near, far))
        assert a - b == layers * per_token * 2 * 512
    g2 = gemma.from_hf_config({**cfg, "model_type": "gemma2"}, "config.json")
    assert gemma.window_mask_bytes_per_token(g2, "sdpa", 512) == (0, 0.0)
