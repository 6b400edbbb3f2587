"""The fake-mode workarounds (train/trace_fake.py) are guarded here: the same traced step of a reduced-size
model, run under FakeTensorMode and for real on CPU tensors, must give byte-identical peaks in every phase
and component (docs/estimate.md#checked-against-reality)."""

from __future__ import annotations

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from tests.trace.isolated import run
from train.trace import TraceJob, trace_step
from vramplan.contract import LoraSpec

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56,
              patch_size=14)


def _job(quant, vision, ckpt, fake, engine="deepspeed"):
    return TraceJob(text=TEXT, vision=VISION if vision else None, quant=quant,
                    llm_lora=LoraSpec(8, 16, 0.05, ("all-linear",)),
                    vision_lora=LoraSpec(4, 8, 0.05, ("q_proj", "v_proj")) if vision else None,
                    seq=256, grad_ckpt=ckpt, fake=fake, engine=engine, dequant_rows=100)


def both(quant, vision, ckpt, engine):
    """(fake trace, real run) of one configuration (in a subprocess: tests/trace/isolated.py)."""
    return [trace_step(_job(quant, vision, ckpt, fake, engine)) for fake in (True, False)]


@pytest.mark.parametrize("quant,vision,ckpt", [("nf4", True, False), ("nf4", False, True),
                                               pytest.param("none", True, True, marks=pytest.mark.slow),
                                               pytest.param("none", False, False, marks=pytest.mark.slow)])
def test_fake_trace_equals_real_run(quant, vision, ckpt):
    fake, real = run("tests.trace.test_fake_vs_real", "both", quant, vision, ckpt, "deepspeed")
    assert fake["phases"].keys() == real["phases"].keys()
    for phase, f in fake["phases"].items():
        assert f == real["phases"][phase], phase
    assert fake["params"] == real["params"]


@pytest.mark.slow
@pytest.mark.parametrize("quant,vision,ckpt", [("nf4", True, True), ("none", True, False)])
def test_fake_trace_equals_real_run_plain_engine(quant, vision, ckpt):
    fake, real = run("tests.trace.test_fake_vs_real", "both", quant, vision, ckpt, "plain")
    for phase, f in fake["phases"].items():
        assert f == real["phases"][phase], phase
