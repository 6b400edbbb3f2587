"""The trainer on a decoder alone (AutoModelForCausalLM) of each family it trains, text-only data in LLaVA
and `messages` form, and the one rule of what it cannot train (vramplan.contract.family_refusal), which
`vramplan run` applies before launch while `vramplan estimate` still answers (docs/trainer.md)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainhelpers import trained_runs
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from train import data as D
from train.config import TrainConfig
from train.exit_codes import UsageError
from train.tiny import DECODER_CONFIGS, build_decoder, build_tokenizer, write_text_dataset
from vramplan.contract import ContractError, check_plan, check_record, family_refusal

MSG = {"id": "m1", "messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "What shape is this?"},
                                {"role": "assistant", "content": "It is a circle."},
                                {"role": "user", "content": "What color is it?"},
                                {"role": "assistant", "content": "It is red."}]}


@pytest.fixture(scope="module")
def chat_tok():
    return build_tokenizer(False, chat_template=True)


def test_messages_use_the_tokenizers_chat_template_and_train_only_answers(chat_tok):
    item = D.encode(MSG, chat_tok, "llama3", None, 0, 512)
    assert trained_runs(chat_tok, item) == ["It is a circle.<|im_end|>\n", "It is red.<|im_end|>\n"]
    text = chat_tok.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "<|start_header_id|>" not in text


def test_messages_without_a_chat_template_and_llava_text_records_use_the_plans(chat_tok):
    plain = build_tokenizer(False)
    item = D.encode(MSG, plain, "llama3", None, 0, 512)
    assert trained_runs(plain, item) == ["It is a circle.<|eot_id|>", "It is red.<|eot_id|>"]
    llava = {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    # LLaVA records keep the plan's template even when the tokenizer has its own
    assert trained_runs(chat_tok, D.encode(llava, chat_tok, "vicuna_v1", None, 0, 512)) == [" Hello.</s>"]


@pytest.mark.parametrize("rec,needle", [
    ({"id": "a", "messages": "hi"}, "'messages' is missing or not a non-empty list"),
    ({"id": "b", "messages": [{"role": "user", "content": ["parts"]}]}, "needs 'role' (user/assistant/system)"),
    ({"id": "c", "messages": [{"role": "assistant", "content": "x"}]}, "alternate user/assistant"),
    ({"id": "d", "messages": [{"role": "user", "content": "x"}]}, "no assistant ('assistant') turn"),
])
def test_bad_messages_records_are_named(tmp_path, rec, needle):
    problems, _ = check_record(rec)
    assert any(needle in p for p in problems), problems
    path = tmp_path / "d.json"
    path.write_text(json.dumps([MSG, rec]))
    with pytest.raises(D.DatasetError) as e:
        D.load_records(str(path), None, vision=False)
    assert e.value.message.startswith(f"dataset record 1 (id {rec['id']!r})") and needle in e.value.message


def test_an_image_record_is_refused_for_a_decoder(tmp_path):
    rec = {"id": "i", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                           {"from": "gpt", "value": "Hello."}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps([rec]))
    with pytest.raises(D.DatasetError, match="decoder without a vision tower"):
        D.load_records(str(path), None, vision=False)


def test_vramplan_scan_and_token_count_accept_messages(tmp_path):
    from vramplan.inputs.dataset import scan_dataset
    from vramplan.inputs.token_count import token_stats

    path = tmp_path / "d.json"
    path.write_text(json.dumps([MSG, {"id": "x", "messages": [{"role": "user", "content": "hi"}]}]))
    rep = scan_dataset(path, None)
    assert rep.samples == 2 and rep.error_count == 1 and "no assistant ('assistant') turn" in rep.errors[0]
    stats = token_stats(path, "llama3")
    assert stats["records"] == 2 and stats["max"] > 10
    tok = build_tokenizer(False)  # no chat template: the trainer renders messages with the plan's, as counted
    tok.save_pretrained(tmp_path / "tok")
    exact = token_stats(path, "llama3", str(tmp_path / "tok"))
    assert exact["method"].startswith("exact") and exact["max"] == len(D.encode(MSG, tok, "llama3", None, 0,
                                                                               10**6)["input_ids"])


@pytest.mark.parametrize("family", sorted(DECODER_CONFIGS))
def test_each_decoder_family_gets_lora_on_every_linear_and_trains_a_step(tmp_path, chat_tok, family):
    """LoRA all-linear reaches every Linear of the decoder but lm_head; one forward/backward gives finite
    gradients to the adapters only (transformers' own class of the family)."""
    import torch
    import torch.nn as nn

    from train.model import model_families, prepare

    base = build_decoder(family, chat_tok)
    assert type(base).__name__ == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base.config.model_type]
    assert model_families(base.config) == {"text_family": family, "vision_family": None, "projector_family": None}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(tmp_path), model_path=str(tmp_path),
                      recipe="lora", compute_dtype="fp32", gradient_checkpointing=False, device="cpu", vision_lora=None)
    linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    model = prepare(base, cfg)
    wrapped = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == linears
    batch = D.collate([D.encode(MSG, chat_tok, "llama3", None, 0, 64)] * 2, chat_tok.pad_token_id)
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_a_decoder_dir_loads_as_a_causal_lm_with_its_attention(tmp_path, chat_tok):
    """load_base: AutoModelForCausalLM, no image processor; Gemma 2 (no SDPA in transformers) falls back to eager."""
    from train.model import check_trainable, load_base

    build_decoder("gemma2", chat_tok).save_pretrained(tmp_path)
    chat_tok.save_pretrained(tmp_path)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(tmp_path), model_path=str(tmp_path),
                      recipe="lora", compute_dtype="fp32", device="cpu")
    fams = check_trainable(str(tmp_path), cfg)
    assert fams == {"text_family": "gemma2", "vision_family": None, "projector_family": None}
    base, tok, ip = load_base(str(tmp_path), cfg, "cpu")
    assert ip is None and type(base).__name__ == "Gemma2ForCausalLM"
    assert base.config._attn_implementation == "eager" and tok.chat_template


def test_qlora_on_a_decoder_end_to_end_with_messages(tmp_path, chat_tok):
    """python -m train's run() on a qwen2 decoder: NF4 + LoRA, messages data through the chat template, 3 steps."""
    from train.training import run

    model_dir = tmp_path / "qwen2"
    build_decoder("qwen2", chat_tok).save_pretrained(model_dir)
    chat_tok.save_pretrained(model_dir)
    data = write_text_dataset(tmp_path / "d.json", 4, messages=True)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(data), model_path=str(model_dir),
                      recipe="qlora", compute_dtype="fp32", device="cpu", max_steps=3, save_steps=10,
                      learning_rate=5e-3, max_length=64)
    assert cfg.vision_lora is not None and cfg.train_projector  # the recipe's: dropped for a decoder alone
    code, model = run(cfg)
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 3
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "projector.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["r"] == cfg.llm_lora.r
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())  # the LLM's linears are NF4


def test_the_trainer_refuses_an_untrainable_family_before_loading(tmp_path):
    import transformers

    from train.training import run

    transformers.MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=64).save_pretrained(tmp_path / "m")
    data = write_text_dataset(tmp_path / "d.json", 2)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(data), model_path=str(tmp_path / "m"),
                      recipe="lora", device="cpu")
    code, _ = run(cfg)
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert code == 2 and "cannot train the mixtral family yet" in failure["message"]
    from train.model import check_trainable

    pre = TrainConfig(output_dir=str(tmp_path / "r2"), dataset=str(data), recipe="pretrain",
                      model_path=str(_llama_dir(tmp_path)), device="cpu")
    with pytest.raises(UsageError, match="pretrain trains a projector"):
        check_trainable(pre.model_path, pre)


def _llama_dir(tmp_path):
    import transformers

    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=64).save_pretrained(tmp_path / "l")
    return tmp_path / "l"


def test_family_refusal_rule():
    ok = [{"text_family": f} for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")]
    ok.append({"text_family": "llama", "vision_family": "clip", "projector_family": "llava"})
    assert [family_refusal(m, "qlora") for m in ok] == [None] * len(ok)
    assert family_refusal({}, "qlora") is None and family_refusal(None, "lora") is None  # older plans
    assert "MoE" in family_refusal({"text_family": "qwen2_moe"}, "lora")
    assert "siglip tower" in family_refusal({"text_family": "qwen2", "vision_family": "siglip",
                                             "projector_family": "llava"}, "lora")
    assert "a decoder alone has none" in family_refusal({"text_family": "llama"}, "pretrain")


def _plan(**model) -> dict:
    return {"schema": "vramplan-plan/1", "model": {"path": "/m", **model},
            "recipe": {"name": "lora", "quant": "none"}, "data": {"dataset": "/d.json"}}


def test_check_plan_refuses_the_family_and_loads_older_plans():
    assert check_plan(_plan(), "plan.json")  # written before model.*_family existed
    assert check_plan(_plan(text_family="qwen3", vision_family=None, projector_family=None), "plan.json")
    with pytest.raises(ContractError) as e:
        check_plan(_plan(text_family="mixtral"), "plan.json")
    assert e.value.message.startswith("plan.json: model mixtral: the bundled trainer cannot train the mixtral")
    with pytest.raises(ContractError, match="model.text_family: must be a string"):
        check_plan(_plan(text_family=3), "plan.json")


def test_run_refuses_what_estimate_still_plans(tmp_path, monkeypatch):
    """A family the trainer cannot train (here: mistral taken off the list): estimate answers and says so,
    `vramplan run` exits 2 with the reason before anything is written."""
    import transformers
    from click.testing import CliRunner

    import vramplan.contract as contract
    from vramplan.cli import cli

    transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=320).save_pretrained(tmp_path / "m")
    monkeypatch.setattr(contract, "TRAINER_TEXT_FAMILIES", ("llama",))
    flags = ["--model", str(tmp_path / "m"), "--gpus", "1x24G", "--recipe", "lora", "--json"]
    est = CliRunner().invoke(cli, ["estimate", *flags])
    assert est.exit_code == 0, est.output
    data = json.loads(est.stdout)["data"]
    assert any("`vramplan run` will refuse this plan: the bundled trainer cannot train the mistral" in a
               for a in data["assumptions"])
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["run", "--auto", *flags, "--output", str(out), "--dry-run", "--skip-preflight"])
    assert res.exit_code == 2 and "cannot train the mistral family yet" in res.output
    assert not out.exists()
    plan = tmp_path / "plan.json"
    assert CliRunner().invoke(cli, ["estimate", *flags, "--save-plan", str(plan)]).exit_code == 0
    assert json.loads(plan.read_text())["model"]["text_family"] == "mistral"
    res = CliRunner().invoke(cli, ["run", "--plan", str(plan), "--output", str(out), "--dry-run", "--skip-preflight"])
    assert res.exit_code == 2 and "model mistral: the bundled trainer cannot train" in res.output


def test_llava_next_trains_through_its_own_classes_with_anyres_tokens(tiny, tmp_path):
    """LLaVA-NeXT: LlavaNextForConditionalGeneration (NF4 LLM) + LlavaNextProcessor; each image takes its
    anyres grid's tokens (the processor's count, by aspect), patch stacks pad in a batch, and a QLoRA
    forward/backward reaches the LLM LoRA, the CLIP LoRA and the projector."""
    import torch

    from train.model import ANYRES, check_trainable, load_base, prepare
    from train.tiny import build_llava_next, build_tokenizer

    model_dir = build_llava_next(build_tokenizer(True), tmp_path / "next")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), dataset=str(tiny / "data.json"), images=str(tiny / "images"),
                      model_path=str(model_dir), recipe="qlora", compute_dtype="fp32", device="cpu",
                      gradient_checkpointing=False)
    fams = check_trainable(str(model_dir), cfg)
    assert fams == {"text_family": "llama", "vision_family": "clip", "projector_family": "llava_next"}
    base, tok, proc = load_base(str(model_dir), cfg, "cpu", families=fams)
    assert type(base).__name__ == "LlavaNextForConditionalGeneration" and fams["projector_family"] in ANYRES
    model = prepare(base, cfg)
    recs = D.load_records(cfg.dataset, cfg.images)[:2]
    ds = D.LlavaDataset(recs, tok, proc, "llama3", base.config.image_token_index, 0, 512, cfg.images, anyres=True)
    items = [ds[0], ds[1]]
    for rec, item in zip(recs, items, strict=True):
        from PIL import Image

        w, h = Image.open(tiny / "images" / rec["image"]).size
        want = proc(images=Image.new("RGB", (w, h)), text="<image>", return_tensors="pt")["input_ids"]
        assert item["input_ids"].count(base.config.image_token_index) == int((want == base.config.image_token_index)
                                                                             .sum()) > 4
        assert item["image_sizes"].tolist() == [h, w]
    batch = D.collate(items, tok.pad_token_id)
    assert batch["pixel_values"].dim() == 5 and batch["image_sizes"].shape == (2, 2)
    loss = model(**batch).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert torch.isfinite(loss) and any("vision_tower" in n and "lora_" in n for n in trained)
    assert any("language_model" in n and "lora_" in n for n in trained)
    assert any("multi_modal_projector" in n for n in trained)
