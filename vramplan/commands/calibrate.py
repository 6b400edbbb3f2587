"""`vramplan calibrate RUN_DIR...`: the estimate's error per component; optionally a calibration file."""

from __future__ import annotations

import click

from vramplan.errors import ExitCode, UsageError
from vramplan.commands.output import CommandResult, run_command


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

    def body() -> CommandResult:
        from vramplan.run import calibration as cal

        runs = []
        for d in run_dirs:
            runs.extend(cal.load_run(d))
        fac = cal.factors(runs)
        warnings = cal.outliers(runs)
        skipped = [r for r in runs if r["status"] != "ok"]
        for r in skipped:
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

        def render(console) -> None:
            from rich.text import Text

            for r in runs:
                if r["rows"]:
                    console.print(Text(f"run: {r['dir']}"))
                    cal.render_rows(console, r["rows"], "measured vs estimated")
            if fac:
                console.print(Text("correction factors (measured / estimated): "
                                   + ", ".join(f"{k} {v:.3f}" for k, v in sorted(fac.items()))))
            if written:
                console.print(Text(f"wrote {written}; apply with `vramplan estimate --calibration {written}`"))

        return CommandResult("ok" if fac else "no_data", ExitCode.OK, data, render, warnings)

    run_command("calibrate", json_mode, body)
