"""The attempt loop of `vramplan run`: write an attempt's dir, launch it, classify the end, fall back on OOM.

Run dir layout (docs/contracts.md, docs/run.md):
    RUN_DIR/plan.json, ds_config.json, launch.sh, trainer.log   attempt 1 (and the trainer's files)
    RUN_DIR/attempt-N/...                                        fallback attempts N >= 2, same layout
    RUN_DIR/attempts.json                                        every attempt: plan shape, exit, why, its
                                                                 dir relative to RUN_DIR (relocate.py)
    RUN_DIR/report.json                                          measured vs estimated of the final attempt (report.py)

Starting the trainer and forwarding Ctrl-C to it is process.py. torchrun turns a worker's exit code
into 1 (torch distributed/launcher/api.py raises ChildFailedError, uncaught), so the outcome is read
from the trainer's `failure.json` / `summary.json` (written after the launch) before the exit code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vramplan.commands.output import message
from vramplan.contract import ENV_TEST_INJECT_OOM_AT_STEP, ENV_TEST_INJECT_OOM_ATTEMPTS, write_json
from vramplan.errors import ExitCode, UsageError, VramplanError
from vramplan.run.launch import Launch, build_launch, child_env, write_launch_files
from vramplan.run.process import launch_and_wait
from vramplan.run.relocate import plan_stored, write_attempts
from vramplan.units import fmt_bytes, utc_stamp

KIND_EXIT = {"ok": ExitCode.OK, "oom": ExitCode.OUT_OF_MEMORY, "disk_full": ExitCode.DISK_FULL,
             "interrupted": ExitCode.INTERRUPTED, "error": ExitCode.TRAIN_FAILED,
             "usage": ExitCode.USAGE}  # the trainer refused its input: vramplan run's exit is 2 too
EXIT_KIND = {int(ExitCode.OUT_OF_MEMORY): "oom", int(ExitCode.DISK_FULL): "disk_full",
             int(ExitCode.INTERRUPTED): "interrupted", int(ExitCode.USAGE): "usage", 0: "ok"}


@dataclass
class RunSettings:
    output_dir: Path
    max_attempts: int = 3
    resume: bool = False
    hosts: tuple[str, ...] = ()
    master_port: int | None = None
    progress_interval: float = 10.0
    plain_progress: bool = False  # force plain lines (e.g. --json)
    extra_env: dict = field(default_factory=dict)  # added to the trainer's environment (not to launch.sh)


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return None
    return obj if isinstance(obj, dict) else None


def plan_shape(plan: dict) -> dict:
    """The knobs that tell attempts apart (recorded in attempts.json, said when falling back)."""
    hw, st, b = plan.get("hardware") or {}, plan.get("strategy") or {}, plan.get("batch") or {}
    return {"device": hw.get("device"), "nodes": hw.get("nodes", 1), "gpus": hw.get("total_gpus", 1),
            "zero_stage": st.get("zero_stage"), "offload": st.get("offload"), "launcher": st.get("launcher"),
            "micro_batch": b.get("micro_batch"), "grad_accum": b.get("grad_accum"),
            "global_batch": b.get("global_batch")}


def describe(plan: dict) -> str:
    s = plan_shape(plan)
    card = (plan.get("hardware") or {}).get("gpu_profile") if s["device"] != "cpu" else None
    where = f"{s['gpus']} x {card or s['device']}" + (f" on {s['nodes']} nodes" if (s["nodes"] or 1) > 1 else "")
    return (f"ZeRO-{s['zero_stage']}, offload {s['offload']}, {where}, micro-batch {s['micro_batch']} x "
            f"accumulation {s['grad_accum']} (global batch {s['global_batch']})")


def check_output_dir(run_dir: Path, resume: bool) -> None:
    """Never start a fresh run on top of another one: its checkpoints would be mixed or lost."""
    if resume:
        if not (run_dir / "plan.json").exists():
            raise UsageError(f"--resume: {run_dir} holds no plan.json (not a vramplan run dir)",
                             "give the --output dir of an earlier `vramplan run`")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--output {run_dir} exists and is not a directory", "choose a directory path")
    taken = [n for n in ("plan.json", "checkpoints", "summary.json", "attempts.json") if (run_dir / n).exists()]
    if taken:
        raise UsageError(f"--output {run_dir} already holds a run ({', '.join(taken)})",
                         f"continue it with `vramplan run --resume --output {run_dir}`, or choose a new --output")


def write_attempt_dir(plan: dict, run_dir: Path, settings: RunSettings, resume: bool) -> Launch:
    """plan.json (+ ds_config.json) and launch.sh for one attempt; returns its launch. The plan's paths
    inside the run dir are written relative (relocate.py): a copy of the dir trains into itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = dict(plan, output_dir=str(run_dir.resolve()))
    write_json(run_dir / "plan.json", plan_stored(plan, run_dir.resolve(), settings.output_dir.resolve()))
    if plan.get("ds_config"):
        write_json(run_dir / "ds_config.json", plan["ds_config"])
    launch = build_launch(plan, run_dir / "plan.json", resume=resume, master_port=settings.master_port,
                          hosts=settings.hosts)
    write_launch_files(launch, run_dir, header=f"plan: {describe(plan)}\nwritten {utc_stamp()}")
    return launch


def _fresh(path: Path, since: float) -> dict | None:
    try:
        if path.stat().st_mtime + 1 < since:  # left over from an earlier attempt in this dir
            return None
    except OSError:
        return None
    return read_json(path)


def classify(returncode: int, run_dir: Path, started: float, interrupted: bool) -> tuple[str, dict | None, dict | None]:
    """(kind, failure, summary) of a finished trainer: ok | oom | disk_full | interrupted | error."""
    failure = _fresh(run_dir / "failure.json", started)
    summary = _fresh(run_dir / "summary.json", started)
    if interrupted:
        return "interrupted", failure, summary
    if returncode == 0 and summary and summary.get("status") == "ok":
        return "ok", failure, summary
    if failure and failure.get("exit_code") == ExitCode.USAGE:  # failure.json says "error" for bad input too
        return "usage", failure, summary
    if failure and failure.get("kind") in KIND_EXIT:
        return failure["kind"], failure, summary
    if summary and summary.get("status") in KIND_EXIT and summary.get("status") != "ok":
        return summary["status"], failure, summary
    return EXIT_KIND.get(returncode, "error") if returncode != 0 else "error", failure, summary


def trainer_env(launch: Launch, settings: RunSettings, attempt: int) -> dict[str, str]:
    env = child_env(launch)
    env.update(settings.extra_env)
    if ENV_TEST_INJECT_OOM_AT_STEP in env and attempt > int(env.get(ENV_TEST_INJECT_OOM_ATTEMPTS) or 1):
        del env[ENV_TEST_INJECT_OOM_AT_STEP]  # the injected OOM stands for "this plan does not fit"; fallbacks do
    return env


def run_attempt(launch: Launch, run_dir: Path, plan: dict, settings: RunSettings, attempt: int) -> dict:
    """Launch one attempt with progress shown and wait for it; its attempts.json record (without plan, why)."""
    from vramplan.run.progress import ProgressView

    view = ProgressView(run_dir, plan.get("estimate"), world_size=launch.world_size, label=f"attempt {attempt}",
                        interval=settings.progress_interval, tty=False if settings.plain_progress else None)
    ended = launch_and_wait(launch, trainer_env(launch, settings, attempt), run_dir, view)
    kind, failure, summary = classify(ended.returncode, run_dir, ended.started, ended.interrupted)
    return {"dir": str(run_dir.resolve()), "started_utc": utc_stamp(ended.started),
            "wall_seconds": ended.wall_seconds, "returncode": ended.returncode, "kind": kind, "steps": ended.steps,
            "failure": failure, "summary_status": (summary or {}).get("status")}


def log_tail(run_dir: Path, lines: int = 15) -> str:
    try:
        return "\n".join((run_dir / "trainer.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def trainer_error_line(run_dir: Path) -> str:
    """The trainer's own one-line error in trainer.log ("train: error: ..." or its logged ERROR line), or ""."""
    lines = log_tail(run_dir, 40).splitlines()
    hits = [ln.strip() for ln in lines if ln.startswith("train: error:") or " ERROR " in ln]
    return hits[-1] if hits else ""


def _oom_reason(record: dict) -> str:
    f = record.get("failure") or {}
    mem = f.get("memory") or {}
    held = ", ".join(f"{k} {fmt_bytes(mem[f'{k}_bytes'])}" for k in ("allocated", "reserved", "rss")
                     if mem.get(f"{k}_bytes"))
    return (f"out of memory in phase {f.get('phase', '?')} at step {f.get('step', record.get('steps'))}"
            + (f" ({held})" if held else ""))


def _fallback_queue(first_plan: dict, fallbacks: Callable[[dict], list[dict]]) -> tuple[list[dict], str]:
    """The plans to fall back to after an OOM, and what to say when none is left."""
    try:
        return list(fallbacks(first_plan)), "no other plan fits this hardware"
    except VramplanError as e:  # e.g. a hand-written plan without the options to re-estimate
        return [], f"no fallback plan: {e.message}"


def _next_plan(queue: list[dict], tried: set[str]) -> dict | None:
    """The first plan of `queue` (consumed) whose shape was not tried yet."""
    while queue:
        cand = queue.pop(0)
        if json.dumps(plan_shape(cand), sort_keys=True) not in tried:
            return cand
    return None


def _outcome(record: dict, attempts: list[dict], max_attempts: int) -> dict:
    """The loop's result when `record` ends it: ok, a failure no other plan fixes, or OOM at --max-attempts."""
    kind = record["kind"]
    if kind == "ok":
        return {"exit_code": ExitCode.OK, "status": "ok", "attempts": attempts, "final": record}
    if kind == "oom":
        message(f"vramplan: attempt {record['attempt']} ran {_oom_reason(record)}; --max-attempts {max_attempts} "
                "reached")
        return {"exit_code": ExitCode.OUT_OF_MEMORY, "status": "oom", "attempts": attempts, "final": record}
    status = {"interrupted": "interrupted", "disk_full": "disk_full", "usage": "bad_input"}.get(kind, "train_failed")
    return {"exit_code": KIND_EXIT.get(kind, ExitCode.TRAIN_FAILED), "status": status,
            "attempts": attempts, "final": record, "log_tail": log_tail(Path(record["dir"]))}


def run_attempts(first_plan: dict, settings: RunSettings, fallbacks: Callable[[dict], list[dict]],
                 previous: list[dict] | None = None) -> dict:
    """The attempt loop. Returns {"exit_code", "status", "attempts", "final"} and keeps attempts.json current."""
    root = settings.output_dir.resolve()
    attempts = list(previous or [])
    tried = {json.dumps(a["plan"], sort_keys=True) for a in attempts if a.get("plan")}
    queue: list[dict] | None = None  # the fallbacks, computed at the first OOM
    no_more = ""  # what to say when the queue is empty
    plan, resume, why = first_plan, settings.resume, "resume" if settings.resume else "first plan"
    while True:
        n = len(attempts) + 1
        if resume and attempts:
            run_dir = Path(attempts[-1]["dir"])
        else:
            run_dir = root if n == 1 else root / f"attempt-{n}"
        launch = write_attempt_dir(plan, run_dir, settings, resume)
        message(f"vramplan: attempt {n}: {describe(plan)} -> {run_dir}")
        head = {"attempt": n, "dir": str(run_dir.resolve()), "plan": plan_shape(plan), "why": why,
                "resumed": resume, "launch": launch.to_dict()}
        # recorded before the launch too, so `--resume` after a hard kill finds this attempt
        write_attempts(root, attempts + [dict(head, kind="running")])
        record = run_attempt(launch, run_dir, plan, settings, n)
        record.update(head)
        attempts.append(record)
        tried.add(json.dumps(plan_shape(plan), sort_keys=True))
        write_attempts(root, attempts)
        if record["kind"] != "oom" or n >= settings.max_attempts:
            return _outcome(record, attempts, settings.max_attempts)
        if queue is None:
            queue, no_more = _fallback_queue(first_plan, fallbacks)
        nxt = _next_plan(queue, tried)
        if nxt is None:
            message(f"vramplan: attempt {n} ran {_oom_reason(record)}; {no_more}")
            return {"exit_code": ExitCode.OUT_OF_MEMORY, "status": "oom", "attempts": attempts, "final": record}
        why = f"attempt {n} ran {_oom_reason(record)}; falling back to {describe(nxt)}"
        message(f"vramplan: {why}")
        plan, resume = nxt, False
