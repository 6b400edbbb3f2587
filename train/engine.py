"""The training engine: HF Trainer (+ DeepSpeed ZeRO 0/1/2/3 from the plan, or DDP / one process),
the checkpoint protocol hooked into Trainer._save_checkpoint, metrics, OOM and signal handling."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import Trainer, TrainerCallback

from train import checkpoint as ck
from train.config import TrainConfig
from train.exit_codes import DiskFullError
from train.metrics import MetricsLog, barrier, broadcast, gather, local_memory
from vramplan.contract import ENV_TEST_INJECT_OOM_AT_STEP

log = logging.getLogger("train")
TRAINABLE = "trainable.safetensors"  # checkpoint weights of a no-PEFT run (projector pretraining)


@dataclass
class RunState:
    """Mutable facts of one run that the failure/summary records report."""

    cfg: TrainConfig
    device: str
    rank: int = 0
    world: int = 1
    phase: str = "load"
    step: int = 0
    start_step: int = 0  # global step this invocation started (or resumed) at
    old_summary: dict | None = None  # rank 0, --resume: summary.json as the previous invocation left it
    stop_requested: bool = False
    interrupted: bool = False
    checkpoint_bytes: int | None = None
    last_checkpoint: str | None = None
    metrics: MetricsLog | None = None
    peaks: list = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    save_seconds: float = 0.0  # inside train_seconds: checkpoint writing + fsync + sha256 verification

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class SafeCheckpointTrainer(Trainer):
    """Trainer whose checkpoints follow train.checkpoint's protocol (no silent loss)."""

    run: RunState

    def _get_output_dir(self, trial):  # HF writes `<this>/checkpoint-N`: point it into the tmp dir
        return str(self._staging) if getattr(self, "_staging", None) else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """One save, in train.checkpoint's order: space check, every rank writes into a temp dir, rank 0
        verifies and renames it, only then prunes beyond keep-N, and only then "saved" is logged."""
        run = self.run
        root, step = run.cfg.run_dir / "checkpoints", self.state.global_step
        run.phase = "save"
        t0 = time.time()
        self._check_space(root)
        tag = broadcast(secrets.token_hex(4))
        self._write_staged(model, trial, root, step, tag)
        barrier()
        path, nbytes, removed = self._publish(root, step, tag)
        self._record_saved(step, path, nbytes, removed, t0)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """HF derives what is left of a resumed run from whole epochs (transformers trainer.py
        _init_training_state, _run_epoch) and checks max_steps only after a step (DefaultFlowCallback
        on_step_end), so a checkpoint at max_steps mid-epoch trained one more step. Here a resumed state
        at or past max_steps has no epoch left: the loop runs no step."""
        epochs, skip = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                    resume_from_checkpoint, trial)
        if resume_from_checkpoint is not None and self.state.global_step >= max_steps:
            return num_train_epochs, 0
        return epochs, skip

    def _check_space(self, root: Path) -> None:
        """Rank 0 makes room for the next checkpoint (ck.ensure_space); every rank raises DiskFullError if it cannot."""
        cfg = self.run.cfg
        err = None
        if self.run.is_main:
            root.mkdir(parents=True, exist_ok=True)
            try:
                ck.ensure_space(root, cfg.expected_checkpoint_bytes or ck.last_size(root), cfg.keep_checkpoints)
            except DiskFullError as e:
                err = (e.message, e.hint)
        err = broadcast(err)
        if err:
            raise DiskFullError(*err)

    def _write_staged(self, model, trial, root: Path, step: int, tag: str) -> None:
        """Every rank writes into checkpoints/.tmp-checkpoint-<step>-<tag>/; a full disk on any rank removes
        the partial write and raises DiskFullError on all of them."""
        local = self._write_local(model, trial, root, step, tag)
        errs = [x for x in gather(local) if x]
        if errs:
            if self.run.is_main:
                shutil.rmtree(ck.tmp_dir(root, step, tag), ignore_errors=True)
            raise DiskFullError(*errs[0])

    def _write_local(self, model, trial, root: Path, step: int, tag: str) -> tuple[str, str] | None:
        """HF's own save, pointed into the temp dir; (message, hint) when this rank's disk filled up."""
        self._staging = ck.tmp_dir(root, step, tag)
        engine = self.model_wrapped if self.is_deepspeed_enabled and self._trainable_only() else None
        try:
            if engine is not None:
                # HF passes exclude_frozen_parameters only for PEFT models: without it DeepSpeed writes the
                # whole frozen model (26 GB for LLaVA-13B) into every projector-only checkpoint
                orig = engine.save_checkpoint
                engine.save_checkpoint = functools.partial(orig, exclude_frozen_parameters=True)
            super()._save_checkpoint(model, trial)
        except Exception as e:
            # torch.save may report a full disk only as "unexpected pos" / "iostream error": look at the disk
            # itself before the cleanup frees the space again
            staged = ck.tmp_dir(root, step, tag)
            full = (ck.is_disk_full(e) or ck.free_bytes(root) < max(16 * 2**20, ck.last_size(root) or 0)
                    or ck.hit_file_size_limit(staged))
            if self.run.is_main:  # a partial write is never trusted: remove it now (it also frees the space)
                shutil.rmtree(staged, ignore_errors=True)
            if not full:
                raise
            return (f"checkpoint {step}: write failed, disk full ({str(e).splitlines()[0][:200]})",
                    "free disk space, then rerun with --resume")
        finally:
            self._staging = None
            if engine is not None:
                engine.save_checkpoint = orig
        return None

    def _publish(self, root: Path, step: int, tag: str) -> tuple[str, int, list]:
        """Rank 0 verifies the written checkpoint and renames it to checkpoint-<step> (ck.finalize), then
        prunes verified checkpoints beyond keep-N (ck.prune); every rank gets (path, bytes, removed)."""
        result = None
        if self.run.is_main:
            try:
                dest, man = ck.finalize(ck.tmp_dir(root, step, tag) / f"checkpoint-{step}", root, step)
                removed = ck.prune(root, self.run.cfg.keep_checkpoints, step)
                result = ("ok", str(dest), man["total_bytes"], removed)
            except DiskFullError as e:
                result = ("err", e.message, e.hint, [])
        result = broadcast(result)
        if result[0] == "err":
            raise DiskFullError(result[1], result[2])
        return result[1], result[2], result[3]

    def _record_saved(self, step: int, path: str, nbytes: int, removed: list, t0: float) -> None:
        """After verification only: the run state, the metrics event and the "saved" log line."""
        run = self.run
        run.last_checkpoint, run.checkpoint_bytes = path, nbytes
        run.save_seconds += time.time() - t0
        if run.metrics:
            run.metrics.write("checkpoint", step=step, path=f"checkpoints/{Path(path).name}", bytes=nbytes,
                              verified=True, removed=removed)  # relative to the run dir: it may be moved
        if run.is_main:
            log.info("saved checkpoint-%d (%d bytes, verified)", step, nbytes)
        run.phase = "train"

    # recipe "pretrain" (no PEFT): save/restore only the trainable weights (the projector), like LLaVA's
    # mm_projector.bin, instead of the whole frozen model in every checkpoint
    def _trainable_only(self) -> bool:
        return not hasattr(self.model, "peft_config") and not self.run.cfg.train_llm_full

    def _save(self, output_dir=None, state_dict=None):
        if not self._trainable_only():
            return super()._save(output_dir, state_dict)
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        sd = state_dict if state_dict is not None else self.model.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items() if k in names},
                  os.path.join(output_dir, TRAINABLE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        path = os.path.join(resume_from_checkpoint, TRAINABLE)
        if not (self._trainable_only() and os.path.exists(path)):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        missing = set(load_file(path)) - set(dict(self.model.named_parameters()))
        if missing:
            raise RuntimeError(f"{path}: unexpected keys {sorted(missing)[:3]}")
        self.model.load_state_dict(load_file(path), strict=False)


class RunCallback(TrainerCallback):
    """metrics.jsonl step events, the test-only OOM switch, and stop-at-step-boundary on signals."""

    def __init__(self, run: RunState) -> None:
        self.run = run
        self.last_t = time.time()
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self.run.phase = "train"
        self.run.start_step = state.global_step
        self.last_t, self.last_tokens = time.time(), state.num_input_tokens_seen
        if self.run.metrics:
            self.run.metrics.write("start", step=state.global_step, max_steps=state.max_steps,
                                   world_size=self.run.world, device=self.run.device)

    def on_step_begin(self, args, state, control, **kw):
        inject = os.environ.get(ENV_TEST_INJECT_OOM_AT_STEP)  # test-only (docs/contracts.md "Launch")
        if inject and state.global_step + 1 == int(inject):
            import torch

            raise torch.OutOfMemoryError(
                f"test-injected out of memory at step {inject} ({ENV_TEST_INJECT_OOM_AT_STEP})"
            )

    def on_step_end(self, args, state, control, **kw):
        self.run.step = state.global_step
        stop = self.run.stop_requested
        if self.run.world > 1:
            stop = any(gather(stop))  # every rank stops at the same step boundary
        if stop:
            self.run.interrupted = True
            control.should_training_stop = True
            control.should_save = False

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        mems = gather(local_memory(self.run.device))  # every rank logs at the same steps
        self.run.peaks = mems
        if "loss" not in logs or not self.run.metrics:
            return
        now, tokens = time.time(), state.num_input_tokens_seen
        tps = (tokens - self.last_tokens) / max(now - self.last_t, 1e-9)
        self.last_t, self.last_tokens = now, tokens
        self.run.tokens = tokens
        self.run.metrics.write(
            "step", step=state.global_step, max_steps=state.max_steps, loss=logs["loss"],
            lr=logs.get("learning_rate"), grad_norm=logs.get("grad_norm"), tokens_per_s=round(tps, 2),
            tokens=tokens, rank=self.run.rank, device=self.run.device,
            peak_allocated_bytes=[m["peak_allocated"] for m in mems],
            peak_reserved_bytes=[m["peak_reserved"] for m in mems],
            peak_rss_bytes=[m["peak_rss"] for m in mems], rss_bytes=mems[0]["rss"])


def relax_frozen_resume(trainer: SafeCheckpointTrainer) -> None:
    """A projector-only DeepSpeed checkpoint (saved with exclude_frozen_parameters) resumes with a
    non-strict module load; HF asks for a strict one unless the model is a PEFT model."""
    if not (trainer.is_deepspeed_enabled and trainer._trainable_only()):
        return
    import transformers.trainer as hf_trainer

    strict_load = hf_trainer.deepspeed_load_checkpoint

    def non_strict(engine, path, load_module_strict=True):
        return strict_load(engine, path, load_module_strict=False)

    hf_trainer.deepspeed_load_checkpoint = non_strict


SAME_REQUEST_WINDOW_S = 5.0  # a SIGTERM this soon after a SIGINT (or the reverse) is the same stop request


def install_signal_handlers(run: RunState) -> dict:
    """First SIGINT/SIGTERM: stop at the next step boundary. Second: KeyboardInterrupt now.

    A Ctrl-C in a terminal reaches the workers twice under the deepspeed launcher: the terminal's
    SIGINT to the whole process group, then the SIGTERM the launcher forwards. A signal of the other
    kind within SAME_REQUEST_WINDOW_S of the first is therefore not taken as "abort now".
    """
    first: dict = {}

    def handler(signum, frame):
        now = time.monotonic()
        if run.stop_requested:
            if signum != first.get("signum") and now - first.get("t", 0.0) < SAME_REQUEST_WINDOW_S:
                log.warning("signal %d right after signal %d: the same stop request", signum, first["signum"])
                return
            raise KeyboardInterrupt
        run.stop_requested = True
        first.update(signum=signum, t=now)
        log.warning("signal %d: stopping at the next step boundary (again to abort now)", signum)

    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread (e.g. an embedding app): no handlers
            pass
    return old


def training_args(cfg: TrainConfig, device: str, world: int):
    from transformers import TrainingArguments

    ds = cfg.ds_config
    bf16 = cfg.compute_dtype == "bf16"
    fp16 = cfg.compute_dtype == "fp16" and device != "cpu"
    clip = 1.0
    if ds is not None:
        bf16 = (
            bool((ds.get("bf16") or {}).get("enabled", bf16))
            if (ds.get("bf16") or {}).get("enabled") != "auto"
            else bf16
        )
        fp16 = (
            bool((ds.get("fp16") or {}).get("enabled", fp16))
            if (ds.get("fp16") or {}).get("enabled") != "auto"
            else fp16
        )
        if isinstance(ds.get("gradient_clipping"), (int, float)):
            clip = float(ds["gradient_clipping"])
    return TrainingArguments(
        output_dir=str(cfg.run_dir / "checkpoints"), per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, optim=cfg.optimizer,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, max_grad_norm=clip,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=None,
        seed=cfg.seed, data_seed=cfg.seed, bf16=bf16, fp16=fp16, use_cpu=device == "cpu",
        deepspeed=ds, gradient_checkpointing=False,  # enabled on the model itself (model.prepare)
        remove_unused_columns=False, report_to=[], dataloader_num_workers=cfg.dataloader_workers,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        ddp_find_unused_parameters=cfg.vision_lora is not None, ddp_backend=_backend(device, world),
    )


def _backend(device: str, world: int):
    if world <= 1:
        return None
    return {"cuda": "nccl", "npu": "hccl"}.get(device, "gloo")
