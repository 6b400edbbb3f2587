"""The end of `vramplan run`: report.json, the final attempt measured against its estimate.

RUN_DIR/report.json (docs/contracts.md, docs/run.md) says how the run ended and, for a finished
attempt, the rows of calibration_math.compare(); the same rows go into that attempt's summary.json
as `vs_estimate`. `vramplan run` prints them (commands/run.py).
"""

from __future__ import annotations

from pathlib import Path

from vramplan.contract import write_json
from vramplan.run.attempts import read_json
from vramplan.run.calibration import compare_run
from vramplan.units import utc_stamp


def finish_report(root: Path, outcome: dict) -> dict:
    """report.json (and the final summary.json's `vs_estimate`) from the final attempt."""
    final = outcome["final"]
    run_dir = Path(final["dir"])
    summary = read_json(run_dir / "summary.json")
    plan = read_json(run_dir / "plan.json")
    rows = compare_run(summary, plan, run_dir) if summary and final["kind"] == "ok" else []
    report = {"schema": "vramplan-report/1", "status": outcome["status"], "exit_code": int(outcome["exit_code"]),
              "final_dir": str(run_dir), "adapter_dir": (summary or {}).get("final_dir"),
              "attempts": len(outcome["attempts"]), "vs_estimate": rows, "created_utc": utc_stamp()}
    write_json(root / "report.json", report)
    if summary is not None and rows:
        summary["vs_estimate"] = rows
        write_json(run_dir / "summary.json", summary)
    return report
