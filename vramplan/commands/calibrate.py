"""`vramplan calibrate RUN_DIR...`: the estimate's error per component; optionally a calibration file."""

from __future__ import annotations

import click

from vramplan.commands.output import CommandResult, run_command
from vramplan.errors import ExitCode, UsageError
from vramplan.units import fmt_bytes, fmt_clock


def render_rows(console, rows: list[dict], title: str) -> None:
    """A table of calibration_math.compare() rows (also `vramplan run`'s report)."""
    from rich.table import Table
    from rich.text import Text

    def fmt(row, v):
        if v is None:
            return "n/a"
        if row["unit"] == "bytes":
            return fmt_bytes(v)
        return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s" if v < 120 else fmt_clock(v)

    table = Table(title=Text(title), title_justify="left")
    for col in ("component", "measured", "estimated", "error", "note"):
        table.add_column(col, justify="right" if col in ("measured", "estimated", "error") else "left")
    for r in rows:
        err = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        table.add_row(Text(r["label"]), fmt(r, r["measured"]), fmt(r, r["estimated"]), err, Text(r["note"]))
    console.print(table)


def _render(console, runs: list[dict], fac: dict[str, float], written: str | None) -> None:
    from rich.text import Text

    for r in runs:
        if r["rows"]:
            console.print(Text(f"run: {r['dir']}"))
            render_rows(console, r["rows"], "measured vs estimated")
    if fac:
        console.print(Text("correction factors (measured / estimated): "
                           + ", ".join(f"{k} {v:.3f}" for k, v in sorted(fac.items()))))
    if written:
        console.print(Text(f"wrote {written}; apply with `vramplan estimate --calibration {written}`"))


def calibrate(run_dirs: tuple[str, ...], write_path: str | None) -> CommandResult:
    """Rows of every finished attempt in `run_dirs`, their factors, and the file written (`--write`)."""
    from vramplan.run import calibration as cal
    from vramplan.run.calibration_math import factors, outliers

    runs = []
    for d in run_dirs:
        runs.extend(cal.load_run(d))
    fac = factors(runs)
    warnings = outliers(runs)
    for r in runs:
        if r["status"] != "ok":
            f = r.get("failure") or {}
            where = f"phase {f.get('phase', '?')}, step {f.get('step', '?')}"
            warnings.append(f"{r['dir']}: status {r['status']} ({where}): not used for factors")
    if not fac:
        if write_path:
            raise UsageError(f"nothing to write to {write_path}: no finished run with measurements among "
                             + ", ".join(run_dirs), "calibrate needs runs that ended with status ok")
        warnings.append("no finished run with measurements: no factors")
    written = None
    if write_path and fac:
        written = str(cal.write_calibration(write_path, fac, [r["dir"] for r in runs if r["status"] == "ok"]))
    data = {"runs": [{"dir": r["dir"], "status": r["status"], "components": r["rows"],
                      "failure": r["failure"]} for r in runs],
            "factors": fac, "written": written}
    return CommandResult("ok" if fac else "no_data", ExitCode.OK, data,
                         lambda console: _render(console, runs, fac, written), warnings)


@click.command("calibrate")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--write", "write_path", type=click.Path(dir_okay=False),
              help="Write correction factors (measured/estimated) to FILE (.toml, else JSON). "
                   "`vramplan estimate --calibration FILE` applies them; nothing uses them otherwise.")
@click.option("--json", "json_mode", is_flag=True, help="Print the versioned JSON envelope on stdout.")
def command(run_dirs: tuple[str, ...], write_path: str | None, json_mode: bool) -> None:
    """Compare measured runs (RUN_DIR: a `vramplan run --output` dir) with their estimates.

    \b
    $ vramplan calibrate runs/a runs/b --write calibration.toml
    $ vramplan estimate --calibration calibration.toml ...
    """
    run_command("calibrate", json_mode, lambda: calibrate(run_dirs, write_path))
