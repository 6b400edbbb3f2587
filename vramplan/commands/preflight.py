"""`vramplan preflight`: check this machine for every known launch failure, against a plan's needs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from vramplan.commands.estimate import estimate_options
from vramplan.commands.output import CommandResult, run_command
from vramplan.errors import ExitCode, NoFitError, UsageError
from vramplan.plan.plan_json import load_plan
from vramplan.preflight import CHECK_NAMES

# estimate flags that only describe paths the checks also read: giving them alone still means
# "the default estimate for this machine", not "an explicit plan request"
_PATH_FLAGS = {"dataset", "images", "output_dir"}
STATUS_STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


def describe_plan(plan: dict) -> str:
    m, r, h, s = (plan.get(k) or {} for k in ("model", "recipe", "hardware", "strategy"))
    model = m.get("profile") or m.get("path") or m.get("llm_path") or "?"
    gpus = f"{h.get('total_gpus', '?')} x {h.get('gpu_profile') or h.get('device') or '?'}"
    return (f"{model}, {r.get('name', '?')} (quant {r.get('quant', '?')}), {gpus}, ZeRO-{s.get('zero_stage', '?')}, "
            f"offload {s.get('offload', '?')}")


def resolve_plan(plan_file: str | None, explicit: list[str], kwargs: dict, output_dir: str) -> tuple[dict | None, str,
                                                                                                      list[str]]:
    """(plan or None, where it came from / why there is none, warnings)."""
    if plan_file:
        if explicit:
            flags = ", ".join("--" + n.replace("_", "-") for n in explicit)
            raise UsageError(f"--plan and {flags}: give a plan file or estimate flags, not both",
                             "drop the estimate flags, or drop --plan to estimate from them")
        return load_plan(plan_file), f"plan file {plan_file}", []
    try:
        # the estimate API (vramplan/plan/service.py); if it cannot import, the machine checks still run
        from vramplan.plan.request import options_from_kwargs
        from vramplan.plan.service import plan_from_options
    except ImportError as e:
        return None, f"the estimate is unavailable ({type(e).__name__}: {e})", []
    from vramplan.inputs.dataset import DatasetError

    opts = options_from_kwargs(**dict(kwargs, output_dir=output_dir))  # bad flags: UsageError, exit 2
    if explicit:
        try:
            plan = plan_from_options(opts)
        except DatasetError as e:  # the 'dataset' check reports it (FAIL, exit 4) with the records named
            return None, f"the estimate could not read the dataset ({e.message})", []
        except NoFitError as e:
            raise NoFitError("the estimate flags describe a run that fits no candidate on that hardware: "
                             "no plan to check against", "`vramplan estimate` with the same flags shows why; "
                             "or check the machine alone: `vramplan preflight` without them") from e
        except ImportError as e:
            return None, f"the estimate is unavailable ({type(e).__name__}: {e})", \
                [f"could not estimate from the flags: {e}"]
        return plan, "the estimate for the given flags (the pick)", []
    try:
        plan = plan_from_options(opts)
    except UsageError as e:  # e.g. no GPU detected and no --gpus
        return None, e.message, []
    except Exception as e:  # noqa: BLE001 - a default estimate must not stop the machine checks
        return None, f"the default estimate failed ({type(e).__name__}: {e})", \
            [f"the default estimate for this machine failed: {type(e).__name__}: {e}"]
    return plan, "the default estimate for the detected hardware (the pick)", []


def _model_paths(model: str | None) -> list[str]:
    if not model:
        return []
    looks_like_path = os.sep in model or model.startswith(".") or Path(model).exists()
    return [model] if looks_like_path else []


def render(con, data: dict) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    con.print(Text(f"preflight against: {data['plan']['source']}"
                   + (f" - {data['plan']['describe']}" if data["plan"].get("describe") else "")))
    con.print(Text(f"output dir: {data['output_dir']}"))
    table = Table(box=box.SIMPLE_HEAVY, show_lines=False, expand=False)
    for col, kw in (("#", {"justify": "right"}), ("check", {"no_wrap": True}), ("status", {"no_wrap": True}),
                    ("what was found", {"ratio": 3}), ("fix", {"ratio": 2})):
        table.add_column(col, **kw)
    for i, c in enumerate(data["checks"], 1):
        table.add_row(str(i), Text(c["name"]), Text(c["status"], style=STATUS_STYLE.get(c["status"], "")),
                      Text(c["detail"]), Text(c["fix"]))
    con.print(table)
    todo = [(i, c) for i, c in enumerate(data["checks"], 1) if c["status"] in ("FAIL", "WARN") and c["fix"]]
    if todo:
        con.print(Text("fixes (copy-paste):", style="bold"))
        for i, c in todo:
            con.print(Text(f"# {i} {c['name']} ({c['status']})", style="dim"))
            con.print(Text(c["fix"]), soft_wrap=True)
    s = data["summary"]
    con.print(Text(f"{s['total']} checks: {s['PASS']} PASS, {s['WARN']} WARN, {s['FAIL']} FAIL, {s['SKIP']} SKIP "
                   f"in {data['seconds']:.1f} s" + (" (--strict: WARN counts as FAIL)" if data["strict"] else "")))


@click.command("preflight", epilog="""\b
Examples:
  $ vramplan preflight
  $ vramplan preflight --plan plan.json --output runs/x
  $ vramplan preflight --gpus 1x24G --dataset data.json --images images/
  $ vramplan preflight --check disk-space --check dataset --dataset data.json --json
\b
Checks: """ + ", ".join(CHECK_NAMES) + """
Exit codes: 0 no FAIL, 4 a check FAILed (or WARNed with --strict), 2 bad input,
3 the estimate flags fit nowhere (no plan to check against).""")
@estimate_options
@click.option("--plan", "plan_file", type=click.Path(), help="A plan.json from `vramplan estimate --save-plan`.")
@click.option("--output", "output_dir", type=click.Path(),
              help="The directory the run will write to (default: the plan's, else the current directory).")
@click.option("--check", "only", multiple=True, type=click.Choice(CHECK_NAMES), metavar="NAME",
              help="Run only this check (repeatable).")
@click.option("--strict", is_flag=True, help="WARN counts as FAIL (exit 4).")
@click.option("--json", "json_mode", is_flag=True, help="Print the versioned JSON envelope on stdout.")
def command(plan_file: str | None, output_dir: str | None, only: tuple[str, ...], strict: bool, json_mode: bool,
            **kwargs) -> None:
    """Check this machine for every known launch failure: torch/torchvision, MKL/OpenMP, disk, CPU RAM,
    /dev/shm, GPUs/NPUs, packages, bitsandbytes, DeepSpeed, model and dataset - against a plan's needs."""
    ctx = click.get_current_context()
    explicit = [n for n in kwargs if n not in _PATH_FLAGS and ctx.get_parameter_source(n) in (
        click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)]

    def body() -> CommandResult:
        from vramplan.preflight import run_checks, summarize

        t0 = time.monotonic()
        if kwargs.get("dataset") and not Path(kwargs["dataset"]).is_file():
            raise UsageError(
                f"--dataset: no such file: {kwargs['dataset']}", "give the path of a LLaVA-format JSON file"
            )
        plan, source, warnings = resolve_plan(plan_file, explicit, kwargs, output_dir or os.getcwd())
        out = output_dir or (plan or {}).get("output_dir") or os.getcwd()
        results = run_checks(plan, Path(out), dataset=kwargs.get("dataset"), images=kwargs.get("images"),
                             model_paths=_model_paths(kwargs.get("model")), only=list(only) or None,
                             no_plan_reason=source)
        counts = summarize(results)
        failed = [r.name for r in results if r.status == "FAIL" or (strict and r.status == "WARN")]
        data = {"checks": [r.to_dict() for r in results], "summary": dict(counts, total=len(results)),
                "plan": {"source": source if plan is not None else f"no plan: {source}",
                         "describe": describe_plan(plan) if plan is not None else None,
                         "file": str(Path(plan_file).resolve()) if plan_file else None},
                "output_dir": str(Path(out).resolve()), "strict": strict,
                "seconds": round(time.monotonic() - t0, 2)}
        errors = []
        if failed:
            errors.append({"code": "preflight_failed",
                           "message": f"preflight: {len(failed)} check(s) failed: {', '.join(failed)}",
                           "hint": "see each check's fix; rerun `vramplan preflight` after fixing"})
        return CommandResult("fail" if failed else "ok", ExitCode.PREFLIGHT_FAILED if failed else ExitCode.OK, data,
                             render=lambda con: render(con, data), warnings=warnings, errors=errors)

    run_command("preflight", json_mode, body)
