"""vramplan/estimate/ is pure math: no I/O, no host probing, no CLI, no torch (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ESTIMATE = Path(__file__).resolve().parents[2] / "vramplan" / "estimate"
FORBIDDEN_MODULES = {"psutil", "pynvml", "subprocess", "click", "rich", "torch", "transformers", "deepspeed", "peft",
                     "bitsandbytes", "shutil", "socket", "tomllib", "tomli", "json", "huggingface_hub",
                     "vramplan.inputs", "vramplan.plan", "vramplan.run", "vramplan.commands", "vramplan.preflight",
                     "vramplan.cli", "vramplan.contract_io"}
FORBIDDEN_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "stat", "exists", "is_file",
                   "is_dir", "iterdir", "glob", "rglob", "getenv", "system", "popen", "listdir", "scandir"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        hits = [n for n in names if any(n == m or n.startswith(m + ".") for m in FORBIDDEN_MODULES)]
        if hits:
            out.append(f"{path.name}:{node.lineno}: imports {hits[0]}")
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if name in FORBIDDEN_CALLS:
                out.append(f"{path.name}:{node.lineno}: calls {name}()")
        if isinstance(node, ast.Attribute) and node.attr == "environ":
            out.append(f"{path.name}:{node.lineno}: reads os.environ")
    return out


def test_estimate_package_has_no_io_imports_or_calls():
    files = sorted(ESTIMATE.rglob("*.py"))
    assert len(files) >= 10
    bad = [v for f in files for v in _violations(f)]
    assert not bad, "vramplan/estimate/ must stay pure:\n" + "\n".join(bad)


def test_the_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import psutil\nfrom vramplan.inputs import gpus\nx = open('f').read()\nimport os\nos.environ['A']\n"
    )
    found = _violations(bad)
    assert len(found) == 4, found


def test_importing_the_estimate_loads_no_io_or_heavy_module():
    code = (
        "import importlib, pkgutil, sys, vramplan.estimate as e\n"
        "for m in pkgutil.walk_packages(e.__path__, 'vramplan.estimate.'): importlib.import_module(m.name)\n"
        "bad = {'psutil', 'pynvml', 'click', 'rich', 'torch', 'transformers', 'deepspeed', 'peft', 'bitsandbytes',"
        " 'vramplan.inputs', 'vramplan.plan', 'vramplan.run', 'vramplan.commands', 'vramplan.preflight'}"
        " & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
