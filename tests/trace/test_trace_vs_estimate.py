"""The traced step against vramplan's estimate of the same job, at reduced size
(docs/estimate.md#checked-against-reality): weights and gradients exact, the forward/backward activations
+ transients and the step peak of weights + gradients + activations within 3%. A reduced LLaVA-Llama-3 shape
(real vocabulary, 2 decoder layers, narrow widths) keeps it to seconds; benchmarks/trace_step.py traces the
real size."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from benchmarks.trace_step import compare, trace_job
from tests.trace.isolated import run
from train.trace import trace_step
from vramplan.contract import LoraSpec
from vramplan.estimate.param_groups import param_groups
from vramplan.estimate.search import evaluate
from vramplan.estimate.types import Strategy
from vramplan.plan.request import EstimateOptions
from vramplan.plan.resolve import build_job


def _job(model, recipe, ckpt, seq=1024):
    job, _ = build_job(EstimateOptions(model=model, recipe=recipe, gpus="1x141G", seq_len=seq, micro_batch=1,
                                       grad_ckpt=ckpt, zero=0, offload="none", cpu_ram="1TiB", disk="100TB"))
    m = job.model
    text = replace(m.text, num_layers=2, hidden_size=512, intermediate_size=1792, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=64)
    vision = replace(m.vision, num_layers=3, hidden_size=128, intermediate_size=512, num_attention_heads=2,
                     image_size=112) if m.vision else None
    proj = replace(m.projector, in_features=vision.hidden_size, out_features=text.hidden_size) if m.vision else None
    r = job.recipe
    recipe_small = replace(r, llm_lora=LoraSpec(16, 32, r.llm_lora.dropout, r.llm_lora.targets),
                           vision_lora=LoraSpec(8, 16, r.vision_lora.dropout, r.vision_lora.targets)
                           if r.vision_lora else None)
    job = replace(job, model=replace(m, text=text, vision=vision, projector=proj), recipe=recipe_small)
    return job, evaluate(job, param_groups(job.model, job.recipe), Strategy(0, "none", 1, 1, 1, 1, ckpt))


def rows(model, recipe, ckpt):
    """benchmarks/trace_step.py's comparison rows (in a subprocess: tests/trace/isolated.py)."""
    job, cand = _job(model, recipe, ckpt)
    return compare(trace_step(trace_job(job, ckpt, 1, "deepspeed")), cand)


SLOW = pytest.mark.slow  # the whole directory stays under ~3 minutes on 2 cores without these
GRID = [("llava-llama3-8b-instruct", "qlora", True),
        pytest.param("llava-llama3-8b-instruct", "qlora", False, marks=SLOW),
        pytest.param("llava-llama3-8b-instruct", "lora", True, marks=SLOW), ("llama-3-8b-instruct", "qlora", False),
        pytest.param("llama-3-8b-instruct", "lora", True, marks=SLOW)]


@pytest.mark.parametrize("model,recipe,ckpt", GRID)
def test_trace_matches_estimate(model, recipe, ckpt):
    rows = {name.split(" (")[0]: (tr, es) for name, tr, es in run("tests.trace.test_trace_vs_estimate", "rows",
                                                                   model, recipe, ckpt)}
    for k in ("weights_quantized", "weights_frozen", "weights_trainable", "gradients"):
        assert rows[k][0] == rows[k][1], (k, rows[k])
    for k in ("activations + transients", "step peak: weights + gradients + activations"):
        tr, es = rows[k]
        assert abs(es - tr) <= 0.03 * tr, (k, tr, es, (es - tr) / tr)
