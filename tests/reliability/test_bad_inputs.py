"""Issue 11 "What broke" items 6-8: every bad input is exit 2 with one line naming the file and the field (or
both flags), never exit 1, a traceback, or exit 0 with nonsense; the planner refuses what the trainer cannot
train; contradictory or ignored flags are refused. Each case reproduces an input that gave exit 1, exit 0
or exit 5 before (the one validation layer: vramplan/contract.py value_problem/require/check_plan).
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vramplan.cli import cli

from . import figures

REPO = Path(__file__).resolve().parents[2]

# a tiny LLaVA config.json (transformers LlavaConfig shape): 2-layer Llama, 2-layer CLIP
TINY = {"model_type": "llava", "image_token_index": 319,
        "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                          "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 28, "patch_size": 14}}


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


def assert_bad_input(r, *needles: str) -> str:
    """Exit 2, no traceback, one `vramplan: error:` line naming every needle; returns that line."""
    figures.exit_code(r.exit_code)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vramplan: error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def model_dir(tmp_path: Path, change=None, header: dict | None = None) -> Path:
    """A model dir: TINY config.json after `change(cfg)`, and a model.safetensors with `header` if given."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = copy.deepcopy(TINY)
    if change:
        change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    if header is not None:
        raw = json.dumps(header).encode()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return d


def _set(path: str, value):
    """A change that sets the dotted `path` of a config.json or plan.json dict to `value`."""
    def change(cfg):
        *head, last = path.split(".")
        for k in head:
            cfg = cfg[k]
        cfg[last] = value
    return change


# config.json: (case id, change, needles the one error line names)
CONFIG_CASES = [
    ("hidden_size-abc", _set("text_config.hidden_size", "abc"), ["config.json", "text_config.hidden_size"]),
    ("patch_size-0", _set("vision_config.patch_size", 0), ["config.json", "vision_config.patch_size"]),
    ("text_config-string", _set("text_config", "llama"), ["config.json", "text_config"]),
    ("vision_feature_layer-empty", _set("vision_feature_layer", []), ["config.json", "vision_feature_layer"]),
    ("num_hidden_layers-negative", _set("text_config.num_hidden_layers", -4),
     ["config.json", "text_config.num_hidden_layers"]),
    ("kv_heads-not-dividing", _set("text_config.num_key_value_heads", 3), ["text_config.num_key_value_heads"]),
    ("image_token_index-string", _set("image_token_index", "x"), ["image_token_index"]),
    ("vision_feature_layer-out-of-tower", _set("vision_feature_layer", -9), ["vision_feature_layer"]),
    ("tie_word_embeddings-string", _set("text_config.tie_word_embeddings", "no"),
     ["text_config.tie_word_embeddings"]),
    ("vision_config-list", _set("vision_config", [1]), ["vision_config"]),
    ("hidden_size-bool", _set("vision_config.hidden_size", True), ["vision_config.hidden_size"]),
]


@pytest.mark.parametrize("change,needles", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json_is_exit_2_naming_file_and_field(tmp_path, change, needles):
    d = model_dir(tmp_path, change)
    assert_bad_input(invoke("estimate", "--model", str(d), "--gpus", "1x24G"), *needles)


@pytest.mark.parametrize("path", ["text_config.model_type", "text_config.hidden_size", "vision_feature_layer",
                                  "vision_config.num_channels", "image_token_index"])
def test_null_in_config_json_takes_the_transformers_default(tmp_path, path):
    """null is what transformers writes for "the default": it plans (found by the fuzz: a null text model_type
    was exit 1)."""
    d = model_dir(tmp_path, _set(path, None))
    r = invoke("estimate", "--model", str(d), "--gpus", "1x24G")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output


def test_llama_dir_config_is_checked_too(tmp_path):
    d = tmp_path / "llm"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64.5}))
    assert_bad_input(invoke("estimate", "--model", str(d), "--gpus", "1x24G"), "config.json", "hidden_size")


HEADER_CASES = [
    ("shape-strings", {"w": {"dtype": "F32", "shape": ["a"], "data_offsets": [0, 4]}}, ["model.safetensors", "shape"]),
    ("dtype-number", {"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}}, ["model.safetensors", "dtype"]),
    ("offsets-string", {"w": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}, ["data_offsets"]),
    ("offsets-reversed", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, ["data_offsets"]),
    ("entry-list", {"w": [1, 2]}, ["model.safetensors", "tensor 'w'"]),
    ("shape-negative", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, ["shape"]),
]


@pytest.mark.parametrize("header,needles", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_safetensors_header_is_exit_2(tmp_path, header, needles):
    d = model_dir(tmp_path, header=header)
    assert_bad_input(invoke("estimate", "--model", str(d), "--gpus", "1x24G"), *needles)


def test_bad_safetensors_index_is_exit_2(tmp_path):
    d = model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": ["a.safetensors"]}}))
    assert_bad_input(invoke("estimate", "--model", str(d), "--gpus", "1x24G"), "index.json", "weight_map")


# profiles: memory_gib = nan passed validation; a binary file gave exit 1
def _hardware_toml(memory: str) -> str:
    text = (REPO / "profiles" / "hardware" / "rtx-4090.toml").read_text()
    lines = [f"memory_gib = {memory}" if ln.startswith("memory_gib") else ln for ln in text.splitlines()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("memory", ["nan", "inf", "-inf", "true", '"24"'])
def test_profile_memory_must_be_a_finite_number(tmp_path, memory):
    f = tmp_path / "gpu.toml"
    f.write_text(_hardware_toml(memory))
    assert_bad_input(invoke("profiles", "validate", str(f)), "gpu.toml", "memory_gib")


def test_binary_file_given_to_profiles_validate(tmp_path):
    f = tmp_path / "blob.toml"
    f.write_bytes(bytes(range(256)) * 4)
    assert_bad_input(invoke("profiles", "validate", str(f)), "blob.toml", "not valid TOML")


def test_nan_hardware_profile_is_refused_when_planning(tmp_path):
    (tmp_path / "hardware").mkdir()
    (tmp_path / "hardware" / "nan-gpu.toml").write_text(_hardware_toml("nan"))
    r = invoke("estimate", "--gpus", "1xnan-gpu", env={"VRAMPLAN_PROFILES": str(tmp_path)})
    assert_bad_input(r, "nan-gpu.toml", "memory_gib")


# plan.json: wrong types gave exit 1; micro_batch -2, zero_stage 9, device "tpu", hardware null passed
@pytest.fixture(scope="module")
def good_plan(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = invoke("estimate", "--gpus", "1x24G", "--save-plan", str(out))
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


PLAN_CASES = [
    ("micro_batch-string", "batch.micro_batch", "2"),
    ("micro_batch-negative", "batch.micro_batch", -2),
    ("micro_batch-float", "batch.micro_batch", 1.5),
    ("grad_accum-null", "batch.grad_accum", None),
    ("zero_stage-9", "strategy.zero_stage", 9),
    ("device-tpu", "hardware.device", "tpu"),
    ("hardware-null", "hardware", None),
    ("nodes-zero", "hardware.nodes", 0),
    ("offload-bogus", "strategy.offload", "disk"),
    ("launcher-bogus", "strategy.launcher", "mpirun"),
    ("learning_rate-string", "recipe.learning_rate", "fast"),
    ("learning_rate-zero", "recipe.learning_rate", 0),
    ("epochs-nan", "recipe.epochs", float("nan")),
    ("max_steps-zero", "recipe.max_steps", 0),
    ("save_steps-bool", "recipe.save_steps", True),
    ("lora-r-string", "recipe.llm_lora.r", "8"),
    ("lora-targets-empty", "recipe.llm_lora.targets", []),
    ("quant-none-with-qlora", "recipe.quant", "none"),
    ("model-path-number", "model.path", 5),
    ("dataset-list", "data.dataset", ["a.json"]),
    ("output_dir-number", "output_dir", 3),
    ("ds_config-string", "ds_config", "zero2"),
    ("estimate-list", "estimate", [1]),
    ("estimate-vram-string", "estimate.vram_per_gpu_bytes", "24G"),
]


def _field(path: str) -> str:
    """The name the error line gives a plan path (a LoRA's key is said after its table)."""
    return {"recipe.llm_lora.r": "recipe.llm_lora: r", "recipe.llm_lora.targets": "recipe.llm_lora: targets",
            "recipe.quant": "recipe.quant"}.get(path, path)


@pytest.mark.parametrize("path,value", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_bad_plan_field_is_exit_2_in_preflight_and_run(tmp_path, good_plan, path, value):
    plan = copy.deepcopy(good_plan)
    _set(path, value)(plan)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    for args in (("preflight", "--plan", str(f)), ("run", "--plan", str(f), "--dry-run", "--output",
                                                     str(tmp_path / "run"))):
        assert_bad_input(invoke(*args), "plan.json", _field(path))
    assert not (tmp_path / "run").exists()


def test_resume_checks_the_run_dirs_plan(tmp_path, good_plan):
    plan = copy.deepcopy(good_plan)
    plan["hardware"]["nodes"] = "two"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.json").write_text(json.dumps(plan))
    assert_bad_input(invoke("run", "--resume", "--output", str(tmp_path / "run")), "plan.json", "hardware.nodes")


def test_trainer_refuses_the_same_plan_fields(good_plan, tmp_path):
    """train.config.from_plan reads plan.json through the same contract.read_plan."""
    from train.config import from_plan
    from train.exit_codes import UsageError

    for _, path, value in PLAN_CASES:
        plan = copy.deepcopy(good_plan)
        _set(path, value)(plan)
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        with pytest.raises(UsageError, match=_field(path).replace(".", r"\.")):
            from_plan(str(tmp_path / "plan.json"), {})


# read-only / unusable output targets (as root, a chmod'd dir is writable: a path under a file is not)
def _unwritable(tmp_path: Path) -> Path:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    return blocker / "sub"


def test_save_plan_into_an_unwritable_place(tmp_path):
    target = _unwritable(tmp_path) / "plan.json"
    assert_bad_input(invoke("estimate", "--gpus", "1x24G", "--save-plan", str(target)), "--save-plan")


def test_run_output_in_an_unwritable_place(tmp_path, good_plan):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(good_plan))
    out = _unwritable(tmp_path)
    assert_bad_input(invoke("run", "--plan", str(f), "--output", str(out), "--skip-preflight"), "--output")


def test_demo_dry_run_output_in_an_unwritable_place(tmp_path):
    assert_bad_input(invoke("run", "--demo", "--dry-run", "--output", str(_unwritable(tmp_path))), "--output")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_run_output_read_only_dir(tmp_path, good_plan):
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(good_plan))
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert_bad_input(invoke("run", "--plan", str(f), "--output", str(ro / "run"), "--skip-preflight"), "--output")


# item 7: the planner accepts what the trainer refuses -> refused now, naming both flags
PLANNER_REFUSALS = [
    ("qlora-quant-none", ["--quant", "none"], ["--recipe qlora", "--quant none"]),
    ("full-quant-nf4", ["--recipe", "full", "--quant", "nf4"], ["--recipe full", "--quant nf4"]),
    ("full-quant-int8", ["--recipe", "full", "--quant", "int8"], ["--recipe full", "--quant int8"]),
    ("npu-on-nvidia", ["--device", "npu"], ["--device npu", "--gpus 1x24G"]),
    ("cuda-on-ascend", ["--device", "cuda", "--gpus", "1x910B"], ["--device cuda", "--gpus 1x910B"]),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in PLANNER_REFUSALS], ids=[c[0] for c in PLANNER_REFUSALS])
def test_planner_refuses_what_the_trainer_cannot_train(tmp_path, args, needles):
    gpus = [] if "--gpus" in args else ["--gpus", "1x24G"]
    saved = tmp_path / "plan.json"
    assert_bad_input(invoke("estimate", *gpus, *args, "--save-plan", str(saved)), *needles)
    out = tmp_path / "run"
    assert_bad_input(invoke("run", "--auto", *gpus, *args, "--dry-run", "--output", str(out)), *needles)
    assert not saved.exists() and not out.exists()


def test_qlora_on_ascend_plans_what_the_trainer_trains(tmp_path):
    """No bitsandbytes on an NPU: the plan says quant none for qlora, which the trainer accepts there."""
    from train.config import from_plan

    saved = tmp_path / "plan.json"
    assert invoke("estimate", "--gpus", "1x910B", "--save-plan", str(saved)).exit_code == 0
    plan = json.loads(saved.read_text())
    assert (plan["recipe"]["name"], plan["recipe"]["quant"], plan["hardware"]["device"]) == ("qlora", "none", "npu")
    plan["data"]["dataset"] = str(saved)
    plan["model"] = {"path": str(model_dir(tmp_path)), "chat_template": "llama3"}
    saved.write_text(json.dumps(plan))
    assert from_plan(str(saved), {}).quant == "none"


# item 8: contradictory or ignored flags -> refused, naming both flags
FLAG_CASES = [
    ("batch-over-determined", ["estimate", "--gpus", "1x24G", "--global-batch", "16", "--micro-batch", "8",
                               "--grad-accum", "4"], ["--global-batch", "--micro-batch", "--grad-accum"]),
    ("infer-save-plan", ["estimate", "--gpus", "1x24G", "--task", "infer", "--save-plan", "{tmp}/x.json"],
     ["--save-plan", "--task infer"]),
    ("infer-micro-batch", ["estimate", "--gpus", "1x24G", "--task", "infer", "--micro-batch", "4"],
     ["--micro-batch", "--task infer"]),
    ("candidate-without-save-plan", ["estimate", "--gpus", "1x24G", "--candidate", "3"],
     ["--candidate", "--save-plan"]),
    ("gpus-empty", ["estimate", "--gpus", ""], ["--gpus", "empty"]),
    ("model-empty", ["estimate", "--gpus", "1x24G", "--model", ""], ["--model", "empty"]),
    ("cpu-ram-empty", ["estimate", "--gpus", "1x24G", "--cpu-ram", ""], ["--cpu-ram", "empty"]),
    ("node-rank-one-node", ["run", "--auto", "--gpus", "1x24G", "--dry-run", "--node-rank", "3", "--output",
                            "{tmp}/run"], ["--node-rank 3", "1-node plan"]),
    ("run-batch-over-determined", ["run", "--auto", "--gpus", "1x24G", "--dry-run", "--global-batch", "16",
                                   "--micro-batch", "8", "--grad-accum", "4"], ["--global-batch", "--grad-accum"]),
]


@pytest.mark.parametrize("args,needles", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_contradictory_or_ignored_flags_are_refused(tmp_path, args, needles):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert_bad_input(invoke(*args), *needles)
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "run").exists()


# the trainer: one line, no traceback, exit 2; and `vramplan run` passes its exit 2 through
def _train(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", **extra_env)
    return subprocess.run([sys.executable, "-m", "train", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=str(REPO))


def _cpu_plan(tmp_path: Path, good_plan: dict, **batch) -> Path:
    plan = copy.deepcopy(good_plan)
    (tmp_path / "data.json").write_text("[]")
    plan["model"] = {"path": str(model_dir(tmp_path)), "chat_template": "llama3"}
    plan["recipe"].update(quant="none", name="lora", compute_dtype="fp32")
    plan["hardware"].update(device="cpu", nodes=1, gpus_per_node=1, total_gpus=1)
    plan["strategy"].update(zero_stage=0, offload="none", launcher="python")
    plan.update(ds_config=None, output_dir=str(tmp_path / "run"), data={"dataset": str(tmp_path / "data.json")})
    plan["batch"].update(batch)
    f = tmp_path / "plan.json"
    f.write_text(json.dumps(plan))
    return f


def test_trainer_string_micro_batch_is_one_line_exit_2(tmp_path, good_plan):
    p = _train("--plan", str(_cpu_plan(tmp_path, good_plan, micro_batch="abc")))
    figures.exit_code(p.returncode)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "batch.micro_batch" in errors[0], p.stderr


def test_trainer_unwritable_output_is_one_line_exit_2(tmp_path, good_plan):
    out = _unwritable(tmp_path)
    p = _train("--plan", str(_cpu_plan(tmp_path, good_plan)), "--output", str(out))
    figures.exit_code(p.returncode)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "--output" in errors[0] and str(out) in errors[0], p.stderr


def test_trainer_checks_the_recipe_profile_it_reads(tmp_path):
    """`python -m train` without a plan reads profiles/recipes/<recipe>.toml through the same checks."""
    (tmp_path / "recipes").mkdir()
    text = (REPO / "profiles" / "recipes" / "lora.toml").read_text()
    (tmp_path / "recipes" / "lora.toml").write_text(
        "\n".join('learning_rate = "fast"' if ln.startswith("learning_rate") else ln for ln in text.splitlines()))
    (tmp_path / "data.json").write_text("[]")
    p = _train("--model", str(model_dir(tmp_path)), "--dataset", str(tmp_path / "data.json"), "--recipe", "lora",
               "--output", str(tmp_path / "run"), VRAMPLAN_PROFILES=str(tmp_path))
    figures.exit_code(p.returncode)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and "lora.toml: learning_rate" in errors[0], p.stderr


def test_run_passes_the_trainers_exit_2_through(tmp_path, good_plan):
    """The trainer refuses its input (a dataset that is not there): `vramplan run` exits 2, not 5, and says
    the trainer's line."""
    f = _cpu_plan(tmp_path, good_plan)
    plan = json.loads(f.read_text())
    plan["data"]["dataset"] = str(tmp_path / "gone.json")
    f.write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-m", "vramplan", "run", "--plan", str(f), "--output", str(tmp_path / "run"),
                        "--skip-preflight"], capture_output=True, text=True, env=env, timeout=180, cwd=str(tmp_path))
    figures.exit_code(p.returncode)
    assert p.returncode == 2, p.stderr
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("vramplan: error:"))
    assert "exit 2" in line and "gone.json" in line, p.stderr
    attempts = json.loads((tmp_path / "run" / "attempts.json").read_text())["attempts"]
    assert [a["kind"] for a in attempts] == ["usage"]
