"""Truth test: properties of the memory model over random configurations (hypothesis)
(docs/estimate.md#checked-against-reality)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from vramplan.estimate.activations import activation_bytes
from vramplan.estimate.ds_config import buckets_for
from vramplan.estimate.gpu_memory import gpu_memory
from vramplan.estimate.host import host_needs
from vramplan.estimate.param_groups import ParamGroups
from vramplan.estimate.specs import LoraSpec, TextSpec
from vramplan.estimate.types import Strategy

SHARDED = ("weights_frozen", "weights_trainable", "weights_quantized", "gradients", "optimizer_states",
           "fp32_grad_partition")

groups_st = st.builds(
    ParamGroups,
    quantized_params=st.integers(0, 10**10), quantized_bytes=st.integers(0, 6 * 10**9),
    quantized_tensors=st.integers(0, 300), frozen_params=st.integers(0, 10**10),
    trainable_llm_lora=st.integers(0, 2 * 10**9), trainable_vision_lora=st.integers(0, 10**8),
    trainable_projector=st.integers(0, 10**8), trainable_llm_full=st.integers(0, 10**10),
    total_params=st.integers(10**6, 2 * 10**10), largest_linear_elems=st.integers(0, 10**8),
    decoder_layer_params=st.integers(10**5, 10**9))
text_st = st.builds(TextSpec, num_layers=st.integers(1, 80), hidden_size=st.sampled_from([256, 1024, 4096, 8192]),
                    intermediate_size=st.sampled_from([1024, 11008, 14336, 28672]),
                    num_attention_heads=st.sampled_from([8, 32, 64]), num_key_value_heads=st.sampled_from([8]),
                    vocab_size=st.sampled_from([32000, 128256]))
strategy_st = st.builds(Strategy, zero_stage=st.integers(0, 3), offload=st.sampled_from(["none", "optimizer",
                                                                                           "optimizer+params"]),
                        gpus=st.integers(1, 64), nodes=st.just(1), micro_batch=st.integers(1, 16),
                        grad_accum=st.integers(1, 8), grad_ckpt=st.booleans())


def _act(t, s, mode="lora"):
    lora = LoraSpec(r=64, alpha=16, dropout=0.05, targets=("all-linear",))
    return activation_bytes(t, None, micro_batch=s.micro_batch, seq=2048, images_per_sample=0, llm_mode=mode,
                            llm_lora=lora, vision_lora=None, grad_ckpt=s.grad_ckpt)


def _mem(g, t, s):
    return gpu_memory(g, _act(t, s), s, buckets_for(t.hidden_size, g.trainable))


@settings(max_examples=200, deadline=None)
@given(g=groups_st, t=text_st, s=strategy_st, extra=st.integers(1, 64))
def test_more_gpus_never_increase_sharded_bytes(g, t, s, extra):
    a = _mem(g, t, s).as_dict()
    b = _mem(g, t, replace(s, gpus=s.gpus + extra)).as_dict()
    for name in SHARDED:
        assert b.get(name, 0) <= a.get(name, 0), name


@settings(max_examples=200, deadline=None)
@given(g=groups_st, t=text_st, s=strategy_st)
def test_offload_moves_bytes_from_gpu_to_cpu(g, t, s):
    if s.zero_stage == 0:
        return
    base = replace(s, offload="none")
    more = replace(s, offload="optimizer")
    kw = dict(compute_bytes=2, deepspeed=True, base_weights_bytes=10**9, base_weights_on_disk=False,
              dataset_bytes=0, keep_checkpoints=2, workers=0)
    gpu_a = sum(c.bytes for c in _mem(g, t, base).components if c.kind == "persistent")
    gpu_b = sum(c.bytes for c in _mem(g, t, more).components if c.kind == "persistent")
    assert gpu_b <= gpu_a
    assert host_needs(g, more, **kw).cpu_ram_bytes >= host_needs(g, base, **kw).cpu_ram_bytes
    if s.zero_stage == 3:
        full = replace(s, offload="optimizer+params")
        gpu_c = sum(c.bytes for c in _mem(g, t, full).components if c.kind == "persistent")
        assert gpu_c <= gpu_b
        assert host_needs(g, full, **kw).cpu_ram_bytes >= host_needs(g, more, **kw).cpu_ram_bytes


@settings(max_examples=200, deadline=None)
@given(t=text_st, s=strategy_st, mode=st.sampled_from(["full", "lora", "frozen"]))
def test_checkpointing_reduces_activations(t, s, mode):
    on = _act(t, replace(s, grad_ckpt=True), mode)
    off = _act(t, replace(s, grad_ckpt=False), mode)
    assert on.llm_saved < off.llm_saved  # what stays live until backward always shrinks
    if t.num_layers >= 2:  # with one layer, recomputing it costs as much as keeping it
        assert on.llm_saved + on.llm_recompute <= off.llm_saved + off.llm_recompute


@settings(max_examples=100, deadline=None)
@given(g=groups_st, t=text_st, s=strategy_st, mem_gib=st.floats(8, 200), more=st.floats(0, 200))
def test_fits_is_monotone_in_memory(g, t, s, mem_gib, more):
    need = _mem(g, t, s).nvidia_smi
    fits_small = need <= mem_gib * 2**30 * 0.9
    fits_big = need <= (mem_gib + more) * 2**30 * 0.9
    assert fits_big or not fits_small
