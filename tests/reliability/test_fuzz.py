"""A hypothesis fuzz of every file format vramplan reads and of the flags of estimate, run --dry-run,
preflight --plan and profiles validate (issue 11): whatever the input, the exit code is never 1 (an internal
error) and no traceback is printed. Derandomized, so a run is repeatable; sized to stay well under a minute.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramplan.cli import cli
from vramplan.contract import ContractError, check_record

from . import figures
from .test_bad_inputs import REPO, TINY


def fuzz(n: int) -> settings:
    """`n` derandomized examples (the same inputs every run), no deadline (the first estimate imports)."""
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# JSON values of every type, with the edge values that broke readers before (0, -1, huge, nan, inf, "")
scalars = st.one_of(st.none(), st.booleans(), st.sampled_from([0, -1, 1, 2, 3, -4, 2**40, 10**30]),
                    st.integers(-10, 10**6), st.sampled_from([0.0, -0.5, 1.5, math.nan, math.inf, -math.inf, 1e308]),
                    st.sampled_from(["", "abc", "llama", "nf4", "none", "tpu", "all-linear", "\x00", "é" * 3]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)


def invoke(*args: str, env: dict | None = None) -> int:
    """Run a command in-process; assert it is not an internal error and printed no traceback."""
    r = CliRunner().invoke(cli, list(args), env=env)
    figures.tally("inputs_fuzzed")
    figures.exit_code(r.exit_code)
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception))
    assert r.exit_code != 1 and "Traceback" not in r.output, (args, r.output[-2000:])
    return r.exit_code


def _paths(obj, prefix=()):
    """Every (path to a value) of a nested dict, tables included."""
    for k, v in obj.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


def _put(obj: dict, path: tuple, value) -> dict:
    obj = copy.deepcopy(obj)
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    cur[path[-1]] = value
    return obj


CONFIG_PATHS = list(_paths(TINY)) + [("vision_feature_layer",), ("torch_dtype",), ("text_config", "head_dim"),
                                     ("projector_hidden_act",), ("multimodal_projector_bias",)]


@fuzz(80)
@given(edits=st.lists(st.tuples(st.sampled_from(CONFIG_PATHS), json_values), min_size=1, max_size=3))
def test_fuzz_config_json(edits):
    cfg = TINY
    for path, value in edits:
        try:
            cfg = _put(cfg, path, value)
        except (TypeError, KeyError, IndexError):  # an earlier edit made a table a scalar: keep going
            continue
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        invoke("estimate", "--model", d, "--gpus", "1x24G", "--json")


header_entries = st.one_of(
    json_values,
    st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(["F32", "BF16", "I8", "X9"]), json_values),
                           "shape": st.one_of(st.lists(st.integers(-2, 8), max_size=3), json_values),
                           "data_offsets": st.one_of(st.lists(st.integers(-4, 64), max_size=3), json_values)}))


@fuzz(50)
@given(header=st.dictionaries(st.sampled_from(["w", "b", "__metadata__"]), header_entries, max_size=3),
       raw=st.one_of(st.none(), st.binary(max_size=24)))
def test_fuzz_safetensors_header(header, raw):
    data = json.dumps(header).encode() if raw is None else raw
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(TINY))
        (Path(d) / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data + b"\0" * 32)
        invoke("estimate", "--model", d, "--gpus", "1x24G", "--json")


TOML_VALUES = ["nan", "inf", "-inf", "0", "-1", "1e400", '"24"', "true", "[]", "[1, 2]", "{}", '""', "24.0",
               '"rtx"', "{ a = 1 }", "1979-05-27"]
PROFILES = [REPO / "profiles" / "hardware" / "rtx-4090.toml", REPO / "profiles" / "recipes" / "qlora.toml",
            REPO / "profiles" / "models" / "llava-llama3-8b-instruct.toml"]


@fuzz(60)
@given(which=st.sampled_from(PROFILES), line=st.integers(0, 80), value=st.sampled_from(TOML_VALUES),
       junk=st.one_of(st.none(), st.binary(max_size=40)))
def test_fuzz_profile_toml(which, line, value, junk):
    lines = which.read_text().splitlines()
    kv = [i for i, ln in enumerate(lines) if "=" in ln and not ln.lstrip().startswith("#")]
    i = kv[line % len(kv)]
    lines[i] = f"{lines[i].split('=')[0].strip()} = {value}"
    data = ("\n".join(lines) + "\n").encode() if junk is None else junk
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / which.name
        f.write_bytes(data)
        invoke("profiles", "validate", str(f))


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    r = CliRunner().invoke(cli, ["estimate", "--gpus", "1x24G", "--save-plan", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


CHEAP_CHECKS = ("--check", "cpu-ram", "--check", "memlock", "--check", "zero3-qlora", "--check", "disk-space")


@fuzz(40)
@given(data=st.data())
def test_fuzz_plan_json(plan_file, data):
    paths = list(_paths(plan_file))
    edits = data.draw(st.lists(st.tuples(st.sampled_from(paths), json_values), min_size=1, max_size=2))
    plan = plan_file
    for path, value in edits:
        try:
            plan = _put(plan, path, value)
        except (TypeError, KeyError, IndexError):
            continue
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "plan.json"
        f.write_text(json.dumps(plan))
        invoke("preflight", "--plan", str(f), *CHEAP_CHECKS)
        invoke("run", "--plan", str(f), "--dry-run", "--skip-preflight", "--output", str(Path(d) / "run"))


@fuzz(200)
@given(rec=json_values)
def test_fuzz_dataset_records(rec):
    """The record rules shared by preflight and the trainer: problems or none, never an exception."""
    figures.tally("inputs_fuzzed")
    problems, _turns = check_record(rec)
    assert isinstance(problems, list)
    conv = {"conversations": [{"from": "human", "value": rec if isinstance(rec, str) else "hi"},
                              {"from": "gpt", "value": "ok"}], "image": rec}
    check_record(conv)


@fuzz(20)
@given(records=st.lists(json_values, max_size=4))
def test_fuzz_dataset_file(records):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "data.json"
        f.write_text(json.dumps(records))
        invoke("preflight", "--dataset", str(f), "--check", "dataset")


FLAG_VALUES = st.sampled_from(["", "0", "-1", "1", "3", "16", "nan", "abc", "1x24G", "2x8xA100-80G", "1x910B",
                               "none", "nf4", "cpu", "npu", "1e9", "0.5", "64GiB", "-5GB"])
FLAGS = ["--gpus", "--recipe", "--model", "--samples", "--epochs", "--seq-len", "--micro-batch", "--grad-accum",
         "--global-batch", "--lora-r", "--quant", "--save-steps", "--keep-checkpoints", "--headroom",
         "--speed-tolerance", "--zero", "--offload", "--device", "--workers", "--attn", "--cpu-ram", "--disk",
         "--context", "--batch", "--task", "--dataset", "--calibration"]


@fuzz(100)
@given(command=st.sampled_from(["estimate", "run", "preflight"]),
       flags=st.lists(st.tuples(st.sampled_from(FLAGS), FLAG_VALUES), max_size=4))
def test_fuzz_cli_flags(command, flags):
    args = [command, "--gpus", "1x24G"]
    for flag, value in flags:
        args += [flag, value]
    if command == "run":
        args += ["--auto", "--dry-run", "--skip-preflight"]
    if command == "preflight":
        args += ["--check", "cpu-ram"]
    with tempfile.TemporaryDirectory() as d:
        invoke(*args, "--output", str(Path(d) / "out"))


def test_contract_errors_are_value_errors():
    """The pure estimate may raise ContractError (a ValueError): the CLI maps it to exit 2."""
    assert issubclass(ContractError, ValueError)
