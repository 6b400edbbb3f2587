"""Trainer unit tests: exit codes, config validation, data (templates, masking, truncation, bad records),
projector key layouts, assembly from parts, checkpoint manifest / free-space rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainhelpers import trained_runs

from train import checkpoint as ck
from train import data as D
from train.config import LoraSpec, TrainConfig
from train.exit_codes import DatasetError, DiskFullError, ExitCode, UsageError


def test_exit_codes_are_the_shared_table():
    from vramplan import contract
    from vramplan.errors import ExitCode as V

    assert ExitCode is V is contract.ExitCode  # one enum, re-exported by both sides
    assert {e.name: int(e) for e in ExitCode} == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "NO_FIT": 3, "PREFLIGHT_FAILED": 4, "TRAIN_FAILED": 5,
        "OUT_OF_MEMORY": 6, "DISK_FULL": 7, "INTERRUPTED": 130}


def test_trainer_imports_only_the_contract_of_vramplan():
    """train/ may import vramplan.contract (stdlib only) and nothing else of vramplan."""
    import ast

    offenders = []
    for f in Path(__file__).resolve().parents[2].joinpath("train").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [f"{node.module}.{a.name}" if node.module == "vramplan" else node.module for a in node.names]
            else:
                continue
            offenders += [f"{f.name}:{node.lineno} {m}" for m in mods
                          if m.split(".")[0] == "vramplan" and m != "vramplan.contract"]
    assert not offenders, offenders


def test_contract_imports_no_other_vramplan_module():
    import subprocess
    import sys

    code = ("import sys, vramplan.contract, train.config, train.data, train.exit_codes, train.checkpoint; "
            "print(sorted(m for m in sys.modules if m.startswith('vramplan')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['vramplan', 'vramplan.contract']"


def _cfg(tiny, **kw) -> TrainConfig:
    base = dict(output_dir=str(tiny / "out"), dataset=str(tiny / "data.json"), images=str(tiny / "images"),
                model_path=str(tiny / "model"), compute_dtype="fp32")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("kw,flag", [({"micro_batch": 0}, "--micro-batch"), ({"recipe": "dpo"}, "--recipe"),
                                     ({"model_path": "/nope"}, "--model"), ({"quant": "none"}, "--quant"),
                                     ({"save_steps": -1}, "--save-steps")])
def test_config_validation_names_the_flag(tiny, kw, flag):
    with pytest.raises(UsageError) as e:
        _cfg(tiny, **kw)
    assert e.value.message.startswith(flag)


@pytest.fixture(scope="module")
def tok_ip(tiny):
    from transformers import AutoImageProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny / "model"), AutoImageProcessor.from_pretrained(tiny / "model")


REC = {"id": "r1", "image": "img_0000.png", "conversations": [
    {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "What color is it?"}, {"from": "gpt", "value": "It is red."}]}


@pytest.mark.parametrize("template,answers", [
    ("llama3", ["A red circle.<|eot_id|>", "It is red.<|eot_id|>"]),
    ("vicuna_v1", [" A red circle.</s>", " It is red.</s>"])])
def test_labels_mask_everything_but_assistant_turns(tok_ip, template, answers):
    tok, _ = tok_ip
    img_id = tok.convert_tokens_to_ids("<image>")
    item = D.encode(REC, tok, template, img_id, 4, 512)
    ids, labels = item["input_ids"], item["labels"]
    assert len(ids) == len(labels) and ids.count(img_id) == 4
    # contiguous runs of trained tokens are exactly the assistant answers (with their end token)
    assert trained_runs(tok, item) == answers
    text = tok.decode(ids)
    assert ("USER:" in text) == (template == "vicuna_v1") and ("<|start_header_id|>" in text) == (template == "llama3")


def test_image_placeholder_added_when_missing(tok_ip):
    tok, _ = tok_ip
    rec = dict(REC, conversations=[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A cat."}])
    item = D.encode(rec, tok, "llama3", tok.convert_tokens_to_ids("<image>"), 4, 512)
    assert item["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == 4


def test_truncation_never_cuts_image_tokens(tok_ip):
    tok, _ = tok_ip
    img_id = tok.convert_tokens_to_ids("<image>")
    full = D.encode(REC, tok, "llama3", img_id, 4, 512)
    short = D.encode(REC, tok, "llama3", img_id, 4, 20)
    assert len(short["input_ids"]) == 20 < len(full["input_ids"])
    assert short["input_ids"] == full["input_ids"][:20] and short["input_ids"].count(img_id) == 4
    img_end = max(i for i, x in enumerate(full["input_ids"]) if x == img_id) + 1
    with pytest.raises(DatasetError) as e:  # the image block itself does not fit: clear error, no silent cut
        D.encode(REC, tok, "llama3", img_id, 4, img_end - 1, index=7)
    assert "record 7" in e.value.message and "'r1'" in e.value.message and "max_length" in e.value.message
    assert e.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize("rec,needle", [
    ({"id": "a", "image": "img_0000.png"}, "'conversations' is missing"),
    ({"id": "b", "conversations": [{"from": "human", "value": "hi"}]}, "no assistant"),
    ({"id": "c", "image": "nope.png", "conversations": [{"from": "gpt", "value": "x"}]}, "not found"),
    ({"id": "d", "conversations": [{"from": "robot", "value": "x"}]}, "turn 0"),
    ({"id": "e", "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]},
     "no 'image' field"),
])
def test_bad_records_name_the_record(tiny, tmp_path, rec, needle):
    good = json.loads((tiny / "data.json").read_text())[0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, rec]))
    with pytest.raises(DatasetError) as e:
        D.load_records(str(path), str(tiny / "images"))
    assert f"dataset record 1 (id {rec['id']!r})" in e.value.message and needle in e.value.message


def test_not_a_list_and_unreadable_image(tiny, tmp_path, tok_ip):
    p = tmp_path / "d.json"
    p.write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="non-empty JSON list"):
        D.load_records(str(p), None)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    tok, ip = tok_ip
    rec = dict(REC, image="broken.png")
    ds = D.LlavaDataset([rec], tok, ip, "llama3", tok.convert_tokens_to_ids("<image>"), 4, 512, str(tmp_path))
    with pytest.raises(DatasetError, match=r"record 0 \(id 'r1'\): cannot read image"):
        ds[0]


def test_pad_to_square_uses_image_mean_and_centres():
    from PIL import Image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = D.expand2square(img, (10, 20, 30))
    assert sq.size == (40, 40)
    assert sq.getpixel((0, 0)) == (10, 20, 30) and sq.getpixel((20, 20)) == (255, 0, 0)
    assert sq.getpixel((20, 9)) == (10, 20, 30) and sq.getpixel((20, 10)) == (255, 0, 0)


def test_dataset_item_and_collate(tiny, tok_ip):
    tok, ip = tok_ip
    recs = D.load_records(str(tiny / "data.json"), str(tiny / "images"))
    ds = D.LlavaDataset(recs, tok, ip, "llama3", tok.convert_tokens_to_ids("<image>"), 4, 512, str(tiny / "images"))
    short = dict(recs[0], conversations=recs[0]["conversations"][:2])
    batch = D.collate([ds[0], D.LlavaDataset([short], tok, ip, "llama3", tok.convert_tokens_to_ids("<image>"), 4,
                                             512, str(tiny / "images"))[0]], tok.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    n0 = len(ds[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == n0 and batch["attention_mask"][1].sum() < n0
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == D.IGNORE).all()


@pytest.mark.parametrize("name", ["projector_xtuner.safetensors", "projector_xtuner.pth", "mm_projector.bin"])
def test_projector_key_layouts(tiny, name):
    from safetensors.torch import load_file

    from train.model import load_projector_state

    ref = load_file(str(tiny / "parts" / "projector_xtuner.safetensors"))
    sd = load_projector_state(str(tiny / "parts" / name))
    assert set(sd) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    for i, lin in ((0, "linear_1"), (2, "linear_2")):
        for n in ("weight", "bias"):
            assert sd[f"{lin}.{n}"].equal(ref[f"projector.model.{i}.{n}"])


def test_projector_bad_file(tmp_path):
    import torch

    from train.model import load_projector_state

    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "p.bin")
    with pytest.raises(UsageError, match="no 2-layer projector"):
        load_projector_state(str(tmp_path / "p.bin"))
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(UsageError, match="cannot read"):
        load_projector_state(str(tmp_path / "x.safetensors"))


def test_assembly_from_parts_equals_hf_dir(tiny, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from train.model import assemble

    p = tiny / "parts"
    cfg = TrainConfig(output_dir=str(tmp_path), dataset=str(tiny / "data.json"), llm_path=str(p / "llm"),
                      vision_path=str(p / "clip"), projector_path=str(p / "mm_projector.bin"), recipe="lora",
                      quant="none", compute_dtype="fp32")
    out = assemble(cfg, tmp_path / "assembled")
    a = LlavaForConditionalGeneration.from_pretrained(out)
    b = LlavaForConditionalGeneration.from_pretrained(tiny / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    added = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<image>")  # the row the assembly adds
    assert added == len(AutoTokenizer.from_pretrained(p / "llm"))
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        if k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            # the <image> row is new (mean-resized, like XTuner's conversion); every original row is identical
            assert sa[k][:added].equal(sb[k][:added]) and not sa[k][added].equal(sb[k][added]), k
        else:
            assert sa[k].equal(sb[k]), k
    assert a.config.image_token_index == b.config.image_token_index
    assert a.config.image_seq_length == b.config.image_seq_length == 4
    assert len(AutoTokenizer.from_pretrained(out)) == len(AutoTokenizer.from_pretrained(tiny / "model"))


# ---- checkpoint protocol units ----

def _fake_ckpt(root: Path, step: int, size: int = 1000) -> Path:
    staged = ck.tmp_dir(root, step, "t") / f"checkpoint-{step}"
    (staged / "sub").mkdir(parents=True)
    (staged / "a.bin").write_bytes(bytes(range(256)) * (size // 256))
    (staged / "sub" / "b.json").write_text(json.dumps({"step": step}))
    dest, man = ck.finalize(staged, root, step)
    assert man["complete"] and set(man["files"]) == {"a.bin", "sub/b.json"}
    return dest


def test_manifest_detects_truncation_corruption_and_missing(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    c2, c4, c6 = (_fake_ckpt(root, s) for s in (2, 4, 6))
    assert not list(root.glob(ck.TMP_PREFIX + "*"))
    assert ck.newest_verified(root) == (c6, [])
    data = bytearray((c6 / "a.bin").read_bytes())
    data[10] ^= 0xFF  # same size, different bytes: only the sha256 catches it
    (c6 / "a.bin").write_bytes(bytes(data))
    assert ck.verify(c6, deep=False) and not ck.verify(c6, deep=True)
    (c4 / "a.bin").write_bytes(b"short")
    assert ck.newest_verified(root) == (c2, ["checkpoint-6", "checkpoint-4"])
    (c2 / ck.MANIFEST).unlink()
    assert ck.newest_verified(root)[0] is None


def test_prune_keeps_newest_verified_and_drops_unverified(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for s in (2, 4, 6):
        _fake_ckpt(root, s)
    (root / "checkpoint-5").mkdir()  # a partial dir with no manifest
    removed = ck.prune(root, keep=2)
    assert sorted(removed) == ["checkpoint-2", "checkpoint-5"]
    assert [p.name for _s, p in ck.list_checkpoints(root)] == ["checkpoint-4", "checkpoint-6"]


def test_free_space_check_makes_space_safely_or_fails(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    for s in (2, 4, 6):
        _fake_ckpt(root, s)
    (ck.tmp_dir(root, 8, "dead")).mkdir()
    free = {"n": 10_000}
    monkeypatch.setattr(ck, "free_bytes", lambda _p: free["n"])
    ck.ensure_space(root, 5_000, keep=2)  # enough: nothing removed
    assert len(ck.list_checkpoints(root)) == 3
    # not enough; freeing one old checkpoint helps: keep=2 would leave 4 and the new one anyway
    removed = []
    real_rmtree = ck.shutil.rmtree

    def rm(p, *a, **k):
        removed.append(Path(p).name)
        free["n"] += 3_000
        real_rmtree(p, *a, **k)
    monkeypatch.setattr(ck.shutil, "rmtree", rm)
    free["n"] = 8_000
    ck.ensure_space(root, 11_000, keep=2)  # needs 12_100: the partial dir (+3_000) is not enough
    assert (
        removed == [".tmp-checkpoint-8-dead", "checkpoint-2"]
        and (root / "checkpoint-6").exists()
        and (root / "checkpoint-4").exists()
    )
    assert not list(root.glob(ck.TMP_PREFIX + "*"))
    # impossible: the newest verified checkpoint is never sacrificed
    free["n"] = 0
    with pytest.raises(DiskFullError) as e:
        ck.ensure_space(root, 10**9, keep=1)
    assert e.value.exit_code == ExitCode.DISK_FULL and "checkpoint-6" in e.value.message
    assert ck.verify(root / "checkpoint-6")


def test_finalize_failure_is_disk_full_and_cleans_up(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    root.mkdir()
    staged = ck.tmp_dir(root, 3, "x") / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "a").write_bytes(b"data")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ck, "build_manifest", boom)
    with pytest.raises(DiskFullError, match="No space left"):
        ck.finalize(staged, root, 3)
    assert not (root / "checkpoint-3").exists() and not staged.parent.exists()


def test_lora_spec_from_plan_dict(tiny, tmp_path):
    from train.config import from_plan
    from vramplan.contract import ContractError

    assert LoraSpec.from_dict({"r": 8, "alpha": 16, "targets": ["q_proj"]}, "x") == LoraSpec(8, 16, 0.05, ("q_proj",))
    assert LoraSpec(8, 16).targets == LoraSpec(8, 16, 0.05, "all-linear").targets == ("all-linear",)
    with pytest.raises(ContractError, match="recipe.llm_lora"):
        LoraSpec.from_dict({"alpha": 1}, "plan recipe.llm_lora")
    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model")}, "recipe": {"llm_lora": {"alpha": 1}},
            "data": {"dataset": str(tiny / "data.json")}, "output_dir": str(tmp_path)}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(UsageError, match=r"plan.json: recipe.llm_lora: needs r, alpha"):
        from_plan(str(tmp_path / "plan.json"), {})


def test_flags_accept_deepspeed_local_rank_and_plan_overrides(tiny, tmp_path):
    import argparse

    from train.config import add_flags, from_args

    ap = argparse.ArgumentParser()
    add_flags(ap)
    ns = ap.parse_args(["--local_rank=1", "--model", str(tiny / "model"), "--dataset", str(tiny / "data.json"),
                        "--output", str(tmp_path), "--recipe", "lora", "--lora-r", "4", "--vision-lora-r", "2"])
    cfg = from_args(ns)
    assert ns.local_rank == 1 and cfg.recipe == "lora" and cfg.quant == "none"
    assert cfg.llm_lora.r == 4 and cfg.vision_lora.r == 2 and cfg.vision_lora.targets[0] == "q_proj"
    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model")},
            "recipe": {"name": "pretrain", "llm_lora": None, "vision_lora": None, "max_steps": 9},
            "batch": {"micro_batch": 2, "grad_accum": 4}, "data": {"dataset": str(tiny / "data.json")},
            "output_dir": str(tmp_path / "o"), "estimate": {"checkpoint_bytes": 123}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = from_args(ap.parse_args(["--plan", str(tmp_path / "plan.json"), "--max-steps", "3", "--resume"]))
    assert (cfg.recipe, cfg.max_steps, cfg.micro_batch, cfg.grad_accum, cfg.resume) == ("pretrain", 3, 2, 4, True)
    assert cfg.expected_checkpoint_bytes == 123 and cfg.output_dir == str(tmp_path / "o")
    (tmp_path / "bad.json").write_text('{"schema": "other"}')
    with pytest.raises(UsageError, match="not a vramplan plan"):
        from_args(ap.parse_args(["--plan", str(tmp_path / "bad.json")]))


def test_text_only_record_mixes_with_image_records_in_a_batch(tiny, tok_ip):
    import torch
    from transformers import LlavaForConditionalGeneration

    tok, ip = tok_ip
    model = LlavaForConditionalGeneration.from_pretrained(tiny / "model")
    recs = D.load_records(str(tiny / "data.json"), str(tiny / "images"))
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    D.validate_record(text_only, 0, tiny / "images")
    ds = D.LlavaDataset([recs[0], text_only], tok, ip, "vicuna_v1", model.config.image_token_index, 4, 512,
                        str(tiny / "images"))
    batch = D.collate([ds[0], ds[1]], tok.pad_token_id)
    assert batch["pixel_values"].shape[0] == 1 and "pixel_values" not in ds[1]
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_sigint_then_forwarded_sigterm_is_one_stop_request(tmp_path):
    """deepspeed launcher + terminal Ctrl-C: workers get SIGINT, then the launcher's SIGTERM."""
    import signal

    from train.config import TrainConfig
    from train.engine import RunState, install_signal_handlers

    (tmp_path / "d.json").write_text("[]")
    cfg = TrainConfig(output_dir=str(tmp_path), dataset=str(tmp_path / "d.json"), model_path=str(tmp_path))
    run = RunState(cfg=cfg, device="cpu")
    old = install_signal_handlers(run)
    try:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert run.stop_requested
        handler(signal.SIGTERM, None)  # forwarded by the launcher: same request, no abort
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)  # a second Ctrl-C: abort now
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _ns(*args: str):
    import argparse

    from train.config import add_flags

    ap = argparse.ArgumentParser()
    add_flags(ap)
    return ap.parse_args(list(args))


@pytest.mark.parametrize("recipe", ["qlora", "lora", "pretrain", "full"])
def test_recipe_defaults_equal_what_vramplan_plans(tmp_path, recipe):
    """`python -m train --recipe R` without a plan trains with the recipe profile vramplan plans with."""
    from train.config import from_args
    from vramplan.contract import RECIPE_TRAIN_KEYS
    from vramplan.inputs.profiles import load_recipe

    (tmp_path / "d.json").write_text("[]")
    flags = ["--model", str(tmp_path), "--dataset", str(tmp_path / "d.json"), "--output", str(tmp_path / "o")]
    spec = load_recipe(recipe)
    for cfg in (from_args(_ns(*flags, "--recipe", recipe)),
                TrainConfig(output_dir=str(tmp_path), dataset=str(tmp_path / "d.json"), model_path=str(tmp_path),
                            recipe=recipe)):
        for key in (*RECIPE_TRAIN_KEYS, "llm_lora", "vision_lora"):
            assert getattr(cfg, key) == getattr(spec, key), key
    if recipe == "qlora":
        assert (cfg.llm_lora.r, cfg.llm_lora.alpha, cfg.vision_lora.r) == (512, 256, 64)


def test_lora_flags_adjust_or_drop_the_recipe_lora(tmp_path):
    from train.config import from_args

    (tmp_path / "d.json").write_text("[]")
    flags = ["--model", str(tmp_path), "--dataset", str(tmp_path / "d.json"), "--output", str(tmp_path / "o")]
    cfg = from_args(_ns(*flags, "--lora-r", "64", "--vision-lora-r", "0"))
    assert (cfg.llm_lora.r, cfg.llm_lora.alpha, cfg.llm_lora.targets, cfg.vision_lora) == (
        64,
        256,
        ("all-linear",),
        None,
    )
    cfg = from_args(_ns(*flags, "--vision-lora-alpha", "8"))
    assert (cfg.vision_lora.r, cfg.vision_lora.alpha, cfg.llm_lora.r) == (64, 8, 512)


def test_plan_without_recipe_keys_takes_the_recipe_profile(tmp_path):
    from train.config import from_plan
    from vramplan.contract import recipe_defaults

    (tmp_path / "d.json").write_text("[]")
    plan = {
        "schema": "vramplan-plan/1",
        "model": {"path": str(tmp_path)},
        "data": {"dataset": str(tmp_path / "d.json")},
        "recipe": {"name": "lora", "learning_rate": 1e-4, "vision_lora": None},
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = from_plan(str(tmp_path / "plan.json"), {})
    lora = recipe_defaults("lora")
    assert cfg.learning_rate == 1e-4 and cfg.vision_lora is None  # the plan's values (null: no such LoRA)
    assert (cfg.quant, cfg.llm_lora, cfg.save_steps) == (lora["quant"], lora["llm_lora"], lora["save_steps"])


def test_workers_and_attn_flags_reach_the_dataloader_and_the_model(tiny, tmp_path):
    from train import engine
    from train.config import from_args
    from train.model import load_base

    cfg = from_args(_ns("--model", str(tiny / "model"), "--dataset", str(tiny / "data.json"), "--images",
                        str(tiny / "images"), "--output", str(tmp_path), "--recipe", "lora", "--compute-dtype", "fp32",
                        "--workers", "2", "--attn", "eager"))
    assert (cfg.dataloader_workers, cfg.attn_implementation) == (2, "eager")
    model, tok, ip = load_base(cfg.model_path, cfg, "cpu")
    assert model.config.text_config._attn_implementation == "eager"
    records = D.load_records(cfg.dataset, cfg.images)
    ds = D.LlavaDataset(records, tok, ip, "llama3", model.config.image_token_index, 4, 512, cfg.images)
    trainer = engine.SafeCheckpointTrainer(model=model, args=engine.training_args(cfg, "cpu", 1), train_dataset=ds,
                                           data_collator=lambda b: D.collate(b, tok.pad_token_id))
    assert trainer.get_train_dataloader().num_workers == 2
    with pytest.raises(UsageError, match="--workers"):
        _cfg(tiny, dataloader_workers=-1)


def test_plan_state_fields_reach_the_model(tiny, tmp_path):
    """The plan's trainable_dtype, modules_to_save, lm_head LoRA and optimizer are what the trainer builds
    (vramplan estimates exactly these: vramplan/estimate/optimizers.py, param_groups.py)."""
    import torch

    from train import engine
    from train.config import from_plan
    from train.model import load_base, prepare

    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model")},
            "recipe": {"name": "lora", "quant": "none", "compute_dtype": "bf16", "train_projector": True,
                       "llm_lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "lm_head"]},
                       "vision_lora": None, "optimizer": "adamw_8bit", "trainable_dtype": "bf16",
                       "modules_to_save": ["embed_tokens"]},
            "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images")}, "output_dir": str(tmp_path),
            "ds_config": None}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = from_plan(str(tmp_path / "plan.json"), {})
    assert (cfg.trainable_dtype, cfg.modules_to_save, cfg.optimizer) == ("bf16", ("embed_tokens",), "adamw_8bit")
    model, _tok, _ip = load_base(cfg.model_path, cfg, "cpu")
    model = prepare(model, cfg)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in trained.values())  # pure bf16 without DeepSpeed
    assert any("lm_head.lora_A" in n for n in trained) and any("embed_tokens.modules_to_save" in n for n in trained)
    assert engine.training_args(cfg, "cpu", 1).optim.value == "adamw_8bit"  # HF `optim`: bitsandbytes AdamW8bit
    # "peft": as peft leaves them, fp32 adapters and the modules_to_save copies in the model's dtype
    plan["recipe"]["trainable_dtype"] = "peft"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = from_plan(str(tmp_path / "plan.json"), {})
    model = prepare(load_base(cfg.model_path, cfg, "cpu")[0], cfg)
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert {d for n, d in trained.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in trained.items() if "lora_" not in n} == {torch.bfloat16}
    with pytest.raises(UsageError, match="trainable_dtype"):
        _cfg(tiny, trainable_dtype="fp8")


def test_kbit_embed_dtype_casts_embeddings_back_and_trains(tiny, tmp_path):
    """recipe kbit_embed_dtype bf16 (vramplan --kbit-embed-dtype): after prepare_model_for_kbit_training the frozen
    embeddings and lm_head are bf16 again, the norms stay fp32 (TRL peft_module_casting_to_bf16), and the mixed
    model trains: a bf16-autocast forward/backward gives a finite loss and LoRA gradients."""
    import torch

    from train.config import from_plan
    from train.model import load_base, prepare

    plan = {"schema": "vramplan-plan/1", "model": {"path": str(tiny / "model")},
            "recipe": {"name": "qlora", "quant": "nf4", "compute_dtype": "bf16", "kbit_embed_dtype": "bf16",
                       "llm_lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["all-linear"]},
                       "vision_lora": None},
            "data": {"dataset": str(tiny / "data.json"), "images": str(tiny / "images")}, "output_dir": str(tmp_path),
            "ds_config": None}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    cfg = from_plan(str(tmp_path / "plan.json"), {})
    assert cfg.kbit_embed_dtype == "bf16"
    model, tok, ip = load_base(cfg.model_path, cfg, "cpu")
    model = prepare(model, cfg)
    dt = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dt.items() if "embed_tokens" in n or "lm_head" in n} == {torch.bfloat16}
    assert {d for n, d in dt.items() if "language_model" in n and n.endswith("norm.weight")} == {torch.float32}
    recs = D.load_records(str(tiny / "data.json"), str(tiny / "images"))
    ds = D.LlavaDataset(recs, tok, ip, "llama3", model.config.image_token_index, model.config.image_seq_length, 512,
                        str(tiny / "images"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate's bf16 autocast, as in training
        loss = model(**D.collate([ds[0], ds[1]], tok.pad_token_id)).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and "language_model" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(UsageError, match="kbit_embed_dtype"):
        _cfg(tiny, kbit_embed_dtype="fp16")


def test_attn_flash_is_flash_attention_2_and_needs_cuda(tiny, tmp_path):
    from train.config import from_args
    from train.model import load_base

    cfg = from_args(_ns("--model", str(tiny / "model"), "--dataset", str(tiny / "data.json"), "--images",
                        str(tiny / "images"), "--output", str(tmp_path), "--recipe", "lora", "--attn", "flash"))
    assert cfg.attn_implementation == "flash"
    with pytest.raises(UsageError, match="--attn flash: FlashAttention-2 needs a CUDA GPU"):
        load_base(cfg.model_path, cfg, "cpu")
