"""`vramplan run`: preflight a plan, write the run dir, launch the trainer, fall back on OOM, report.

Run dir layout (docs/contracts.md + this module):
    RUN_DIR/plan.json, ds_config.json, launch.sh, trainer.log   attempt 1 (and the trainer's files)
    RUN_DIR/attempt-N/...                                        fallback attempts N >= 2, same layout
    RUN_DIR/attempts.json                                        every attempt: plan shape, exit, why
    RUN_DIR/report.json                                          measured vs estimated of the final attempt

The trainer runs in its own session (process group): Ctrl-C reaches only vramplan, which forwards
SIGINT to the whole group (torchrun and its workers), waits for the trainer to stop cleanly (it
keeps its last verified checkpoint) and exits 130. A second Ctrl-C sends SIGTERM, a third SIGKILL.
torchrun turns a worker's exit code into 1, so the outcome is read from the trainer's
`failure.json` / `summary.json` (written after the launch) before the process exit code.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vramplan.contract import ENV_TEST_INJECT_OOM_AT_STEP, ENV_TEST_INJECT_OOM_ATTEMPTS, write_json
from vramplan.errors import ExitCode, UsageError, VramplanError
from vramplan.run.launch import Launch, build_launch, child_env, write_launch_files
from vramplan.commands.output import message

KIND_EXIT = {"ok": ExitCode.OK, "oom": ExitCode.OUT_OF_MEMORY, "disk_full": ExitCode.DISK_FULL,
             "interrupted": ExitCode.INTERRUPTED, "error": ExitCode.TRAIN_FAILED}
EXIT_KIND = {int(ExitCode.OUT_OF_MEMORY): "oom", int(ExitCode.DISK_FULL): "disk_full",
             int(ExitCode.INTERRUPTED): "interrupted", 0: "ok"}


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


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
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
    """plan.json (+ ds_config.json) and launch.sh for one attempt; returns its launch."""
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = dict(plan, output_dir=str(run_dir.resolve()))
    write_json(run_dir / "plan.json", plan)
    if plan.get("ds_config"):
        write_json(run_dir / "ds_config.json", plan["ds_config"])
    launch = build_launch(plan, run_dir / "plan.json", resume=resume, master_port=settings.master_port,
                          hosts=settings.hosts)
    write_launch_files(launch, run_dir, header=f"plan: {describe(plan)}\nwritten {now_utc()}")
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


def send_stop(pgid: int, launcher: str, sig: signal.Signals) -> None:
    """Ask the trainer to stop.

    torchrun starts its workers in their own sessions and forwards a signal once, and a single trainer
    is the group itself: signal the group. Under the deepspeed launcher the workers share the group and
    launch.py sends them SIGTERM itself on SIGINT, so a group signal would reach them twice (the trainer
    takes a second signal as "abort now"): signal only the launcher processes. SIGKILL hits everything.
    """
    if launcher == "deepspeed" and sig != signal.SIGKILL:
        for p in _group_members(pgid):
            try:
                if p.pid == pgid or "deepspeed.launcher" in " ".join(p.cmdline()):
                    p.send_signal(sig)
            except psutil_errors():
                pass
        return
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def psutil_errors() -> tuple:
    import psutil

    return (OSError, psutil.Error)


def _group_members(pgid: int) -> list:
    """Live (non-zombie) processes of process group `pgid` (the launcher may already be gone)."""
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(p.pid) == pgid:
                out.append(p)
        except psutil_errors():
            continue
    return out


def _group_alive(pgid: int) -> bool:
    return bool(_group_members(pgid))


def wait_group(pgid: int, timeout: float = 90.0) -> None:
    """Wait until no process of the trainer's process group is left (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)


def launch_and_wait(launch: Launch, run_dir: Path, plan: dict, settings: RunSettings, label: str,
                    attempt: int = 1) -> dict:
    """Start the trainer, show progress, forward Ctrl-C; returns the attempt record (without plan)."""
    from vramplan.run.progress import ProgressView

    env = trainer_env(launch, settings, attempt)
    log_path = run_dir / "trainer.log"
    started = time.time()
    interrupts = 0
    with open(log_path, "ab") as log:
        log.write(f"==> {now_utc()} {' '.join(launch.argv)}\n".encode())
        log.flush()
        # cwd = the run dir: a `train/` folder in the caller's cwd must not shadow the bundled trainer
        argv = [os.path.expandvars(a) if "${" in a else a for a in launch.argv]  # ${MASTER_ADDR} (multi-node)
        proc = subprocess.Popen(argv, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

        def forward(signum, frame):  # noqa: ARG001
            nonlocal interrupts
            interrupts += 1
            sig = {1: signal.SIGINT, 2: signal.SIGTERM}.get(interrupts, signal.SIGKILL)
            message(f"vramplan: stopping the trainer ({sig.name}); it keeps its last verified checkpoint"
                    + ("" if interrupts > 1 else " - press Ctrl-C again to force"))
            send_stop(proc.pid, launch.launcher, sig)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        view = ProgressView(run_dir, plan.get("estimate"), world_size=launch.world_size, label=label,
                            interval=settings.progress_interval, tty=False if settings.plain_progress else None)
        try:
            while proc.poll() is None:
                view.poll()
                time.sleep(0.25)
            wait_group(proc.pid)  # e.g. deepspeed's launch.py and its workers outlive a runner interrupted early
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            state = view.close()
    rc = proc.returncode
    kind, failure, summary = classify(rc, run_dir, started, interrupts > 0)
    return {"dir": str(run_dir.resolve()), "started_utc": _dt.datetime.fromtimestamp(started, _dt.timezone.utc)
            .strftime("%Y-%m-%dT%H:%M:%SZ"), "wall_seconds": round(time.time() - started, 2),
            "returncode": rc, "kind": kind, "steps": state.step, "failure": failure,
            "summary_status": (summary or {}).get("status")}


def log_tail(run_dir: Path, lines: int = 15) -> str:
    try:
        return "\n".join((run_dir / "trainer.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _oom_reason(record: dict) -> str:
    f = record.get("failure") or {}
    mem = f.get("memory") or {}
    from vramplan.run.progress import fmt_bytes

    held = ", ".join(f"{k} {fmt_bytes(mem[f'{k}_bytes'])}" for k in ("allocated", "reserved", "rss")
                     if mem.get(f"{k}_bytes"))
    return (f"out of memory in phase {f.get('phase', '?')} at step {f.get('step', record.get('steps'))}"
            + (f" ({held})" if held else ""))


def run_attempts(first_plan: dict, settings: RunSettings, fallbacks: Callable[[dict], list[dict]],
                 previous: list[dict] | None = None) -> dict:
    """The attempt loop. Returns {"exit_code", "status", "attempts", "final"} and keeps attempts.json current."""
    root = settings.output_dir.resolve()
    attempts = list(previous or [])
    tried = {json.dumps(a["plan"], sort_keys=True) for a in attempts if a.get("plan")}
    queue: list[dict] | None = None
    no_more = "no other plan fits this hardware"
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
        write_json(root / "attempts.json", {"schema": "vramplan-attempts/1",
                                            "attempts": attempts + [dict(head, kind="running")]})
        record = launch_and_wait(launch, run_dir, plan, settings, label=f"attempt {n}", attempt=n)
        record.update(head)
        attempts.append(record)
        tried.add(json.dumps(plan_shape(plan), sort_keys=True))
        write_json(root / "attempts.json", {"schema": "vramplan-attempts/1", "attempts": attempts})
        kind = record["kind"]
        if kind == "ok":
            return {"exit_code": ExitCode.OK, "status": "ok", "attempts": attempts, "final": record}
        if kind != "oom":
            tail = log_tail(run_dir)
            status = {"interrupted": "interrupted", "disk_full": "disk_full"}.get(kind, "train_failed")
            return {"exit_code": KIND_EXIT.get(kind, ExitCode.TRAIN_FAILED), "status": status,
                    "attempts": attempts, "final": record, "log_tail": tail}
        reason = _oom_reason(record)
        if n >= settings.max_attempts:
            message(f"vramplan: attempt {n} ran {reason}; --max-attempts {settings.max_attempts} reached")
            return {"exit_code": ExitCode.OUT_OF_MEMORY, "status": "oom", "attempts": attempts, "final": record}
        if queue is None:
            try:
                queue = list(fallbacks(first_plan))
            except VramplanError as e:  # e.g. a hand-written plan without the options to re-estimate
                no_more = f"no fallback plan: {e.message}"
                queue = []
        nxt = None
        while queue:
            cand = queue.pop(0)
            if json.dumps(plan_shape(cand), sort_keys=True) not in tried:
                nxt = cand
                break
        if nxt is None:
            message(f"vramplan: attempt {n} ran {reason}; {no_more}")
            return {"exit_code": ExitCode.OUT_OF_MEMORY, "status": "oom", "attempts": attempts, "final": record}
        why = f"attempt {n} ran {reason}; falling back to {describe(nxt)}"
        message(f"vramplan: {why}")
        plan, resume = nxt, False


def finish_report(root: Path, outcome: dict) -> dict:
    """report.json (and the final summary.json's `vs_estimate`) from the final attempt."""
    from vramplan.run.calibration import compare

    final = outcome["final"]
    run_dir = Path(final["dir"])
    summary = read_json(run_dir / "summary.json")
    plan = read_json(run_dir / "plan.json")
    rows = compare(summary, plan, run_dir) if summary and final["kind"] == "ok" else []
    report = {"schema": "vramplan-report/1", "status": outcome["status"], "exit_code": int(outcome["exit_code"]),
              "final_dir": str(run_dir), "adapter_dir": (summary or {}).get("final_dir"),
              "attempts": len(outcome["attempts"]), "vs_estimate": rows, "created_utc": now_utc()}
    write_json(root / "report.json", report)
    if summary is not None and rows:
        summary["vs_estimate"] = rows
        write_json(run_dir / "summary.json", summary)
    return report
