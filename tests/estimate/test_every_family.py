"""Every family of issue #10 end to end (docs/estimate.md#checked-against-reality): one tiny config per model_type,
written as a model dir (config.json, the processor config a VLM reads, a safetensors file), plans through
`vramplan estimate` from the local dir and from a hub id served by tests/hub_server.py with the parameter count of
transformers' model on the meta device and no weight byte transferred; an unknown or misspelled id is one line
and exit 2; each text family's activations (the step's total and one decoder layer's) are within 3% of the
whole-step trace (train/trace.py) at a small shape. The configs are the family tests' own
(tests/estimate/test_families*.py, test_moe_families.py, test_vlm_families*.py, test_gemma_vlms.py)."""

from __future__ import annotations

import json
import struct

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from click.testing import CliRunner  # noqa: E402

from tests.estimate import test_families as dense  # noqa: E402
from tests.estimate import test_families_gemma_phi as gp  # noqa: E402
from tests.estimate import test_gemma_vlms as gv  # noqa: E402
from tests.estimate import test_moe_families as moe  # noqa: E402
from tests.estimate import test_vlm_families as vlm  # noqa: E402
from tests.estimate import test_vlm_families_qwen_idefics as qi  # noqa: E402
from tests.hub_server import Hub  # noqa: E402
from vramplan.cli import cli  # noqa: E402


def tiny_configs() -> dict:
    """model_type (or a variant's name) -> (config factory, transformers model class name, processor dict or None).
    Each config is the one its family's truth test builds."""
    def d(name):
        cls, extra, cls_name = dense.CASES[name]
        return (lambda: cls(**dense.TINY, **extra)), cls_name, None

    def g(name):
        return (lambda: gp.make_config(name)), gp.CASES[name][3], None

    def m(name):
        cls, extra, cls_name = moe.CASES[name]
        return (lambda: cls(**moe.TINY, **extra)), cls_name, None

    def cg(make, proc=None):  # a VLM: <Name>Config -> <Name>ForConditionalGeneration
        return make, type(make()).__name__.replace("Config", "ForConditionalGeneration"), proc

    clip = dict(vlm.CLIP)
    return {
        "llama": ((lambda: transformers.LlamaConfig(**dense.TINY)), "LlamaForCausalLM", None),
        "mistral": d("mistral"), "qwen2": d("qwen2"), "qwen3": d("qwen3"),
        "gemma": g("gemma"), "gemma2": g("gemma2"), "gemma3_text": g("gemma3"), "phi3": g("phi3"),
        "mixtral": m("mixtral"), "qwen2_moe": m("qwen2_moe"), "qwen3_moe": m("qwen3_moe"),
        "llava": cg(lambda: transformers.LlavaConfig(text_config=transformers.LlamaConfig(**vlm.TEXT),
                                                     vision_config=transformers.CLIPVisionConfig(**clip),
                                                     image_token_index=319),
                    {"crop_size": {"height": 28, "width": 28}}),
        "llava-siglip": cg(lambda: transformers.LlavaConfig(
            text_config=transformers.LlamaConfig(**vlm.TEXT),
            vision_config=transformers.SiglipVisionConfig(**vlm.SIGLIP, vision_use_head=False),
            vision_feature_select_strategy="full", vision_feature_layer=-1, image_token_index=319)),
        "llava_next": cg(lambda: vlm.tiny_config("llava_next"), {"image_grid_pinpoints": vlm.PINS}),
        "llava_onevision": cg(lambda: vlm.tiny_config("llava_onevision"), {"image_grid_pinpoints": vlm.PINS}),
        "qwen2_vl": cg(lambda: qi._qwen_config("qwen2_vl")),
        "qwen2_5_vl": cg(lambda: qi._qwen_config("qwen2_5_vl")),
        "idefics3": cg(lambda: qi._idefics_config("idefics3"), qi.TILE_PROC),
        "smolvlm": cg(lambda: qi._idefics_config("smolvlm"), qi.TILE_PROC),
        "paligemma": cg(lambda: gv.tiny(transformers.GemmaConfig)),
        "paligemma2": cg(lambda: gv.tiny(transformers.Gemma2Config)),
        "gemma3": cg(gv.tiny_gemma3),
    }


CONFIGS = tiny_configs()
DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def write_safetensors(path, model, dtype=torch.bfloat16):
    """A valid safetensors file of the meta model's parameters (tied ones once), zero-filled: the header is
    what vramplan reads (https://huggingface.co/docs/safetensors/index#format)."""
    header, offset = {}, 0
    for name, p in model.named_parameters():
        n = p.numel() * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    """name -> (model dir, parameters of transformers' model built on the meta device from the same config)."""
    root = tmp_path_factory.mktemp("every-family")
    out = {}
    for name, (make, cls_name, proc) in CONFIGS.items():
        cfg = make()
        d = root / name
        cfg.save_pretrained(d)
        if proc is not None:
            (d / "preprocessor_config.json").write_text(json.dumps(proc))
        with torch.device("meta"):
            model = getattr(transformers, cls_name)(cfg)
        write_safetensors(d / "model.safetensors", model)
        out[name] = (d, sum(p.numel() for p in model.parameters()))
    return out


@pytest.fixture(scope="module")
def hub(repos, tmp_path_factory):
    import huggingface_hub

    cache = tmp_path_factory.mktemp("every-family-cache")
    with Hub({f"org/tiny-{n}": d for n, (d, _) in repos.items()}) as h, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", h.url)
        mp.setenv("HF_HUB_CACHE", str(cache / "hf"))
        mp.setenv("VRAMPLAN_CACHE_DIR", str(cache / "vp"))
        mp.delenv("HF_TOKEN", raising=False)
        mp.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        mp.setenv("HF_HUB_OFFLINE", "0")  # huggingface_hub read it at import (constants.py): set both
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield h


def estimate(model: str, as_json: bool = True):
    """`vramplan estimate --model MODEL [--json]` in this process: (exit code, data or None, stderr)."""
    r = CliRunner().invoke(cli, ["estimate", "--model", model, "--gpus", "1x80GB", *(["--json"] * as_json)])
    assert not r.exception or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, json.loads(r.stdout)["data"] if r.exit_code == 0 and as_json else None, r.stderr


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plans_from_a_local_dir_and_a_hub_id_with_exact_counts(repos, hub, name):
    d, meta_params = repos[name]
    rc, local, err = estimate(str(d))
    assert rc == 0, err
    before = hub.weight_bytes
    rc, remote, err = estimate(f"org/tiny-{name}")
    assert rc == 0, err
    assert local["model"]["params"] == remote["model"]["params"] == meta_params
    assert hub.weight_bytes == before == 0
    assert local["pick"] is not None and remote["model"]["family"] == local["model"]["family"]


def _one_line_exit_2(model, *words):
    """What a user who types `vramplan estimate --model MODEL` sees: one error line (and its hint), exit 2."""
    rc, _, err = estimate(model, as_json=False)
    assert rc == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("vramplan: error: ") and all(w in lines[0] for w in words), err
    assert len(lines) <= 2 and all(x.startswith("hint: ") for x in lines[1:]), err  # the line + its hint


def test_a_misspelled_hub_id_is_one_line_and_exit_2(hub):
    _one_line_exit_2("org/tiny-lama", "no such model on the Hugging Face hub")
    assert hub.weight_bytes == 0
    _one_line_exit_2("llava-llama3-8b-instrukt", "unknown model profile")  # a profile id, misspelled


BAD = {
    "unknown model_type": ({"model_type": "nosuchmodel"}, "'nosuchmodel' is unknown to transformers"),
    "misspelled model_type": ({"model_type": "lama"}, "'lama' is unknown", "did you mean"),
    "llava + unsupported text": ({"model_type": "llava", "text_config": {"model_type": "falcon"}}, "falcon"),
    "llava + unsupported tower": ({"model_type": "llava", "vision_config": {"model_type": "dinov2"}}, "dinov2"),
    "llava + a tower of another wrapper": ({"model_type": "llava", "vision_config": {"model_type": "qwen2_vl_vision"}},
                                           "qwen2_vl_vision"),
    "llava_next + unsupported text": ({"model_type": "llava_next", "text_config": {"model_type": "gpt2"}}, "gpt2"),
    "idefics3 + unsupported text": ({"model_type": "idefics3", "text_config": {"model_type": "nosuch"}}, "nosuch"),
    "paligemma + unsupported tower": ({"model_type": "paligemma", "vision_config": {"model_type": "dinov2"}},
                                      "dinov2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_unsupported_config_is_one_line_and_exit_2(tmp_path, case):
    cfg, *words = BAD[case]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _one_line_exit_2(str(tmp_path), *words)


# --- activation coefficients against the whole-step trace (train/trace.py) ------------------------------------
TEXT_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
                 "qwen3_moe"]
# Gemma 3 at a sequence past its sliding window (64 < 512): transformers hands SDPA an explicit window mask, which
# each sliding layer keeps with k/v repeated to every head (families/mistral.py window_mask_bytes_per_token:
# 819,200 B of the 824,320 B per layer the trace shows beyond the rest; the layer is within 0.05%)
KNOWN_GAPS: dict = {}
# A small shape with a released model's vocabulary-to-width ratio (Llama-3-8B: 128256 / 4096 = 31; here 32): the
# tiny configs' widths, vocabulary and expert sizes scaled up, each family's own options kept
SMALL = dict(hidden_size=256, intermediate_size=704, vocab_size=8192, num_attention_heads=4, num_key_value_heads=2)
SEQ = 512
# the trainer's all-linear names nn.Linear modules only (train/model.py target_regex); the fused experts of
# transformers 5 are not, so the MoE families adapt the attention, whose targets both read alike
MOE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def small_config(name: str, layers: int):
    make, _, _ = CONFIGS[name]
    kw = {k: v for k, v in make().to_dict().items()
          if k not in ("model_type", "transformers_version", "architectures", "layer_types")}
    kw.update(SMALL, num_hidden_layers=layers)
    if kw.get("head_dim"):
        kw["head_dim"] = 72  # distinct from hidden / heads, as the tiny configs keep it
    for k in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if kw.get(k):
            kw[k] = SMALL["intermediate_size"] // 2
    return transformers.AutoConfig.for_model(make().model_type, **kw), kw


def trace_rows(names: list, layers: list) -> dict:
    """{name: {layers: (traced, estimated)}}: the forward/backward activations + transients of train/trace.py's
    whole step (LoRA r16 on the unquantized decoder, checkpointing off, ZeRO-0, fake tensors) and of vramplan's
    candidate for the same job (benchmarks/trace_step.py's comparison). Run in one fresh interpreter
    (tests/trace/isolated.py)."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from benchmarks.trace_step import candidate, compare
    from train.trace import TraceJob, trace_step
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.resolve import build_job

    out = {}
    for name in names:
        for n in layers:
            cfg, kw = small_config(name, n)
            d = Path(tempfile.mkdtemp())
            cfg.save_pretrained(d)
            job, _ = build_job(EstimateOptions(model=str(d), recipe="lora", gpus="1x141G", seq_len=SEQ, micro_batch=1,
                                               grad_ckpt=False, zero=0, offload="none", cpu_ram="1TiB", disk="100TB"))
            lora = replace(job.recipe.llm_lora, r=16, alpha=32)
            if hasattr(module_for_text(job), "saved_bytes_per_layer"):  # a MoE family
                lora = replace(lora, targets=MOE_TARGETS)
            job = replace(job, recipe=replace(job.recipe, llm_lora=lora))
            tj = TraceJob(text=kw, model_type=cfg.model_type, quant="none", double_quant=False, llm_lora=lora,
                          train_projector=False, micro_batch=1, seq=SEQ, images_per_sample=0, grad_ckpt=False,
                          attn="eager" if cfg.model_type == "gemma2" else job.attn)  # train/model.py: no SDPA
            rows = {r[0].split(" (")[0]: r[1:] for r in compare(trace_step(tj), candidate(job, 1, False))}
            out.setdefault(name, {})[n] = rows["activations + transients"]
    return out


def module_for_text(job):
    from vramplan.estimate.families import module_for

    return module_for(job.model.text)


@pytest.fixture(scope="module")
def traced():
    pytest.importorskip("peft")
    from tests.trace.isolated import run

    return run("tests.estimate.test_every_family", "trace_rows", TEXT_FAMILIES, [2, 3])


@pytest.mark.slow  # 20 traces in one interpreter: about a minute on 2 cores
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n]))
                                  if n in KNOWN_GAPS else n for n in TEXT_FAMILIES])
def test_activations_within_3_percent_of_the_whole_step_trace(traced, name):
    """The step's activation total at 2 layers, and one decoder layer's (3 layers minus 2): within 3%."""
    (tr2, es2), (tr3, es3) = traced[name]["2"], traced[name]["3"]
    assert abs(es2 - tr2) <= 0.03 * tr2, (tr2, es2, (es2 - tr2) / tr2)
    assert abs((es3 - es2) - (tr3 - tr2)) <= 0.03 * (tr3 - tr2), (tr3 - tr2, es3 - es2)
