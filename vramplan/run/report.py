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
from vramplan.run.relocate import here, read_plan_file, stored
from vramplan.units import utc_stamp


def finish_report(root: Path, outcome: dict) -> dict:
    """report.json (and the final summary.json's `vs_estimate`) from the final attempt."""
    final = outcome["final"]
    run_dir = Path(final["dir"])
    summary = read_json(run_dir / "summary.json")
    plan = read_plan_file(run_dir / "plan.json", root.resolve(), None)
    rows = compare_run(summary, plan, run_dir) if summary and final["kind"] == "ok" else []
    adapter = (summary or {}).get("final_dir")
    adapter = here(adapter, run_dir, root.resolve(), None) if isinstance(adapter, str) else None
    report = {"schema": "vramplan-report/1", "status": outcome["status"], "exit_code": int(outcome["exit_code"]),
              "final_dir": str(run_dir), "adapter_dir": adapter,
              "attempts": len(outcome["attempts"]), "vs_estimate": rows, "created_utc": utc_stamp()}
    # stored relative to the run dir (relocate.py); returned with the paths where the dir is now
    write_json(root / "report.json", dict(report, final_dir=stored(run_dir, root),
                                          adapter_dir=stored(adapter, root) if adapter else None))
    if summary is not None and rows:
        summary["vs_estimate"] = rows
        write_json(run_dir / "summary.json", summary)
    return report
