"""Model paths (config + all weights, or complete in the HF cache) and the LLaVA dataset."""

from __future__ import annotations

from pathlib import Path

from vramplan.inputs.dataset import DatasetError, scan_dataset
from vramplan.preflight.base import CheckResult, Context
from vramplan.preflight.hfcache import base_repo_ids, cached_model, inspect_model_dir, trainer_hub_cache
from vramplan.units import fmt_bytes

PROJECTOR_SUFFIXES = (".pth", ".bin", ".safetensors", ".pt")


def _model_sources(ctx: Context) -> tuple[list[tuple[str, Path]], list[str]]:
    """(labelled local paths, HF repo ids) to check."""
    m = ctx.section("model")
    paths: list[tuple[str, Path]] = [(k, Path(m[k])) for k in ("path", "llm_path", "vision_path", "projector_path")
                                     if m.get(k)]
    for p in ctx.model_paths:
        if all(Path(p) != q for _, q in paths):
            paths.append(("--model", Path(p)))
    ids = [] if paths else base_repo_ids(m.get("hf_ids"))
    return paths, ids


def check_model(ctx: Context) -> CheckResult:
    name = "model"
    paths, ids = _model_sources(ctx)
    if not paths and not ids:
        return CheckResult(name, "SKIP", "no model given (--model PATH or a plan)" if ctx.plan is None else
                           "the plan names no model path or Hugging Face id")
    fails, oks, warns, facts = [], [], [], {"paths": {}, "hf_ids": {}}
    for label, p in paths:
        if label == "projector_path":
            ok = p.is_file() and p.suffix in PROJECTOR_SUFFIXES
            facts["paths"][label] = {"path": str(p), "ok": ok}
            (oks if ok else fails).append(f"projector {p}" + ("" if ok else (
                " does not exist" if not p.exists() else f" is not a {'/'.join(PROJECTOR_SUFFIXES)} file")))
            continue
        st = inspect_model_dir(p)
        facts["paths"][label] = st.__dict__
        if st.complete:
            oks.append(f"{label} {p}: config + weights ({fmt_bytes(st.weight_bytes)})")
        else:
            fails.append(f"{label} {p}: {st.problem}")
    cache = trainer_hub_cache(ctx)
    offline = ctx.env.get("HF_HUB_OFFLINE", "") not in ("", "0") or ctx.env.get("TRANSFORMERS_OFFLINE", "") not in (
        "", "0")
    for rid in ids:
        st = cached_model(rid, cache)
        facts["hf_ids"][rid] = st.__dict__
        if st.complete:
            oks.append(f"{rid} complete in the HF cache ({fmt_bytes(st.weight_bytes)})")
        elif offline:
            fails.append(f"{rid}: {st.problem}, and HF_HUB_OFFLINE is set so it cannot be downloaded")
        else:
            warns.append(f"{rid}: {st.problem}; it will be downloaded at launch (counted in 'disk-space')")
    fix_dl = "huggingface-cli download " + " ".join(ids) if ids else ""
    if fails:
        fix = fix_dl or "ls -la <the model dir>   # it needs config.json and model*.safetensors (all shards)"
        return CheckResult(name, "FAIL", "; ".join(fails + warns + oks), fix, facts)
    if warns:
        return CheckResult(name, "WARN", "; ".join(warns + oks), fix_dl + "   # download now, with a progress bar",
                           facts)
    return CheckResult(name, "PASS", "; ".join(oks), "", facts)


def check_dataset(ctx: Context) -> CheckResult:
    name = "dataset"
    d = ctx.section("data")
    ds = ctx.dataset or (Path(d["dataset"]) if d.get("dataset") else None)
    images = ctx.images or (Path(d["images"]) if d.get("images") else None)
    if ds is None:
        return CheckResult(name, "SKIP", "no dataset given (--dataset JSON or the plan's data.dataset)")
    if images is not None and not Path(images).is_dir():
        return CheckResult(name, "FAIL", f"images folder {images} does not exist or is not a directory",
                           "vramplan preflight --dataset data.json --images /path/to/images", {"images": str(images)})
    try:
        rep = scan_dataset(Path(ds), Path(images) if images else None)
    except DatasetError as e:
        return CheckResult(name, "FAIL", e.message, e.hint, {"dataset": str(ds)})
    facts = rep.to_dict()
    notes = "; ".join(rep.notes)
    if not rep.ok:
        more = f" (+{rep.error_count - len(rep.errors)} more records)" if rep.error_count > len(rep.errors) else ""
        return CheckResult(name, "FAIL", f"{rep.error_count} of {rep.samples} records cannot be trained on: "
                                         + "; ".join(rep.errors) + more,
                           f"fix or remove the named records in {ds}" + (" (or pass the right --images DIR)"
                                                                         if rep.images_missing else ""), facts)
    if rep.with_image and images is None:
        return CheckResult(name, "WARN", f"{rep.summary()}; the images were found next to the JSON but the trainer "
                                         f"needs the folder named", f"--images {rep.images_dir}", facts)
    return CheckResult(name, "PASS", rep.summary() + (f"; {notes}" if notes else ""), "", facts)
