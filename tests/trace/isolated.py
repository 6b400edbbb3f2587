"""Run one trace in a fresh interpreter: tracing several models in one process can crash at a later
garbage collection (fake tensors outliving their mode), so each test case gets its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(module: str, func: str, *args) -> object:
    code = (f"import json, sys; from {module} import {func}; "
            f"print('@@' + json.dumps({func}(*json.loads(sys.argv[1]))))")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.split("@@", 1)[1])
