"""`vramplan run`: plan -> preflight -> run dir -> launch the bundled trainer -> OOM fallback -> report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from vramplan.commands.estimate import estimate_options
from vramplan.commands.output import CommandResult, message, run_command
from vramplan.commands.run_render import render_checks, render_dry, render_report
from vramplan.contract import check_plan
from vramplan.errors import ExitCode, NoFitError, UsageError, VramplanError
from vramplan.plan.plan_json import load_plan
from vramplan.run.run_dir import default_run_dir, run_name

DEMO_DIR = "vramplan-demo"
# demo knobs, each overridable by its estimate flag: a few steps that checkpoint twice
DEMO_DEFAULTS = {"global_batch": 2, "epochs": 2, "save_steps": 4, "keep_checkpoints": 2, "lora_r": 16}


def _no_hardware(mode: str, estimate_kwargs: dict) -> None:
    """--auto on a host without GPUs/NPUs and without --gpus: one line naming both ways out."""
    from vramplan.inputs.gpus import detect_local_gpus

    if mode != "auto" or estimate_kwargs.get("gpus") or estimate_kwargs.get("device") == "cpu":
        return
    if detect_local_gpus() is None:
        raise UsageError("no GPU or NPU detected on this host: plan for other hardware with --gpus "
                         "(e.g. `--gpus 1x24G --dry-run`), or try the whole pipeline on this CPU with --demo",
                         "`vramplan run --demo` trains a tiny LLaVA here in about 2 minutes")


def _model_paths(plan: dict) -> list[str]:
    m = plan.get("model") or {}
    return [m[k] for k in ("path", "llm_path", "vision_path", "projector_path") if m.get(k)]


def _preflight(plan: dict, output_dir: Path, env: dict) -> list[dict]:
    """Preflight judged with the environment the trainer will get (launch.sh's exports included)."""
    from vramplan.preflight import run_checks

    data = plan.get("data") or {}
    results = run_checks(plan, str(output_dir), dataset=data.get("dataset"), images=data.get("images"),
                         model_paths=_model_paths(plan), env=env)
    return [r.to_dict() for r in results]


def _build_demo_assets(out: Path) -> Path:
    """`python -m train.tiny --out DIR` in a subprocess (vramplan never imports train)."""
    assets = out / "demo-assets"
    if (assets / "data.json").exists():
        return assets
    message(f"vramplan: demo: building a tiny LLaVA and a synthetic image dataset in {assets}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "train.tiny", "--out", str(assets)], capture_output=True, text=True,
                       cwd=str(out), env=env)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
        raise VramplanError(f"demo: building the tiny model failed (exit {p.returncode}): {tail[0]}",
                            "is the trainer installed? `pip install -e .[train] -c constraints.txt`")
    return assets


def _fresh_demo_dir() -> str:
    """./vramplan-demo, or -2, -3, ... when an earlier demo run is there (never overwrite a run)."""
    for k in range(1, 1000):
        name = DEMO_DIR if k == 1 else f"{DEMO_DIR}-{k}"
        if not (Path(name) / "plan.json").exists():
            return name
    raise UsageError("too many ./vramplan-demo* dirs", "remove old demo runs or pass --output DIR")


def _demo_kwargs(kwargs: dict, assets: Path) -> dict:
    """The tiny model on this CPU; a small global batch and frequent saves so the demo shows checkpoints."""
    kw = {k: v for k, v in kwargs.items() if v is not None}
    kw.update(model=str(assets / "model"), dataset=str(assets / "data.json"), images=str(assets / "images"),
              device="cpu")
    for key, value in DEMO_DEFAULTS.items():
        if key == "global_batch" and kw.get("micro_batch") and kw.get("grad_accum"):
            continue  # the two flags given set the global batch
        kw.setdefault(key, value)
    return kw


def _estimate(kwargs: dict) -> dict:
    from vramplan.plan.request import options_from_kwargs
    from vramplan.plan.service import plan_from_options

    try:
        return plan_from_options(options_from_kwargs(**kwargs))
    except NoFitError as e:
        raise NoFitError("nothing fits this hardware, so there is nothing to run",
                         "`vramplan estimate` with the same flags shows why each option was rejected") from e


def _resolve_plan(mode: str, out: Path, saved: dict | None, estimate_kwargs: dict, takeover: bool = False
                  ) -> tuple[dict, list[dict]]:
    """The plan to run first, and the attempts already recorded in the run dir (--resume: none of its
    trainers may still be alive, unless `takeover` stops them; attempts left running are repaired)."""
    from vramplan.run import owner, relocate

    if mode == "plan":
        return saved, []
    if mode == "resume":
        previous = _previous_attempts(out / "attempts.json")
        old = relocate.old_location(out, previous)  # a run dir copied or moved since (relocate.py)
        previous = relocate.attempts_here(out, previous)
        owner.check_trainers(out, previous, takeover)
        previous = owner.repair_attempts(out, previous)
        if previous and previous[-1].get("kind") == "ok":
            raise UsageError(f"--resume: {out} already finished (attempt {previous[-1].get('attempt')} ended ok; "
                             f"adapter in {Path(previous[-1]['dir']) / 'final'})",
                             "start a new run with another --output")
        last_dir = Path(previous[-1]["dir"]) if previous else out
        plan = relocate.read_plan_file(last_dir / "plan.json", out, old)
        if plan is None:
            raise UsageError(f"--resume: {last_dir / 'plan.json'} is missing or unreadable",
                             "resume needs the run dir written by `vramplan run`")
        return check_plan(plan, f"--resume: {last_dir / 'plan.json'}"), previous
    if estimate_kwargs.get("task", "train") != "train":
        raise UsageError("--task infer: `vramplan run` trains",
                         "use `vramplan estimate --task infer` to plan inference")
    kwargs = dict(estimate_kwargs, output_dir=str(out))
    if mode == "demo":  # the estimate reads the tiny model dir, so the assets exist even for --dry-run
        try:
            (out / "demo-assets").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--output {out}: {e.strerror or e}", "choose a writable directory") from None
        kwargs = _demo_kwargs(kwargs, _build_demo_assets(out))
    plan = _estimate(kwargs)  # the trainer's rules (a family it cannot train yet): exit 2 before anything is written
    model = plan["model"]
    return check_plan(plan, f"--model {model.get('path') or model.get('profile')}"), []


def _previous_attempts(path: Path) -> list:
    """attempts.json's records, type-checked (vramplan/run/run_files.py): a wrong type is exit 2."""
    from vramplan.contract import ContractError
    from vramplan.run import attempts as runner
    from vramplan.run.run_files import check_attempts

    doc = runner.read_json(path)
    try:
        return check_attempts(path, doc) if doc is not None else []
    except ContractError as e:
        raise UsageError(e.message, e.hint) from None


def _outcome_result(out: Path, outcome: dict, report: dict, checks: list[dict], warnings: list[str]) -> CommandResult:
    data = {"run_dir": str(out), "report": report, "attempts": outcome["attempts"], "preflight": checks}
    errors = []
    if outcome["exit_code"] != ExitCode.OK:
        final = outcome["final"]
        from vramplan.run.attempts import trainer_error_line

        msg = {"oom": f"out of memory in every attempt ({len(outcome['attempts'])})",
               "usage": "the trainer refused its input (exit 2): "
                        + (trainer_error_line(Path(final["dir"])) or "see trainer.log"),
               "interrupted": "interrupted; the last verified checkpoint is kept",
               "disk_full": "the disk filled up; the last verified checkpoint is kept"}.get(
            final["kind"], f"the trainer failed (exit {final['returncode']})")
        hint = {"interrupted": f"continue with `vramplan run --resume --output {out}`",
                "disk_full": f"free space, then `vramplan run --resume --output {out}`",
                "oom": "try more GPUs, a shorter --seq-len, or --recipe qlora"}.get(
            final["kind"], f"see {Path(final['dir']) / 'trainer.log'}")
        errors.append({"code": outcome["status"], "message": msg, "hint": hint})
        if outcome.get("log_tail") and final["kind"] == "error":
            message(outcome["log_tail"])
    return CommandResult(outcome["status"], outcome["exit_code"], data,
                         lambda con: render_report(con, report, outcome), warnings, errors)


def _run_dir(mode: str, plan_file: str | None, output: str | None, estimate_kwargs: dict
             ) -> tuple[Path, dict | None]:
    """The run dir (absolute) and, with --plan, the saved plan. Without --output: the demo's
    ./vramplan-demo, the plan's output_dir, else ./runs/<model>-<recipe>-<UTC time> (said on stderr)."""
    if mode == "resume" and not output:
        raise UsageError("--resume needs --output DIR: the run dir of the run to continue",
                         "e.g. `vramplan run --resume --output runs/first`")
    saved = load_plan(plan_file) if mode == "plan" else None
    if saved is not None and not output:
        output = saved.get("output_dir")  # the dir given to `estimate --output` when the plan was saved
    if not output:
        output = _fresh_demo_dir() if mode == "demo" else default_run_dir(*run_name(saved, estimate_kwargs))
        message(f"vramplan: run dir {output} (--output DIR chooses another)")
    return Path(output).resolve(), saved


def _preflight_gate(plan: dict, out: Path, launch, skip: bool, warnings: list[str]
                    ) -> tuple[list[dict], CommandResult | None]:
    """The preflight checks (WARNs added to `warnings`), and the result to give instead of launching if one FAILs."""
    from vramplan.run.launch import child_env

    if skip:
        warnings.append("preflight skipped (--skip-preflight)")
        return [], None
    checks = _preflight(plan, out, child_env(launch))
    failed = [c for c in checks if c.get("status") == "FAIL"]
    warnings += [f"preflight: {c['name']}: {c.get('detail', '')}" for c in checks if c.get("status") == "WARN"]
    if not failed:
        return checks, None
    data = {"plan": plan, "preflight": checks, "launched": False, "run_dir": str(out)}
    return checks, CommandResult("preflight_failed", ExitCode.PREFLIGHT_FAILED, data,
                                 lambda con: render_checks(con, failed, "preflight FAILED - nothing launched"),
                                 warnings, _preflight_errors(failed, dry_run=False))


def _preflight_errors(failed: list[dict], dry_run: bool) -> list[dict]:
    verb = "nothing would launch here" if dry_run else "nothing launched"
    return [{"code": "preflight_failed",
             "message": f"preflight failed ({', '.join(c['name'] for c in failed)}): {verb}",
             "hint": "fix the FAIL checks above and rerun; planning for another machine? add --skip-preflight "
                     "(preflight judges this one)" + ("" if dry_run else ", with --dry-run to launch nothing")}]


def _commands_only(plan: dict, launch, out: Path, checks: list[dict], warnings: list[str], dry_run: bool,
                   settings) -> CommandResult:
    """--dry-run, or multi-node without --node-rank: show (multi-node: write) the run dir; launch nothing."""
    from vramplan.run import attempts as runner
    from vramplan.run.launch import render_launch_sh

    launch_sh = render_launch_sh(launch, header=f"plan: {runner.describe(plan)}")
    if not dry_run:  # multi-node: write the run dir; each node runs its own command
        runner.write_attempt_dir(plan, out, settings, False)
    data = {"plan": plan, "launch": launch.to_dict(), "launch_sh": launch_sh, "preflight": checks,
            "dry_run": dry_run, "run_dir": str(out)}
    failed = [c for c in checks if c.get("status") == "FAIL"]
    if failed:  # dry run only: show what would run, then why it would not start here
        return CommandResult("preflight_failed", ExitCode.PREFLIGHT_FAILED, dict(data, launched=False),
                             lambda con: render_dry(con, plan, launch, launch_sh, checks, out, dry_run),
                             warnings, _preflight_errors(failed, dry_run=True))
    return CommandResult("dry_run" if dry_run else "commands_written", ExitCode.OK, data,
                         lambda con: render_dry(con, plan, launch, launch_sh, checks, out, dry_run), warnings)


def _check_node_zero(node_rank: int | None, hosts: tuple[str, ...], out: Path) -> None:
    """Multi-node: vramplan runs node 0 itself, and needs node 0's address."""
    if node_rank:
        raise UsageError(f"--node-rank {node_rank}: vramplan runs node 0 itself; on node {node_rank} run "
                         f"`bash {out / 'launch.sh'} {node_rank}`", "")
    if not hosts and not os.environ.get("MASTER_ADDR"):
        raise UsageError("multi-node: node 0's address is unknown",
                         "pass --hosts node0,node1,... or export MASTER_ADDR")


def execute(*, mode: str, plan_file: str | None, output: str | None, estimate_kwargs: dict, dry_run: bool,
            max_attempts: int, skip_preflight: bool, hosts: tuple[str, ...], node_rank: int | None,
            master_port: int | None, json_mode: bool, takeover: bool = False) -> CommandResult:
    from vramplan.run.owner import owning

    _no_hardware(mode, estimate_kwargs)
    out, saved = _run_dir(mode, plan_file, output, estimate_kwargs)
    args = dict(mode=mode, out=out, saved=saved, estimate_kwargs=estimate_kwargs, dry_run=dry_run,
                max_attempts=max_attempts, skip_preflight=skip_preflight, hosts=hosts, node_rank=node_rank,
                master_port=master_port, json_mode=json_mode, takeover=takeover)
    if dry_run:  # writes nothing, so it needs no lock
        return _execute(**args)
    with owning(out):  # one owner per run dir: before preflight and before any file is written
        return _execute(**args)


def _execute(*, mode: str, out: Path, saved: dict | None, estimate_kwargs: dict, dry_run: bool,
             max_attempts: int, skip_preflight: bool, hosts: tuple[str, ...], node_rank: int | None,
             master_port: int | None, json_mode: bool, takeover: bool) -> CommandResult:
    from vramplan.run import attempts as runner
    from vramplan.run.launch import build_launch
    from vramplan.run.report import finish_report

    if not dry_run:
        runner.check_output_dir(out, mode == "resume")
    warnings: list[str] = []
    plan, previous = _resolve_plan(mode, out, saved, estimate_kwargs, takeover and not dry_run)
    plan = dict(plan, output_dir=str(out))

    launch = build_launch(plan, out / "plan.json", resume=mode == "resume", master_port=master_port, hosts=hosts)
    if node_rank is not None and node_rank >= launch.nodes:
        raise UsageError(f"--node-rank {node_rank} on a {launch.nodes}-node plan: node ranks are 0.."
                         f"{launch.nodes - 1}", "leave --node-rank out for a one-node plan")
    checks, refused = _preflight_gate(plan, out, launch, skip_preflight, warnings)
    if refused is not None and not dry_run:
        return refused
    if dry_run or (launch.nodes > 1 and node_rank is None):
        settings = runner.RunSettings(out, master_port=master_port, hosts=hosts)
        return _commands_only(plan, launch, out, checks, warnings, dry_run, settings)
    if launch.nodes > 1:
        _check_node_zero(node_rank, hosts, out)
        max_attempts = 1  # the other nodes run their own launch.sh: no coordinated fallback across nodes

    settings = runner.RunSettings(out, max_attempts=max_attempts, resume=mode == "resume", hosts=hosts,
                                  master_port=master_port, plain_progress=json_mode)
    outcome = runner.run_attempts(plan, settings, _fallbacks, previous)
    report = finish_report(out, outcome)
    return _outcome_result(out, outcome, report, checks, warnings)


def _fallbacks(plan: dict) -> list[dict]:
    """Next plans after an OOM, from the estimate that made `plan` (its saved `options`)."""
    from vramplan.plan.service import fallback_plans

    if not plan.get("options"):  # re-estimating without them would plan the default model instead
        raise UsageError("the plan has no `options` (not written by `vramplan estimate`/`run`), so it cannot "
                         "be re-estimated", "")
    return fallback_plans(plan)


@click.command("run")
@click.option("--auto", is_flag=True, help="Estimate with the estimate flags, pick the best plan, run it.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False), help="Run a saved plan.json.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last verified checkpoint.")
@click.option("--demo", is_flag=True, help="Build a tiny LLaVA + synthetic images and run it all on CPU (< 2 min).")
@click.option("--output", "output_dir", type=click.Path(file_okay=False),
              help="Run dir (default: ./runs/<model>-<recipe>-<UTC time>; demo: ./vramplan-demo).")
@click.option("--dry-run", is_flag=True,
              help="Print plan, launch.sh and commands, then preflight; write and run nothing.")
@click.option("--takeover", is_flag=True,
              help="With --resume: stop a trainer of the run dir still running (SIGTERM, then SIGKILL) first.")
@click.option("--max-attempts", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Attempts in all, counting OOM fallbacks.")
@click.option("--skip-preflight", is_flag=True, help="Launch without preflight checks (not recommended).")
@click.option("--hosts", help="Multi-node: comma-separated hostnames, node 0 (the master) first.")
@click.option("--node-rank", type=click.IntRange(0), help="Multi-node: 0 launches node 0 here (others: launch.sh K).")
@click.option("--master-port", type=click.IntRange(1, 65535), help="Rendezvous port (default: free; 29500 multi-node).")
@estimate_options
@click.option("--json", "json_mode", is_flag=True, help="Print the versioned JSON envelope on stdout.")
def command(auto, plan_file, resume, demo, output_dir, dry_run, takeover, max_attempts, skip_preflight, hosts,
            node_rank, master_port, json_mode, **estimate_kwargs) -> None:
    """Plan, preflight, launch the bundled trainer; fall back to the next plan on OOM.

    \b
    $ vramplan run --demo
    $ vramplan run --auto --dataset data.json --images imgs/
    $ vramplan run --auto --gpus 1x24G --dataset data.json --images imgs/ --output runs/a
    $ vramplan run --plan plan.json --output runs/a --dry-run
    $ vramplan run --resume --output runs/a
    """

    def body() -> CommandResult:
        modes = [m for m, on in (("auto", auto and not demo), ("plan", plan_file), ("resume", resume),
                                 ("demo", demo)) if on]
        if len(modes) != 1:
            raise UsageError("give exactly one of --auto, --plan FILE, --resume, --demo"
                             + (f" (got {', '.join('--' + m for m in modes)})" if modes else ""),
                             "e.g. `vramplan run --demo`, or `vramplan run --auto ...`")
        if takeover and modes != ["resume"]:
            raise UsageError("--takeover goes with --resume (it stops a trainer of the run dir still running)", "")
        return execute(mode=modes[0], plan_file=plan_file, output=output_dir, estimate_kwargs=estimate_kwargs,
                       dry_run=dry_run, max_attempts=max_attempts, skip_preflight=skip_preflight,
                       hosts=tuple(h.strip() for h in hosts.split(",") if h.strip()) if hosts else (),
                       node_rank=node_rank, master_port=master_port, json_mode=json_mode, takeover=takeover)

    run_command("run", json_mode, body)
