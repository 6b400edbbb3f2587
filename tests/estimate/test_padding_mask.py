"""A right-padded micro-batch under SDPA (activations.py padding_mask_bytes_per_token): the trainer's collate pads
a micro-batch to its longest sample (train/data.py), transformers then hands SDPA an explicit (b, 1, s, s) mask in
every layer, and each layer keeps it (2 B per query-key pair in bf16) with k and v repeated to every query head.
Measured with saved_tensors_hooks on one real bf16 layer, padded minus unpadded, at two lengths (the s^2 and the
per-token terms are both pinned); an all-ones mask costs nothing (transformers drops it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.estimate.test_families import layer_saved_bytes  # noqa: E402
from vramplan.estimate.activations import activation_bytes, padding_mask_bytes_per_token  # noqa: E402
from vramplan.estimate.families import gemma, llama  # noqa: E402

# q = 4 x 24 = 96, kv = 2 x 24 = 48: the repeated k/v show (4(q - kv) = 192 B per token)
SHAPE = dict(hidden_size=64, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             vocab_size=320, max_position_embeddings=1024)


def _llama(n: int):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE, num_hidden_layers=n,
                                                                  attn_implementation="sdpa"))


def _mask(b: int, s: int, short: int) -> torch.Tensor:
    m = torch.ones((b, s), dtype=torch.long)
    m[-1, s - short:] = 0  # the last sample is `short` tokens shorter: right padding, as collate makes it
    return m


@pytest.mark.parametrize("s", [32, 96])
def test_a_padded_micro_batch_gives_every_layer_a_mask(s):
    b = 2
    t = llama.from_hf_config({"model_type": "llama", **SHAPE, "num_hidden_layers": 1}, "config.json")
    layers, per_token = padding_mask_bytes_per_token(t, "sdpa", s)
    assert layers == 1 and per_token == 2 * s + 4 * (t.q_dim - t.kv_dim)
    plain = layer_saved_bytes(_llama, "frozen", None, b, s)
    assert layer_saved_bytes(_llama, "frozen", None, b, s, _mask(b, s, 5)) - plain == per_token * b * s
    # an all-ones mask (no sample shorter) is dropped: is_causal, nothing kept (masking_utils _ignore_causal_mask_sdpa)
    assert layer_saved_bytes(_llama, "frozen", None, b, s, torch.ones((b, s), dtype=torch.long)) == plain


def test_no_mask_cost_under_eager_flash_or_soft_capped_attention():
    t = llama.from_hf_config({"model_type": "llama", **SHAPE, "num_hidden_layers": 4}, "config.json")
    assert padding_mask_bytes_per_token(t, "eager", 64) == (0, 0.0)  # added to the scores, kept by nothing
    assert padding_mask_bytes_per_token(t, "flash", 64) == (0, 0.0)  # flash unpads instead
    g2 = gemma.from_hf_config({"model_type": "gemma2", **SHAPE, "num_hidden_layers": 4}, "config.json")
    assert padding_mask_bytes_per_token(g2, "sdpa", 64) == (0, 0.0)  # Gemma 2's soft cap runs eager


def test_activation_bytes_counts_every_layer_or_the_recomputed_one():
    t = llama.from_hf_config({"model_type": "llama", **SHAPE, "num_hidden_layers": 6}, "config.json")
    kw = dict(v=None, micro_batch=2, seq=512, images_per_sample=0, llm_mode="lora", llm_lora=None, vision_lora=None)
    per_token = 2 * 512 + 4 * (t.q_dim - t.kv_dim)
    for ckpt, field, layers in ((False, "llm_saved", 6), (True, "llm_recompute", 1)):
        a, b = (activation_bytes(t, **kw, grad_ckpt=ckpt, padded=p) for p in (True, False))
        assert getattr(a, field) - getattr(b, field) == layers * per_token * 2 * 512
        assert a.sdpa_masks == layers * per_token * 2 * 512 and b.sdpa_masks == 0


def test_the_estimate_pads_micro_batches_of_two_or_more_only():
    """Through the search: micro-batch 1 has nothing to pad; 2 does, unless --dataset's records are one length."""
    import dataclasses

    from vramplan.estimate.param_groups import param_groups
    from vramplan.estimate.search import _memory
    from vramplan.estimate.types import Strategy
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    job, _ = build_job(EstimateOptions(model="llava-v1.5-7b", recipe="lora", gpus="1x80G", seq_len=2048))
    groups = param_groups(job.model, job.recipe)

    def saved(mb: int, padded: bool) -> int:
        j = job if padded else dataclasses.replace(job, padded_batches=False)
        return _memory(j, groups, Strategy(2, "none", 1, 1, mb, 1, False)).as_dict()["activations_saved"]

    t = job.model.text
    assert saved(1, True) == saved(1, False)
    assert saved(2, True) - saved(2, False) == t.num_layers * 2 * 2048 * 2 * 2048  # MHA: the mask only


@pytest.mark.parametrize("texts,padded", [(["one two three four"] * 4, False),
                                          (["one two three four", "one"] * 2, True)])
def test_a_dataset_of_one_length_needs_no_padding(tmp_path, texts, padded):
    """--dataset whose records all have one length: micro-batches are never padded (resolve.py uniform_lengths)."""
    import json

    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": str(k), "conversations": [{"from": "human", "value": x},
                                                                  {"from": "gpt", "value": x}]}
                                for k, x in enumerate(texts)]))
    job, _ = build_job(EstimateOptions(model="vicuna-7b-v1.5", recipe="lora", gpus="1x80G", dataset=str(data)))
    assert job.padded_batches is padded


def test_pad_mask_flag_overrides_the_dataset_and_is_train_only():
    from vramplan.errors import UsageError
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    for flag in (True, False):
        job, _ = build_job(EstimateOptions(model="vicuna-7b-v1.5", recipe="lora", gpus="1x80G", pad_mask=flag))
        assert job.padded_batches is flag
    with pytest.raises(UsageError, match="--pad-mask"):
        EstimateOptions(task="infer", pad_mask=False)


def test_one_kv_head_repeats_by_view():
    """Multi-query attention (Gemma-2B, Gemma 3 1B): repeat_kv's expand + reshape stays a view, only the mask is kept
    (families/mistral.py repeated_kv_bytes_per_token)."""
    b, s, mqa = 2, 48, dict(SHAPE, num_key_value_heads=1)

    def build(n):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**mqa, num_hidden_layers=n,
                                                                      attn_implementation="sdpa"))

    t = llama.from_hf_config({"model_type": "llama", **mqa, "num_hidden_layers": 1}, "config.json")
    assert padding_mask_bytes_per_token(t, "sdpa", s) == (1, 2 * s)
    padded = layer_saved_bytes(build, "frozen", None, b, s, _mask(b, s, 5))
    assert padded - layer_saved_bytes(build, "frozen", None, b, s) == 2 * s * b * s


def _vlm_layer_bytes(cfg, cls, token_type_ids: bool, b: int = 2, s: int = 48) -> int:
    """saved(2 text layers) - saved(1) of a tiny bf16 PaliGemma / Gemma 3, trained text norms, frozen tower."""
    from train.trace_fake import cuda_dropout

    from .act_measure import saved_bytes

    out = []
    for layers in (1, 2):
        cfg.text_config.num_hidden_layers = layers
        torch.manual_seed(0)
        m = cls(cfg).to(torch.bfloat16).train().requires_grad_(False)
        for n, p in m.named_parameters():
            p.requires_grad_("language_model" in n and "norm" in n)
        n_img = getattr(cfg, "mm_tokens_per_image", None) or cfg.text_config.num_image_tokens
        ids = torch.randint(0, 200, (b, s))
        ids[:, :n_img] = getattr(cfg, "image_token_id", None) or cfg.image_token_index
        kw = {"input_ids": ids, "pixel_values": torch.randn(b, 3, cfg.vision_config.image_size,
                                                             cfg.vision_config.image_size, dtype=torch.bfloat16)}
        if token_type_ids:
            kw["token_type_ids"] = (ids == ids[0, 0]).long()  # 1 on the image tokens, as the processors make them
        with cuda_dropout():
            out.append(saved_bytes(lambda: m(**kw).logits, list(m.parameters())))
    return out[1] - out[0]


@pytest.mark.parametrize("name", ["paligemma", "paligemma2", "gemma3"])
def test_paligemma_and_gemma3_train_with_a_mask_in_every_layer(tmp_path, name):
    """token_type_ids (training) make the image attend both ways: an explicit mask per layer at any micro-batch,
    as padding makes one (MASK_IN_TRAINING); PaliGemma 2's Gemma 2 runs eager and keeps none."""
    from tests.estimate.test_gemma_vlms import tiny, tiny_gemma3
    from vramplan.inputs.model_dir import load_model_dir

    cfg = {"paligemma": lambda: tiny(transformers.GemmaConfig), "paligemma2": lambda: tiny(transformers.Gemma2Config),
           "gemma3": tiny_gemma3}[name]()
    cls = (transformers.Gemma3ForConditionalGeneration if name == "gemma3"
           else transformers.PaliGemmaForConditionalGeneration)
    cfg.save_pretrained(tmp_path)
    t = load_model_dir(tmp_path).text
    b, s = 2, 48
    measured = _vlm_layer_bytes(cfg, cls, True, b, s) - _vlm_layer_bytes(cfg, cls, False, b, s)
    layers, per_token = padding_mask_bytes_per_token(t, "sdpa", s)
    assert measured == (per_token * b * s if layers else 0)
    assert (measured > 0) is (name != "paligemma2")
    from vramplan.estimate.search import _mask_in_training
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    job, _ = build_job(EstimateOptions(model=str(tmp_path), recipe="lora", gpus="1x80G", micro_batch=1))
    assert _mask_in_training(job)  # counted at micro-batch 1 too (nothing for PaliGemma 2: its layers run eager)
