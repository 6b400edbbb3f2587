"""One training run, start to finish: load -> data -> train -> export -> summary.

`run(cfg)` returns the exit code and writes the run dir files; failures become failure.json records.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback

from train import checkpoint as ck
from train.config import TrainConfig
from train.exit_codes import DiskFullError, ExitCode, TrainError, is_oom
from train.metrics import MetricsLog, barrier, broadcast, local_memory
from vramplan.contract import TRAINER_LOCK, ContractError, free_port, hold_run_lock, write_json

log = logging.getLogger("train")


def _dist_env(cfg: TrainConfig) -> tuple[int, int, int]:
    """(rank, world, local_rank). A single plain process with DeepSpeed gets a 1-process group env
    (without RANK/WORLD_SIZE DeepSpeed's deepspeed/comm/comm.py init_distributed falls back to
    mpi_discovery, which needs mpi4py)."""
    if cfg.ds_config is not None and "WORLD_SIZE" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _model_dir(cfg: TrainConfig, local_rank: int) -> str:
    """The HF dir to load: --model, or the assembly of --llm/--vision/--projector (local rank 0 builds it)."""
    from train.model import assemble

    if cfg.model_path:
        return cfg.model_path
    dest = cfg.run_dir / "assembled-model"
    if local_rank == 0:
        assemble(cfg, dest)
    else:
        while not (dest / "ASSEMBLED").exists():
            time.sleep(0.5)
    return str(dest)


def in_run_dir(run_dir, path) -> str | None:
    """`path` relative to the run dir when inside it (summary.json and metrics.jsonl store it so, and a
    copied or moved run dir stays whole: docs/contracts.md "Run directory"), else as it is."""
    if path is None:
        return None
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))
    return str(path) if rel.startswith("..") else rel


def _summary(run, status: str, t0: float, final_dir: str | None) -> dict:
    rel = run.cfg.run_dir
    peaks = run.peaks or [local_memory(run.device)]
    return {"status": status, "steps": run.step, "tokens": run.tokens, "train_seconds": round(run.train_seconds, 3),
            "save_seconds": round(run.save_seconds, 3),
            "wall_seconds": round(time.time() - t0, 3),
            "peak_allocated_bytes": [m["peak_allocated"] for m in peaks],
            "peak_reserved_bytes": [m["peak_reserved"] for m in peaks],
            "peak_rss_bytes": [m["peak_rss"] for m in peaks],
            "checkpoint_bytes": run.checkpoint_bytes, "last_checkpoint": in_run_dir(rel, run.last_checkpoint),
            "final_dir": in_run_dir(rel, final_dir), "device": run.device, "world_size": run.world,
            "estimate": run.cfg.estimate}


def _failure(run, kind: str, message: str, code: ExitCode, t0: float) -> None:
    try:
        _write_failure(run, kind, message, code, t0)
    except OSError as e:  # e.g. the disk is full: the exit code still tells the story
        log.error("could not write failure.json/summary.json: %s", e)


def _write_failure(run, kind: str, message: str, code: ExitCode, t0: float) -> None:
    mem = local_memory(run.device)
    path = run.cfg.run_dir / "failure.json"
    # an OOM or crash often hits one rank only: that rank writes the record unless rank 0 already has
    if run.is_main or (kind in ("oom", "error") and not path.exists()):
        write_json(path, {
            "kind": kind, "phase": run.phase, "step": run.step, "message": message, "rank": run.rank,
            "memory": {"allocated_bytes": mem["allocated"], "reserved_bytes": mem["reserved"], "rss_bytes": mem["rss"],
                       "peak_allocated_bytes": mem["peak_allocated"], "peak_reserved_bytes": mem["peak_reserved"]},
            "exit_code": int(code)})
    if run.is_main:
        write_json(run.cfg.run_dir / "summary.json", _summary(run, kind, t0, None))
        if run.metrics:
            run.metrics.write("end", status=kind, step=run.step, message=message)


def _resume_point(cfg: TrainConfig, is_main: bool) -> str | None:
    if not cfg.resume:
        return None
    path, skipped = ck.newest_verified(cfg.run_dir / "checkpoints")
    if is_main:
        for name in skipped:
            log.warning("--resume: skipping %s (partial or corrupt: MANIFEST missing or does not verify)", name)
        if path is None:
            log.warning("--resume: no verified checkpoint in %s; starting from step 0", cfg.run_dir / "checkpoints")
        else:
            log.info("--resume: continuing from %s", path.name)
    return str(path) if path else None


def _read_summary(run_dir) -> dict | None:
    import json

    try:
        old = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _finished_at(cfg: TrainConfig, old_summary: dict | None, step: int | None) -> int | None:
    """The step of a final/ that verifies (MANIFEST.json sha256) and says the run is done: either this
    invocation resumed at that step and trained none (`step`), or the previous summary.json said "ok" at it
    and it reaches --max-steps. None: final/ must be (re)written."""
    man = ck.verify(cfg.run_dir / "final", deep=True)
    done = man.get("step") if man else None
    if not isinstance(done, int):
        return None
    if step is not None:
        return done if done == step else None
    ok = isinstance(old_summary, dict) and old_summary.get("status") == "ok" and old_summary.get("steps") == done
    return done if ok and (not cfg.max_steps or cfg.max_steps <= 0 or done >= cfg.max_steps) else None


def _already_finished(cfg: TrainConfig, state, step: int, t0: float) -> tuple[int, None]:
    """--resume of a finished run: keep final/ and the summary as they are (a summary that says so, else a new one)."""
    if state.is_main:
        old = state.old_summary
        ok = isinstance(old, dict) and old.get("status") == "ok" and old.get("steps") == step
        state.step = step
        write_json(cfg.run_dir / "summary.json", old if ok else _summary(state, "ok", t0, str(cfg.run_dir / "final")))
        state.metrics.write("end", status="ok", step=step, final_dir="final", already_finished=True)
        log.info("already finished at step %d: final/ verifies, nothing to train (not rewritten)", step)
    return 0, None


def run(cfg: TrainConfig) -> tuple[int, object]:
    """Train; returns (exit code, trained model or None). Never raises for OOM/disk/usage/interrupt."""
    from train import engine
    from train.model import pick_device

    t0 = time.time()
    rank, world, local_rank = _dist_env(cfg)
    device = pick_device(cfg.device)
    state = engine.RunState(cfg=cfg, device=device, rank=rank, world=world)
    try:  # one trainer per run dir (docs/run.md "One owner per run dir"); rank 0 holds it for all ranks
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        lock = hold_run_lock(cfg.run_dir / TRAINER_LOCK, "trainer") if rank == 0 else None
    except ContractError as e:  # before anything is written: the other trainer's files stay as they are
        log.error("%s; %s", e.message, e.hint)
        return int(ExitCode.USAGE), None
    except OSError as e:  # a read-only or unusable --output: bad input, one line
        log.error("--output %s: cannot write the run dir there (%s); hint: choose a writable dir",
                  cfg.run_dir, e.strerror or e)
        return int(ExitCode.USAGE), None
    try:
        return _run_owned(cfg, state, rank, local_rank, t0)
    finally:
        if lock is not None:
            lock.release()


def _run_owned(cfg: TrainConfig, state, rank: int, local_rank: int, t0: float) -> tuple[int, object]:
    from train import engine

    state.metrics = MetricsLog(cfg.run_dir / "metrics.jsonl", rank == 0)
    if rank == 0:
        state.old_summary = _read_summary(cfg.run_dir) if cfg.resume else None
        for stale in ("failure.json", "summary.json"):
            (cfg.run_dir / stale).unlink(missing_ok=True)
        for name in ck.remove_stale_final_tmp(cfg.run_dir):
            log.warning("removed %s: a partial final/ of an earlier run", name)
    old_handlers = engine.install_signal_handlers(state)
    model = None
    try:
        code, model = _train(cfg, state, local_rank, t0)
        return code, model
    except TrainError as e:
        _failure(state, e.kind, e.message + (f" ({e.hint})" if e.hint else ""), e.exit_code, t0)
        if rank == 0:
            log.error("%s", e.message)
            if e.hint:
                log.error("hint: %s", e.hint)
        return int(e.exit_code), None
    except KeyboardInterrupt:
        _failure(state, "interrupted", "interrupted by a second signal", ExitCode.INTERRUPTED, t0)
        return int(ExitCode.INTERRUPTED), None
    except BaseException as e:  # noqa: BLE001 - OOM and crashes become failure.json
        if ck.is_disk_full(e):
            _failure(state, "disk_full", f"disk full: {str(e).splitlines()[0][:300]}", ExitCode.DISK_FULL, t0)
            log.error("disk full in phase %s at step %d: %s", state.phase, state.step, str(e).splitlines()[0][:300])
            return int(ExitCode.DISK_FULL), None
        if is_oom(e):
            _failure(state, "oom", f"{type(e).__name__}: {str(e)[:500]}", ExitCode.OUT_OF_MEMORY, t0)
            log.error("out of memory in phase %s at step %d: %s", state.phase, state.step, str(e)[:300])
            return int(ExitCode.OUT_OF_MEMORY), None
        _failure(state, "error", f"{type(e).__name__}: {str(e)[:500]}", ExitCode.ERROR, t0)
        log.error("trainer crashed: %s", "".join(traceback.format_exception(e))[-3000:])
        return int(ExitCode.ERROR), None
    finally:
        import signal

        for s, h in old_handlers.items():
            signal.signal(s, h)


def _train(cfg: TrainConfig, state, local_rank: int, t0: float):
    from dataclasses import replace
    from functools import partial

    from train import data as D
    from train import engine
    from train.export import export_final
    from train.model import ANYRES, check_trainable, load_base, prepare

    model_dir = _model_dir(cfg, local_rank)
    fams = check_trainable(model_dir, cfg)  # a family it cannot train: exit 2 before anything loads
    vision = fams["vision_family"] is not None
    if not vision:  # a decoder alone: the recipe's CLIP LoRA and projector have nothing to train
        cfg = state.cfg = replace(cfg, vision_lora=None, train_projector=False)
    args = engine.training_args(cfg, state.device, state.world)  # before from_pretrained: ZeRO-3 zero.Init
    records = D.load_records(cfg.dataset, cfg.images, vision)  # bad records fail before the model loads
    base, tok, ip = load_base(model_dir, cfg, state.device, local_rank, fams)
    model = prepare(base, cfg)
    if state.is_main and hasattr(model, "print_trainable_parameters"):
        model.print_trainable_parameters()
    image_tokens = int(getattr(base.config, "image_seq_length", 0) or 0)
    dataset = D.LlavaDataset(records, tok, ip, cfg.chat_template, getattr(base.config, "image_token_index", None),
                             image_tokens, cfg.max_length, cfg.images, anyres=fams["projector_family"] in ANYRES)
    dataset[0]  # encode one record now: max_length / image problems surface as a usage error, not mid-run
    trainer = engine.SafeCheckpointTrainer(model=model, args=args, train_dataset=dataset,
                                           data_collator=partial(D.collate, pad_id=tok.pad_token_id),
                                           callbacks=[engine.RunCallback(state)])
    trainer.run = state
    # after the Trainer is built: with several ranks the process group exists, and rank 0 decides for all
    done = broadcast(_finished_at(cfg, state.old_summary, None) if cfg.resume and state.is_main else None)
    if done is not None:
        return _already_finished(cfg, state, done, t0)
    resume = _resume_point(cfg, state.is_main)
    if resume:
        engine.relax_frozen_resume(trainer)
    state.phase = "train"
    t_train = time.time()
    trainer.train(resume_from_checkpoint=resume)
    state.train_seconds = time.time() - t_train
    state.step = trainer.state.global_step
    state.tokens = trainer.state.num_input_tokens_seen
    if state.interrupted:
        if state.is_main:
            log.warning("stopped at step %d on a signal; last verified checkpoint: %s", state.step,
                        state.last_checkpoint or "none")
        _failure(state, "interrupted", f"stopped on a signal at step {state.step}", ExitCode.INTERRUPTED, t0)
        barrier()
        return int(ExitCode.INTERRUPTED), None
    trained_none = state.step == state.start_step
    if trained_none and broadcast(_finished_at(cfg, None, state.step) if state.is_main else None) is not None:
        return _already_finished(cfg, state, state.step, t0)
    state.phase = "save"
    final = cfg.run_dir / "final"
    staged = cfg.run_dir / f"{ck.FINAL_TMP_PREFIX}{os.getpid()}"
    try:
        export_final(model, cfg, staged, state.is_main)  # gathers under ZeRO-3: every rank
        if state.is_main:
            ck.publish(staged, final, state.step)  # MANIFEST.json: the adapter is verified like a checkpoint
    except Exception as e:
        if state.is_main:  # a partial final/ is never trusted: remove it (it also frees the space)
            shutil.rmtree(staged, ignore_errors=True)
        if not ck.is_disk_full(e):
            raise
        raise DiskFullError(f"final/ could not be written: {str(e).splitlines()[0][:300]}",
                            "free disk space, then rerun with --resume (the last verified checkpoint is intact)") from e
    barrier()
    state.phase = "done"
    if state.is_main:
        write_json(cfg.run_dir / "summary.json", _summary(state, "ok", t0, str(final)))
        state.metrics.write("end", status="ok", step=state.step, final_dir="final")
        log.info("done: %d steps; adapter in %s", state.step, final)
    return 0, model

