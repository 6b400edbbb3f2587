"""vramplan/contract.py: the one module planner and trainer share (docs/contracts.md)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from vramplan import contract as C

REPO = Path(__file__).resolve().parents[1]


def test_contract_imports_only_the_standard_library():
    tree = ast.parse((REPO / "vramplan" / "contract.py").read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert mods - {"__future__"} - {"tomli"} <= set(sys.stdlib_module_names), mods  # tomli: Python 3.10 only


def test_read_plan_errors_are_one_line_with_a_hint(tmp_path):
    p = tmp_path / "plan.json"
    with pytest.raises(C.ContractError, match=r"plan.json: No such file") as e:
        C.read_plan(p)
    assert isinstance(e.value, ValueError) and "--save-plan" in e.value.hint
    p.write_text("{oops")
    with pytest.raises(C.ContractError, match="not valid JSON"):
        C.read_plan(p)
    p.write_text('{"schema": "other"}')
    with pytest.raises(C.ContractError, match="schema must be 'vramplan-plan/1'"):
        C.read_plan(p)
    p.write_text(json.dumps({"schema": C.PLAN_SCHEMA, "x": 1}))
    assert C.read_plan(p)["x"] == 1


def test_plan_errors_name_the_flag_on_both_sides(tmp_path):
    from vramplan.errors import UsageError as V
    from vramplan.plan.plan_json import load_plan

    with pytest.raises(V) as e:
        load_plan(str(tmp_path / "nope.json"))
    assert e.value.message.startswith("--plan ") and e.value.exit_code == C.ExitCode.USAGE
    pytest.importorskip("torch")
    from train.config import from_plan
    from train.exit_codes import UsageError as T

    with pytest.raises(T) as t:
        from_plan(str(tmp_path / "nope.json"), {})
    assert t.value.message == e.value.message and t.value.exit_code == C.ExitCode.USAGE


def test_write_json_is_atomic_and_leaves_no_temp_file(tmp_path, monkeypatch):
    p = tmp_path / "summary.json"
    C.write_json(p, {"a": Path("/x")})
    assert json.loads(p.read_text()) == {"a": "/x"}

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(C.os, "fsync", boom)
    with pytest.raises(OSError):
        C.write_json(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": "/x"} and [f.name for f in tmp_path.iterdir()] == ["summary.json"]


def test_fmt_bytes_is_one_function_with_a_readable_unit():
    from vramplan import units

    assert units.fmt_bytes is C.fmt_bytes
    assert [C.fmt_bytes(n) for n in (None, 512, 3 * 2**10, int(5.5 * 2**20), 2**31)] == [
        "n/a", "512 B", "3.00 KiB", "5.50 MiB", "2.00 GiB"]


def test_free_port_is_bindable():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", C.free_port()))


def test_recipe_defaults_match_the_planner_profiles():
    from vramplan.inputs.profiles import load_recipe

    for name in ("qlora", "lora", "pretrain", "full"):
        d, spec = C.recipe_defaults(name), load_recipe(name)
        assert {k: getattr(spec, k) for k in d} == d
    with pytest.raises(C.ContractError, match="unknown recipe profile 'dpo'"):
        C.recipe_defaults("dpo")


def test_profile_dirs_env_first_and_bad_env_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(C.ENV_PROFILES, str(tmp_path))
    assert C.profile_dirs()[0] == tmp_path and C.profile_dirs()[1] == REPO / "profiles"
    monkeypatch.setenv(C.ENV_PROFILES, str(tmp_path / "typo"))
    with pytest.raises(C.ContractError, match="VRAMPLAN_PROFILES: .*typo is not a directory"):
        C.profile_dirs()


def _rec(*turns, image=None):
    r = {"id": "r", "conversations": [{"from": f, "value": v} for f, v in turns]}
    if image is not None:
        r["image"] = image
    return r


@pytest.mark.parametrize("rec,problem", [
    (_rec(("human", "<image>\nq"), ("gpt", "a"), image="a.png"), None),
    (_rec(("system", "s"), ("user", "q"), ("assistant", "a")), None),
    (_rec(("gpt", "a"), ("human", "q")), "turn 0 is 'gpt' but the turns must alternate"),
    (_rec(("human", "q")), "no assistant ('gpt') turn"),
    (_rec(("robot", "q")), "turn 0 needs 'from'"),
    (_rec(("human", "q"), ("gpt", "a"), image="a.png"), "has an image but no <image>"),
    (_rec(("human", "<image><image>"), ("gpt", "a"), image="a.png"), "has 2 <image> placeholders"),
    (_rec(("human", "q"), ("gpt", "a"), ("human", "<image>"), ("gpt", "b"), image="a.png"), "not in the first human"),
    (_rec(("human", "<image> q"), ("gpt", "a")), "no 'image' field"),
    (_rec(("human", "<image>"), ("gpt", "a"), image=["a", "b"]), "'image' must be one file name"),
    ({"id": "x"}, "'conversations' is missing"),
    ("text", "not a JSON object but a str"),
])
def test_check_record_rules(rec, problem):
    problems, _ = C.check_record(rec)
    assert (problems == []) if problem is None else any(problem in p for p in problems), problems


def test_chat_turns_put_a_missing_image_first_and_templates_mark_answers():
    turns = C.chat_turns(_rec(("human", "q"), ("gpt", "a"), image="a.png"))
    assert turns == [("user", "<image>\nq"), ("assistant", "a")]
    llama3 = C.template_segments(turns, "llama3")
    assert [s.text for s in llama3 if s.train] == ["a<|eot_id|>"]
    vicuna = C.template_segments(turns, "vicuna_v1", bos="<s>")
    assert vicuna[0] == C.Segment(f"<s>{C.VICUNA_SYSTEM}", False)
    assert [s.text for s in vicuna] == [f"<s>{C.VICUNA_SYSTEM}", " USER: <image>\nq ASSISTANT:", " a</s>"]
