"""Activation-side mechanisms the whole-step trace showed (docs/estimate.md#activations,
docs/estimate.md#checked-against-reality): the loss at 12 B per logit, `--attn flash` saving what SDPA
saves (and needing CUDA), eager attention's s^2 probabilities."""

from __future__ import annotations

from dataclasses import replace

from vramplan.estimate.activations import LOGIT_PEAK_BYTES, activation_bytes
from vramplan.estimate.search import incompatibility
from vramplan.estimate.types import Offload, Strategy
from vramplan.plan.request import options_from_kwargs
from vramplan.plan.resolve import build_job

HOST = {"cpu_ram": "512GiB", "disk": "2TB"}


def _job(**kw):
    return build_job(options_from_kwargs(gpus="1x80G", **HOST, **kw))[0]


def _act(job, attn, ckpt=False):
    r, m = job.recipe, job.model
    return activation_bytes(m.text, m.vision, micro_batch=1, seq=job.seq_len, images_per_sample=1, llm_mode="lora",
                            llm_lora=r.llm_lora, vision_lora=r.vision_lora, grad_ckpt=ckpt, attn=attn,
                            projector=m.projector)


def test_loss_is_12_bytes_per_logit():
    job = _job()
    assert LOGIT_PEAK_BYTES == 12
    assert _act(job, "sdpa").logits_peak == 12 * job.seq_len * job.model.text.vocab_size


def test_flash_saves_what_sdpa_saves_and_eager_keeps_the_scores():
    job = _job()
    sdpa, flash, eager = (_act(job, a) for a in ("sdpa", "flash", "eager"))
    assert flash == sdpa
    t = job.model.text
    extra = (eager.llm_saved - sdpa.llm_saved) / (t.num_layers * job.seq_len)
    assert extra == t.num_attention_heads * (6 * job.seq_len - 4)  # fp32 softmax + its 16-bit cast, less the lse


def test_flash_needs_a_cuda_device():
    s = Strategy(0, Offload.NONE, 1, 1, 1, 1, True)
    assert incompatibility(_job(attn="flash"), s) is None
    cpu = replace(_job(attn="flash"), device="cpu")
    assert "FlashAttention-2" in incompatibility(cpu, replace(s, engine="torch"))  # CPU runs are plain PyTorch


def test_estimate_cli_accepts_attn_flash():
    from click.testing import CliRunner

    from vramplan.cli import cli

    r = CliRunner().invoke(cli, ["estimate", "--gpus", "1x80G", "--attn", "flash", "--cpu-ram", "512GiB", "--disk",
                                  "2TB", "--json"])
    assert r.exit_code == 0, r.output
