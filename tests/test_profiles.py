"""Profiles: shipped data loads and cites sources; broken files name file + key; the CLI; the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from vramplan.cli import cli
from vramplan.contract import ENV_PROFILES
from vramplan.errors import ProfileError, UsageError
from vramplan.estimate.specs import HardwareSpec, ModelSpec
from vramplan.inputs import profiles as P

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "profiles"
SHIPPED = sorted((REPO / "profiles").rglob("*.toml"))


def test_every_shipped_kind_present():
    assert {"llava-llama3-8b-instruct", "llava-v1.5-7b", "llava-v1.5-13b"} <= set(P.list_profiles("model"))
    assert {"llama-3-8b-instruct", "vicuna-7b-v1.5", "vicuna-13b-v1.5"} <= set(P.list_profiles("llm"))
    assert P.list_profiles("vision") == ["clip-vit-large-patch14-336"]
    assert {"rtx-3090", "rtx-4090", "a10", "l4", "rtx-a6000", "l40s", "a100-40gb", "a100-80gb", "h100-80gb",
            "h200-141gb", "v100-32gb", "t4-16gb", "ascend-910b", "ascend-910b4"} <= set(P.list_profiles("hardware"))
    assert P.list_profiles("recipe") == ["full", "lora", "pretrain", "qlora"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_file_loads_and_cites_sources(path):
    assert P.validate_file(path) == []
    raw = P._read(path)
    assert raw["schema_version"] == 1 and raw["source"].strip()
    assert raw["sources"] and all(v.strip() for v in raw["sources"].values())
    spec = P.load_file(path)
    if isinstance(spec, HardwareSpec):  # every number has its own citation
        nums = [k for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "schema_version"]
        assert set(nums) <= set(raw["sources"])
        assert spec.bf16_supported == (spec.bf16_tflops > 0)
        assert spec.vendor != "ascend" or not spec.bnb_4bit_supported
        assert abs(spec.memory_gib * 2**30 / 1e9 - spec.marketed_memory_gb) / spec.marketed_memory_gb < 0.12
    if isinstance(spec, ModelSpec):
        assert spec.stored_total_bytes and sum(spec.stored_bytes_by_dtype.values()) == spec.stored_total_bytes


def test_recipe_values_from_issue():
    q = P.load_recipe("qlora")
    assert (q.quant, q.double_quant, q.llm_lora.r, q.llm_lora.alpha, q.llm_lora.dropout) == (
        "nf4",
        True,
        512,
        256,
        0.05,
    )
    assert q.llm_lora.targets == ("all-linear",)
    assert (q.vision_lora.r, q.vision_lora.alpha) == (64, 16)
    assert set(q.vision_lora.targets) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert (q.train_projector, q.micro_batch, q.learning_rate, q.epochs, q.save_steps, q.keep_checkpoints) == \
        (True, 1, 2e-4, 1, 500, 2)
    assert q.max_length - q.text_tokens == 576
    lo = P.load_recipe("lora")
    assert (lo.quant, lo.llm_lora.r, lo.llm_lora.alpha, lo.global_batch, lo.max_length, lo.vision_lora) == \
        ("none", 128, 256, 128, 2048, None)
    pt = P.load_recipe("pretrain")
    assert (pt.llm_lora, pt.vision_lora, pt.train_projector, pt.global_batch, pt.learning_rate) == (
        None,
        None,
        True,
        256,
        1e-3,
    )
    full = P.load_recipe("full")
    assert (full.train_llm_full, full.quant, full.global_batch, full.learning_rate) == (True, "none", 128, 2e-5)


@pytest.mark.parametrize("fixture,key,needle", [
    ("unknown-key.toml", "memory_gb", "did you mean 'memory_gib'"),
    ("wrong-type.toml", "marketed_memory_gb", "must be an integer"),
    ("out-of-range.toml", "bf16_tflops", "out of range"),
    ("missing-key.toml", "hbm_bandwidth_gbps", "missing required key"),
    ("missing-source.toml", "sources.interconnect_gbps", "every number needs a source"),
    ("recipe-unknown-nested.toml", "llm_lora.rank", "unknown key"),
    ("bad-kind.toml", "kind", "did you mean 'recipe'"),
    ("model-bad-gqa.toml", "text.num_key_value_heads", "must divide"),
    ("bad-syntax.toml", "", "not valid TOML"),
])
def test_broken_profile_names_file_and_key(fixture, key, needle):
    path = DATA / fixture
    with pytest.raises(ProfileError) as e:
        P.load_file(path)
    err = e.value
    assert err.file == str(path) and err.key == key
    assert err.message.startswith(f"{path}: {key}" if key else str(path))
    assert needle in err.message + " " + err.hint
    assert len(P.validate_file(path)) == 1


def test_unknown_profile_name_suggests(monkeypatch):
    with pytest.raises(UsageError) as e:
        P.load_hardware("rtx-4080")
    assert "rtx-4080" in e.value.message and "rtx-4090" in e.value.hint and "vramplan profiles" in e.value.hint
    with pytest.raises(UsageError, match="vision tower alone"):
        P.load_model("clip-vit-large-patch14-336")
    m = P.load_model("vicuna-7b-v1.5")  # an LLM part is usable as an LLM-only model
    assert m.vision is None and m.projector is None and m.image_tokens == 0


def test_env_dir_overrides_and_extends(tmp_path, monkeypatch):
    (tmp_path / "hardware").mkdir()
    src = (REPO / "profiles" / "hardware" / "rtx-4090.toml").read_text()
    (tmp_path / "hardware" / "rtx-4090.toml").write_text(src.replace("memory_gib = 23.98828125", "memory_gib = 20.0"))
    (tmp_path / "hardware" / "my-card.toml").write_text(src.replace('aliases = ["4090", "rtx4090", "geforce rtx 4090"]',
                                                                    'aliases = ["mycard"]'))
    monkeypatch.setenv(ENV_PROFILES, str(tmp_path))
    assert P.profiles_dirs()[0] == tmp_path
    assert P.load_hardware("rtx-4090").memory_gib == 20.0
    assert "my-card" in P.list_profiles("hardware") and "a100-80gb" in P.list_profiles("hardware")
    from vramplan.inputs.gpus import parse_gpus

    assert parse_gpus("2xMyCard").hardware.name == "my-card"
    monkeypatch.setenv(ENV_PROFILES, str(tmp_path / "typo"))
    with pytest.raises(UsageError, match="VRAMPLAN_PROFILES: .*typo is not a directory"):
        P.load_hardware("rtx-4090")


def test_future_schema_version_rejected(tmp_path):
    src = (REPO / "profiles" / "recipes" / "qlora.toml").read_text()
    f = tmp_path / "qlora.toml"
    f.write_text(src.replace("schema_version = 1", "schema_version = 2"))
    with pytest.raises(ProfileError, match="schema_version: 2 is not supported"):
        P.load_file(f)


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_list_and_show_json():
    r = invoke("profiles", "--json")
    assert r.exit_code == 0, r.output
    env = json.loads(r.stdout)
    assert env["command"] == "profiles" and env["status"] == "ok"
    ids = {row["id"] for k in ("models", "hardware", "recipes") for row in env["data"][k]}
    assert {"llava-llama3-8b-instruct", "rtx-4090", "qlora", "clip-vit-large-patch14-336"} <= ids
    r = invoke("profiles", "show", "llava-llama3-8b-instruct", "--json")
    data = json.loads(r.stdout)["data"]
    assert data["params"]["total"] == 8_355_272_704 and "text" in data["sources"]
    r = invoke("profiles", "show", "h100-80gb")
    assert r.exit_code == 0 and "GiB" in r.stdout and "TFLOPS" in r.stdout and "datasheet" in r.stdout
    r = invoke("profiles", "show", "h100-80")
    assert r.exit_code == 2 and "h100-80gb" in r.stderr and "Traceback" not in r.output


def test_cli_validate_exit_codes(tmp_path):
    assert invoke("profiles", "validate", str(REPO / "profiles")).exit_code == 0
    bad = [str(DATA / "unknown-key.toml"), str(DATA / "wrong-type.toml")]
    r = invoke("profiles", "validate", str(REPO / "profiles" / "recipes" / "qlora.toml"), *bad)
    assert r.exit_code == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("vramplan: error:")]
    assert len(lines) == 2 and "memory_gb" in lines[0] and "marketed_memory_gb" in lines[1]
    r = invoke("profiles", "validate", "--json", *bad)
    env = json.loads(r.stdout)
    assert env["exit_code"] == 2 and env["status"] == "invalid" and len(env["errors"]) == 2
    assert invoke("profiles", "validate", str(tmp_path / "none.toml")).exit_code == 2


def test_wheel_carries_profiles(tmp_path):
    """A non-editable install finds the profiles: the wheel holds vramplan/_profiles/** and, unpacked
    alone on sys.path (no repo profiles/ beside it), loads them."""
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=120)
    if p.returncode != 0 and "hatchling" in p.stderr:
        pytest.skip("hatchling is not installed in this environment")
    assert p.returncode == 0, p.stderr[-2000:]
    whl = next(tmp_path.glob("vramplan-*.whl"))
    with zipfile.ZipFile(whl) as z:
        names = set(z.namelist())
        assert {f"vramplan/_profiles/{f.relative_to(REPO / 'profiles')}" for f in SHIPPED} <= names
        z.extractall(tmp_path / "site")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import vramplan, vramplan.inputs.profiles as P; "
            "assert vramplan.__file__.startswith(sys.argv[1]), vramplan.__file__; "
            "d = P.profiles_dirs(); assert [x.name for x in d] == ['_profiles'], d; "
            "print(P.load_model('llava-llama3-8b-instruct').name, P.load_hardware('a10').name)")
    env = {k: v for k, v in __import__("os").environ.items() if k != ENV_PROFILES}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["llava-llama3-8b-instruct", "a10"]


def test_listing_skips_broken_user_profile_with_warning(tmp_path, monkeypatch):
    (tmp_path / "hardware").mkdir()
    shutil.copy(DATA / "unknown-key.toml", tmp_path / "hardware" / "broken.toml")
    monkeypatch.setenv(ENV_PROFILES, str(tmp_path))
    env = json.loads(invoke("profiles", "--json").stdout)
    assert env["exit_code"] == 0 and "broken" not in {r["id"] for r in env["data"]["hardware"]}
    assert any("broken.toml: memory_gb: unknown key" in w for w in env["warnings"])
    r = invoke("profiles", "show", str(tmp_path / "hardware" / "broken.toml"))
    assert r.exit_code == 2 and "did you mean 'memory_gib'" in r.stderr
