"""CLI-wide contracts: exit-code table, envelope shape, import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

from vramplan.commands.output import ENVELOPE_KEYS, envelope
from vramplan.errors import ExitCode


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vramplan", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_exit_code_table_is_documented(repo_root):
    readme = (repo_root / "README.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} |" in readme, f"exit code {int(code)} ({code.name}) missing from README"


def test_envelope_keys_pinned():
    env = envelope("estimate", "ok", 0)
    assert tuple(env) == ENVELOPE_KEYS
    assert env["schema"] == "vramplan/1"


def test_usage_error_gives_json_envelope_and_exit_2():
    p = run_cli("estimate", "--json", "--no-such-flag")
    assert p.returncode == 2
    env = json.loads(p.stdout)
    assert set(env) == set(ENVELOPE_KEYS)
    assert env["status"] == "error" and env["exit_code"] == 2
    assert env["errors"][0]["message"]
    assert "Traceback" not in p.stderr


def test_help_lists_commands():
    p = run_cli("--help")
    assert p.returncode == 0
    for name in ("estimate", "preflight", "run", "profiles", "calibrate"):
        assert name in p.stdout


def test_cli_import_pulls_no_heavy_stack():
    code = ("import sys, vramplan.cli, vramplan.commands.output, vramplan.errors, vramplan.estimate.specs; "
            "heavy = {'torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_vramplan_never_imports_train(repo_root):
    offenders = []
    for path in (repo_root / "vramplan").rglob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import train", "from train")):
                offenders.append(f"{path}: {s}")
    assert not offenders, offenders
