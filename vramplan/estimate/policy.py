"""The pick: of the candidates that fit, the plan to bet a run on (docs/estimate.md#the-pick).

1. Set aside ZeRO-3 on one GPU while any other plan fits, and ZeRO-3 with 4-bit weights while a plan
   at ZeRO-2 or below fits.
2. Of the rest, keep those with enough margin (MARGIN_ENOUGH of the card) when any has: a thinner margin
   is inside the memory estimate's own error, so a faster plan with it is not worth the bet.
   Then keep those within the speed tolerance of the fastest: a time difference that small is inside the
   time estimate's own error.
3. Keep those whose memory margin is within MARGIN_STEP of the card of the largest margin, a margin
   above MARGIN_ENOUGH of the card counting as MARGIN_ENOUGH.
4. Of those, prefer the lower ZeRO stage (1 and 2 are one step, ZeRO-2 first), less offload, more of
   the GPUs in use; then the faster, the larger margin.
"""

from __future__ import annotations

from vramplan.estimate.search import STAGE_PREFERENCE, rank_key
from vramplan.estimate.types import Candidate, Job, Offload, Quant
from vramplan.units import GiB

# The memory estimate's own resolution: the CUDA-context prior alone spans 0.65-1.34 GB between tools
# (docs/estimate.md#peak-and-overheads), so margins closer than 2.5% of the card are not told apart.
MARGIN_STEP = 0.025
# Enough margin (a prior): fms-acceleration's nvidia-smi / allocated ratios (median ~1.26, CUDA context
# included) against the estimate's x1.12 + 0.75 GiB mean up to ~10% of the card more at a full card;
# 15% covers that with room for the other priors (docs/estimate.md#the-pick).
MARGIN_ENOUGH = 0.15
# ZeRO-1 and ZeRO-2 are one code path (DeepSpeed runtime/zero/stage_1_and_2.py, `partition_gradients`
# is the difference) and the same plan on one GPU: one step of "lower stage"; STAGE_PREFERENCE orders them.
STAGE_STEP = {0: 0, 1: 1, 2: 1, 3: 2}
ORDER = ("larger memory margin", "lower ZeRO stage", "less offload", "all GPUs in use")

ONE_GPU_ZERO3 = "ZeRO-3 on one GPU shards nothing (used only when nothing else fits)"
ZERO3_4BIT = ('ZeRO-3 with 4-bit weights is known to fail ("All input tensors need to be on the same GPU"; '
              "used only when no plan at ZeRO-2 or below fits)")


def _one_gpu_zero3(c: Candidate) -> bool:
    return c.strategy.zero_stage == 3 and c.strategy.gpus == 1


def set_aside(cands: list[Candidate], fitting: list[int], job: Job) -> dict[int, str]:
    """The candidates of `fitting` (indices) the policy passes over while others fit, with the reason."""
    out: dict[int, list[str]] = {}
    if any(not _one_gpu_zero3(cands[i]) for i in fitting):
        for i in fitting:
            if _one_gpu_zero3(cands[i]):
                out.setdefault(i, []).append(ONE_GPU_ZERO3)
    if job.quant == Quant.NF4 and any(cands[i].strategy.zero_stage <= 2 for i in fitting):
        for i in fitting:
            if cands[i].strategy.zero_stage == 3:
                out.setdefault(i, []).append(ZERO3_4BIT)
    return {i: "; ".join(r) for i, r in out.items()}


def margin_text(c: Candidate) -> str:
    return f"{c.margin_bytes / GiB:.2f} GiB ({c.margin_fraction:.1%} of the card)"


def _capped_margin(c: Candidate, job: Job) -> float:
    return min(c.margin_bytes, MARGIN_ENOUGH * job.hardware.memory_bytes)


def preference(c: Candidate) -> tuple:
    """Criteria 2-4 and the tie-breaks, best first."""
    s = c.strategy
    return (STAGE_STEP[s.zero_stage], Offload.ALL.index(s.offload), -s.gpus, STAGE_PREFERENCE[s.zero_stage],
            s.engine == "torch",  # at an equal margin class, DeepSpeed (the path the trainer's plans were checked on)
            round(c.time_seconds, 3), -c.margin_bytes, -s.micro_batch, s.grad_ckpt)


def choose(cands: list[Candidate], job: Job, among: list[int] | None = None) -> tuple[int | None, dict]:
    """The pick among `among` (default: every fitting candidate) and the sets it came from."""
    fitting = [i for i in (range(len(cands)) if among is None else among) if cands[i].fits]
    if not fitting:
        return None, {}
    aside = set_aside(cands, fitting, job)
    eligible = [i for i in fitting if i not in aside]
    roomy = [i for i in eligible if cands[i].margin_fraction >= MARGIN_ENOUGH]
    thin = [i for i in eligible if i not in roomy] if roomy else []
    eligible = roomy or eligible
    fastest = min(eligible, key=lambda i: rank_key(cands[i]))
    limit = cands[fastest].time_seconds * (1 + job.speed_tolerance) + 1e-9
    window = [i for i in eligible if cands[i].time_seconds <= limit]
    best_margin = max(_capped_margin(cands[i], job) for i in window)
    floor = best_margin - MARGIN_STEP * job.hardware.memory_bytes
    safe = [i for i in window if _capped_margin(cands[i], job) >= floor]
    best = min(safe, key=lambda i: preference(cands[i]))
    return best, {"aside": aside, "thin": thin, "fastest": fastest, "window": window, "safe": safe}


def lost_on(i: int, best: int, cands: list[Candidate], sets: dict, job: Job) -> tuple[str, str]:
    """(criterion, detail): why candidate i lost to the pick."""
    c, b = cands[i], cands[best]
    if i in sets["aside"]:
        return "set aside", sets["aside"][i]
    if i in sets["thin"]:
        return "margin", (f"{margin_text(c)}, under the {MARGIN_ENOUGH:.0%} of the card that covers the memory "
                          f"estimate's error, vs the pick's {margin_text(b)}")
    if i not in sets["window"]:
        slower = c.time_seconds / cands[sets["fastest"]].time_seconds - 1
        return "speed", f"{slower:.1%} slower than the fastest, beyond the {job.speed_tolerance:.0%} tolerance"
    if i not in sets["safe"]:
        return "margin", f"{margin_text(c)} vs the pick's {margin_text(b)}"
    pc, pb = preference(c), preference(b)
    cs, bs = c.strategy, b.strategy
    if pc[0] != pb[0]:
        return "ZeRO stage", f"ZeRO-{cs.zero_stage} vs the pick's lower ZeRO-{bs.zero_stage}, at a similar margin"
    if pc[1] != pb[1]:
        return "offload", f"offload {cs.offload} vs the pick's {bs.offload}, at a similar margin"
    if pc[2] != pb[2]:
        return "GPUs", f"{cs.gpus} of {job.total_gpus} GPUs in use vs the pick's {bs.gpus}"
    if pc[3] != pb[3]:
        return "ZeRO stage", "ZeRO-1 and ZeRO-2 count as one step; ZeRO-2 first (XTuner's and LLaVA's configs)"
    if pc[4] != pb[4]:
        return "engine", "plain PyTorch vs the pick's DeepSpeed, both with enough margin (DeepSpeed first)"
    return "tie-break", "same stage, offload and GPUs: the faster, then the larger margin and micro-batch"


def _reason(best: int, cands: list[Candidate], sets: dict, job: Job) -> tuple[str, str]:
    b, f = cands[best], sets["fastest"]
    parts = []
    if best == f:
        decided = "speed"
        faster = " ".join(r for i, r in sets["aside"].items() if cands[i].time_seconds < b.time_seconds)
        kinds = [k for k, r in (("on one GPU", ONE_GPU_ZERO3), ("with 4-bit weights", ZERO3_4BIT)) if r in faster]
        what = "the fastest plan with enough margin" if sets["thin"] else "the fastest plan"
        parts.append(what + (f" once ZeRO-3 {' and '.join(kinds)} is set aside" if kinds else ""))
    else:
        decided, detail = lost_on(f, best, cands, sets, job)
        slower = b.time_seconds / cands[f].time_seconds - 1
        pace = f"{slower:.1%} slower than" if slower >= 0.0005 else "as fast as"
        parts.append(f"{pace} the fastest, #{f}, which loses on {decided}: {detail}")
    parts.append(f"margin {margin_text(b)}")
    if b.strategy.zero_stage == 3 and job.quant == Quant.NF4:
        parts.append("ZeRO-3 with 4-bit weights only because no plan at ZeRO-2 or below fits (see the note)")
    elif _one_gpu_zero3(b):
        parts.append("ZeRO-3 on one GPU only because nothing else fits")
    return decided, "; ".join(parts)


def policy_text(job: Job) -> str:
    return (f"the plans that fit with enough margin ({MARGIN_ENOUGH:.0%} of the card) if any, within "
            f"{job.speed_tolerance:.0%} of the fastest of them (--speed-tolerance), then the "
            f"larger margin (equal within {MARGIN_STEP:.1%} of the card, enough at {MARGIN_ENOUGH:.0%}), lower ZeRO "
            "stage, less offload, all GPUs in use; ZeRO-3 only on several GPUs, with 4-bit weights only if no ZeRO-2 "
            "plan fits")


def _label(c: Candidate) -> str:
    s = c.strategy
    layout = "plain PyTorch" if s.engine == "torch" else f"ZeRO-{s.zero_stage}"
    return f"{layout} offload={s.offload} on {s.gpus} GPU(s)"


def _variant(c: Candidate) -> str:
    s = c.strategy
    return f"micro-batch {s.micro_batch}, checkpointing {'on' if s.grad_ckpt else 'off'}"


def why_not_faster(best: int, cands: list[Candidate], sets: dict, job: Job, limit: int = 8) -> list[str]:
    """One line per (ZeRO, offload, GPUs) combination with a variant at least as fast as the pick: why its
    fastest fitting one lost, else (nothing that fast fits) why its variants do not fit. The fitting ones
    first, each group fastest first; at most `limit` lines."""
    t_best = cands[best].time_seconds
    combos: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
        s = c.strategy
        combos.setdefault((s.zero_stage, s.engine, s.offload, s.gpus), []).append(i)
    lost, unfit_lines = [], []
    for group in sorted(combos.values(), key=lambda g: min(cands[i].time_seconds for i in g)):
        fit = [i for i in group if cands[i].fits and i != best and cands[i].time_seconds <= t_best + 1e-9]
        unfit = [i for i in group if not cands[i].fits and cands[i].time_seconds < t_best - 1e-9]
        if fit:
            i = min(fit, key=lambda k: rank_key(cands[k]))
            c = cands[i]
            pace = "faster" if c.time_seconds < t_best - 1e-9 else "as fast"
            crit, detail = lost_on(i, best, cands, sets, job)
            lost.append(f"{_label(c)}, {_variant(c)} ({pace}, fits): "
                        + (f"{crit}: {detail}" if crit == "set aside" else f"lost on {crit}: {detail}"))
        elif unfit:
            if not any(cands[k].fits for k in group):
                c = min((cands[k] for k in group), key=lambda c: c.vram_per_gpu_bytes)
                unfit_lines.append(f"{_label(c)}: even at {_variant(c)}: {'; '.join(c.reasons)}")
            else:
                c = min((cands[k] for k in unfit), key=lambda c: c.vram_per_gpu_bytes)
                unfit_lines.append(f"{_label(c)}, {_variant(c)} (faster): {'; '.join(c.reasons)}")
    return (lost + unfit_lines)[:limit]


def pick(cands: list[Candidate], job: Job) -> tuple[int | None, list[str], dict]:
    """The pick's index (None: nothing fits), why faster-looking options lost, and the policy for the output."""
    policy = {"speed_tolerance": job.speed_tolerance, "margin_step_fraction": MARGIN_STEP,
              "margin_enough_fraction": MARGIN_ENOUGH, "order": list(ORDER), "text": policy_text(job)}
    best, sets = choose(cands, job)
    if best is None:
        return None, [], dict(policy, decided_by=None, reason="nothing fits", fastest_eligible=None,
                              within_tolerance=[], set_aside=[])
    decided, reason = _reason(best, cands, sets, job)
    policy.update(decided_by=decided, reason=reason, fastest_eligible=sets["fastest"],
                  within_tolerance=sorted(sets["window"]), set_aside=sorted(set(sets["aside"].values())))
    return best, why_not_faster(best, cands, sets, job), policy
