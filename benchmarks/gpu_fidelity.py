"""Measure the bundled trainer on one GPU against vramplan's estimate, at real size with random weights.

    python benchmarks/gpu_fidelity.py --work /data/gpu-fid            # on a GPU machine, < 10 minutes
    python benchmarks/gpu_fidelity.py --dry-run                        # anywhere: the grid, commands, estimates

Grid: QLoRA and LoRA x ZeRO-2 without / with optimizer offload x micro-batch 1 / 2 x seq 1024 / 2048.
By default a half fraction of it (8 runs: every level of every factor, each pair of factors balanced;
--full-grid runs all 16). `--grid zero3-full`: the LLM fine-tuned in full under ZeRO-3 at micro-batch 1 and
seq 768 / 1024 / 1536 / 2048 (4 runs; 16 of the 32 decoder layers, 4.8 B params, ~85 GiB: one H200), to
measure how the forward/backward peak grows per token under ZeRO-3; Qwen-1's published 2-GPU rows put it at
about 14 MB per token for 32 layers against the estimate's ~2.5 (docs/estimate.md, case C092).
Each run: `vramplan estimate ... --save-plan` (the public CLI), then the bundled
trainer (`python -m train --plan ... --max-steps 3`) while `nvidia-smi` samples the used memory. The
trainer's summary.json gives torch.cuda.max_memory_allocated / max_memory_reserved (train/metrics.py);
they are compared with the plan's estimate (allocated, allocated + allocator reserve, nvidia-smi).
Writes benchmarks/results/gpu_fidelity.json and .txt. The model is a random-weight LLaVA of the real
architecture (benchmarks/make_random_llava.py; same memory as the real checkpoint) with the tiny
dataset's tokenizer, and a dataset whose records are longer than the sequence length.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GiB = 2**30
PROFILE = "llava-llama3-8b-instruct"
ZERO3_LAYERS = 16  # zero3-full: half the decoder layers (4.8 B params) so a full fine-tune fits one H200
BUDGET_S = 540  # stop starting runs after 9 minutes


def grid(full: bool, kind: str = "lora") -> list[dict]:
    if kind == "zero3-full":
        return [{"recipe": "full", "zero": 3, "offload": "none", "micro_batch": 1, "seq_len": seq}
                for seq in (768, 1024, 1536, 2048)]  # > the 576 image tokens
    rows = []
    for recipe, offload, mb, seq in itertools.product(("qlora", "lora"), ("none", "optimizer"), (1, 2),
                                                      (1024, 2048)):
        levels = (recipe == "lora", offload == "optimizer", mb == 2, seq == 2048)
        if full or sum(levels) % 2 == 0:  # the 2^(4-1) fraction with defining relation I = ABCD
            rows.append({"recipe": recipe, "zero": 2, "offload": offload, "micro_batch": mb, "seq_len": seq})
    return rows


def estimate_flags(row: dict, model: str, gpus: str) -> list[str]:
    return ["--model", model, "--recipe", row["recipe"], "--gpus", gpus, "--zero", str(row["zero"]),
            "--offload", row["offload"],
            "--micro-batch", str(row["micro_batch"]), "--grad-accum", "1", "--seq-len", str(row["seq_len"]),
            "--grad-ckpt", "--headroom", "0"]


def estimate_in_process(row: dict, model: str, gpus: str) -> dict:
    """The estimate the plan will carry, through the public API (same flags as the CLI)."""
    from vramplan.plan.request import EstimateOptions
    from vramplan.plan.service import run_estimate

    res = run_estimate(EstimateOptions(model=model, recipe=row["recipe"], gpus=gpus, zero=row["zero"],
                                       offload=row["offload"],
                                       micro_batch=row["micro_batch"], grad_accum=1, seq_len=row["seq_len"],
                                       grad_ckpt=True, headroom=0.0))
    c = next(c for c in res.candidates if c.strategy.gpus == 1)
    return {"allocated": c.vram_allocated_per_gpu_bytes,
            "reserved": c.vram_allocated_per_gpu_bytes + c.vram_breakdown.get("allocator_reserve", 0),
            "nvidia_smi": c.vram_per_gpu_bytes, "peak_phase": c.peak_phase, "fits": c.fits}


def model_dir(work: Path, kind: str, config_only: bool = False) -> Path:
    name = "model" if kind == "lora" else f"model-l{ZERO3_LAYERS}"
    return work / (name + "-config" if config_only else name)


def random_model(out: Path, kind: str, config_only: bool = False) -> None:
    layers = ["--layers", str(ZERO3_LAYERS)] if kind == "zero3-full" else []
    subprocess.run([sys.executable, str(ROOT / "benchmarks/make_random_llava.py"), PROFILE, str(out), *layers,
                    *(["--config-only"] if config_only else [])], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def prepare(work: Path, kind: str = "lora") -> tuple[Path, Path, Path]:
    """The random real-size model (once) and a dataset of long records with the tiny dataset's images."""
    py = sys.executable
    tiny, model = work / "tiny", model_dir(work, kind)
    if not (tiny / "data.json").is_file():
        subprocess.run([py, "-m", "train.tiny", "--out", str(tiny), "--samples", "8"], check=True, cwd=ROOT)
    if not (model / "config.json").is_file():
        random_model(model, kind)
        for f in (tiny / "model").glob("*token*"):  # the tiny tokenizer: ids stay far below the real vocab
            shutil.copy(f, model / f.name)
        cfg_t = json.loads((tiny / "model/config.json").read_text())
        cfg = json.loads((model / "config.json").read_text())
        for k in ("image_token_index", "image_token_id"):
            if k in cfg_t:
                cfg[k] = cfg_t[k]
        (model / "config.json").write_text(json.dumps(cfg, indent=1))
    records = json.loads((tiny / "data.json").read_text())
    long_text = " ".join(["memory"] * 2600)  # longer than 2048 tokens: the trainer truncates to max_length
    for r in records:
        r["conversations"][-1]["value"] = long_text
    data = work / "long.json"
    data.write_text(json.dumps(records))
    return model, data, tiny / "images"


def _smi_sampler():
    return subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"],
                            stdout=subprocess.PIPE, text=True)


def measure(row: dict, model: Path, data: Path, images: Path, run: Path, gpus: str) -> dict:
    py = sys.executable
    run.mkdir(parents=True, exist_ok=True)
    subprocess.run([py, "-m", "vramplan", "estimate", *estimate_flags(row, str(model), gpus), "--dataset", str(data),
                    "--images", str(images), "--samples", "64", "--output", str(run), "--save-plan",
                    str(run / "plan.json"), "--json"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    smi = _smi_sampler()
    t0 = time.time()
    rc = subprocess.run([py, "-m", "train", "--plan", str(run / "plan.json"), "--output", str(run), "--max-steps", "3",
                         "--save-steps", "1000"], cwd=ROOT).returncode
    smi.terminate()
    used = [int(x) for x in smi.communicate()[0].split() if x.strip().isdigit()]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    est = json.loads((run / "plan.json").read_text())["estimate"]
    return {**row, "rc": rc, "seconds": round(time.time() - t0, 1),
            "measured": {"allocated": (summary.get("peak_allocated_bytes") or [None])[0],
                         "reserved": (summary.get("peak_reserved_bytes") or [None])[0],
                         "nvidia_smi": max(used) * 2**20 if used else None},
            "estimate": {"allocated": est["vram_allocated_per_gpu_bytes"],
                         "reserved": est["vram_allocated_per_gpu_bytes"]
                         + est["vram_breakdown"].get("allocator_reserve", 0),
                         "nvidia_smi": est["vram_per_gpu_bytes"], "peak_phase": est["peak_phase"]}}


def render(rows: list[dict]) -> str:
    out = [f"{'recipe':6} {'zero':>4} {'offload':9} {'mb':>2} {'seq':>5}  " + "  ".join(
        f"{k + ' meas/est GiB (err)':>34}" for k in ("allocated", "reserved", "nvidia_smi"))]
    for r in rows:
        cells = []
        for k in ("allocated", "reserved", "nvidia_smi"):
            m, e = r["measured"].get(k), r["estimate"].get(k)
            cells.append(f"{'-' if m is None else f'{m / GiB:.2f}':>8} / {e / GiB:6.2f}"
                         + (f" ({(e - m) / m:+.1%})" if m else "") if e is not None else "-")
        out.append(f"{r['recipe']:6} {r['zero']:>4} {r['offload']:9} {r['micro_batch']:>2} {r['seq_len']:>5}  "
                   + "  ".join(f"{c:>34}" for c in cells) + (f"  rc={r['rc']}" if r.get("rc") else ""))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/vramplan-gpu-fidelity", help="model, data and run dirs")
    ap.add_argument("--gpus", default="1xH200", help="--gpus for the estimate (default 1xH200)")
    ap.add_argument("--full-grid", action="store_true", help="all 16 runs instead of the 8-run half fraction")
    ap.add_argument("--grid", choices=("lora", "zero3-full"), default="lora",
                    help="lora: the QLoRA/LoRA ZeRO-2 grid; zero3-full: full fine-tune under ZeRO-3, seq 768-2048")
    ap.add_argument("--dry-run", action="store_true", help="print the grid, commands and estimates; run nothing")
    a = ap.parse_args(argv)
    work, rows = Path(a.work), grid(a.full_grid, a.grid)
    if a.dry_run:
        model = PROFILE  # the random model has the profile's architecture: the same estimate
        if a.grid != "lora":  # fewer layers: estimate from the same config.json, written without weights
            model = str(model_dir(work, a.grid, config_only=True))
            random_model(Path(model), a.grid, config_only=True)
        for i, r in enumerate(rows):
            e = estimate_in_process(r, model, a.gpus)
            run = work / f"runs/{i:02d}"
            print(f"# {r}: estimate allocated {e['allocated'] / GiB:.2f} GiB, reserved {e['reserved'] / GiB:.2f} "
                  f"GiB, nvidia-smi {e['nvidia_smi'] / GiB:.2f} GiB (peak: {e['peak_phase']})")
            print("python -m vramplan estimate " + " ".join(estimate_flags(r, str(model_dir(work, a.grid)), a.gpus))
                  + f" --dataset {work}/long.json --images {work}/tiny/images --samples 64 --output {run}"
                  + f" --save-plan {run}/plan.json --json")
            print(f"python -m train --plan {run}/plan.json --output {run} --max-steps 3 --save-steps 1000")
        return 0
    model, data, images = prepare(work, a.grid)
    t0, results = time.time(), []
    for i, r in enumerate(rows):
        if time.time() - t0 > BUDGET_S:
            results.append({**r, "skipped": "time budget"})
            continue
        results.append(measure(r, model, data, images, work / f"runs/{i:02d}", a.gpus))
    done = [r for r in results if "measured" in r]
    text = render(done)
    print(text)
    res = ROOT / "benchmarks/results"
    name, flag = ("gpu_fidelity", "") if a.grid == "lora" else (f"gpu_fidelity_{a.grid}", f" --grid {a.grid}")
    (res / f"{name}.json").write_text(json.dumps(results, indent=1))
    (res / f"{name}.txt").write_text(f"$ python benchmarks/gpu_fidelity.py --work {work}{flag}\n\n{text}\n")
    return 0 if done and all(r["rc"] == 0 for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
