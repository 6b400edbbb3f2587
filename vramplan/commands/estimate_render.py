"""Human rendering of `vramplan estimate` (computes nothing; reads the --json data)."""

from __future__ import annotations

from vramplan.estimate.types import Offload
from vramplan.units import GiB, fmt_bytes, fmt_seconds, fmt_span

OFF_SHORT = Offload.SHORT


def _g(b) -> str:
    return f"{b / GiB:.1f}"


def _margin(c: dict) -> str:
    """The table's margin cell: usable memory minus the nvidia-smi figure, GiB and % of the card."""
    if c.get("margin_bytes") is None:
        return "-"
    return f"{c['margin_bytes'] / GiB:.1f} ({c['margin_fraction']:.0%})"


def _short(c: dict, data: dict) -> str:
    """A short table verdict; the full reasons are in --json and below the table."""
    usable = data["hardware"]["memory_bytes"] * (1 - data["headroom"])
    r = c["reasons"][0]
    if r.startswith("needs") and ("per GPU" in r or "fullest GPU" in r):
        return f"VRAM {c['vram_per_gpu_bytes'] / GiB:.1f} > {usable / GiB:.1f} GiB"
    if "CPU RAM" in r:
        return "CPU RAM"
    if "disk" in r:
        return "disk"
    return r if len(r) < 40 else r[:37] + "..."


def _best_rows(cands: list[dict], pick: int | None) -> list[int]:
    """One row per (GPUs, ZeRO, offload): the pick, else its fastest fitting candidate, else its smallest."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cands):
        groups.setdefault((c["gpus"], _zero(c), c["offload"]), []).append(i)
    rows = []
    for idx in groups.values():
        if pick in idx:
            rows.append(pick)
            continue
        fit = [i for i in idx if cands[i]["fits"]]
        if fit:
            rows.append(min(fit, key=lambda i: (cands[i]["time_seconds"], -cands[i]["micro_batch"])))
        else:
            rows.append(min(idx, key=lambda i: cands[i]["vram_per_gpu_bytes"]))
    return sorted(rows, key=lambda i: (cands[i]["gpus"], cands[i].get("engine") != "torch", cands[i]["zero_stage"],
                                        Offload.ALL.index(cands[i]["offload"])))


def _zero(c: dict) -> str:
    """The ZeRO column: the stage, or "none" for plain PyTorch (no DeepSpeed)."""
    return "none" if c.get("engine") == "torch" else str(c["zero_stage"])


def _family(m: dict) -> str:
    """" (mistral)": the family modules that described the model (docs/estimate.md#parameters)."""
    t = m.get("traced")
    if t:  # docs/estimate.md#the-traced-path
        return f" (traced, not derived: {t['architecture']}, {t['seconds']:.1f} s{', cached' if t['cached'] else ''})"
    return f" ({m['family']})" if m.get("family") else ""


def _image(m: dict) -> str:
    """"576 image": the LLM's image tokens per image, and the tower's when they differ (crops, CLS)."""
    tower = m.get("tower_tokens_per_image")
    if not m["image_tokens"] or not tower or tower == m["image_tokens"]:
        return f"{m['image_tokens']} image"
    size = m.get("image_size")
    at = f" at {size[0]}x{size[1]}" if size else ""
    return f"{m['image_tokens']} image; the tower processes {tower} per image{at}"


def _header(con, data: dict) -> None:
    from rich.text import Text

    m, r, hw = data["model"], data["recipe"], data["hardware"]
    size = f"{m['params'] / 1e9:.2f} B" if m["params"] >= 1e8 else f"{m['params'] / 1e6:.2f} M"
    lines = [
        f"model     {m['name']}{_family(m)}: {size} params, {m['trainable_params'] / 1e6:.1f} M trainable"
        f" ({data['quant']} LLM, {data['compute_dtype']} compute)",
        f"recipe    {r['name']}: seq {data['seq_len']} tokens ({_image(m)}), "
        f"{data['samples']} samples x {data['epochs']} epoch(s), global batch {r['global_batch']}",
        f"hardware  {hw['nodes']} node(s) x {hw['gpus_per_node']} x {hw['gpu_name']} "
        f"({hw['memory_bytes'] / GiB:.1f} GiB each; {data['gpus_source']}); headroom {data['headroom']:.0%}",
    ]
    for a in data.get("assumptions", []):
        lines.append(f"note      {a}")
    for line in lines:
        con.print(Text(line))


def render_estimate(con, data: dict, explain: bool = False, show_all: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    _header(con, data)
    cands, pick = data["candidates"], data["pick"]
    rows = list(range(len(cands))) if show_all else _best_rows(cands, pick)
    cpu = data.get("device") == "cpu"
    title = ("Candidates (device: this CPU; VRAM/GPU = peak memory of the training process; GiB = 2^30 bytes)"
             if cpu else "Candidates (VRAM = what nvidia-smi shows at peak; GiB = 2^30 bytes)")
    t = Table(title=title, title_justify="left")
    for col in ("#", "GPUs", "ZeRO", "offload", "micro x accum", "ckpt", "VRAM/GPU GiB", "margin GiB (%)",
                "CPU RAM GiB", "disk GiB", "checkpoint GiB", "time", "verdict"):
        t.add_column(col, justify="right" if col not in ("offload", "verdict", "ckpt") else "left")
    for i in rows:
        c = cands[i]
        verdict = "PICK" if i == pick else ("fits" if c["fits"] else "no: " + _short(c, data))
        style = "bold green" if i == pick else ("" if c["fits"] else "dim")
        t.add_row(f"*{i}" if i == pick else str(i), str(c["gpus"]), _zero(c), OFF_SHORT[c["offload"]],
                  f"{c['micro_batch']} x {c['grad_accum']}", "on" if c["grad_checkpointing"] else "off",
                  _g(c["vram_per_gpu_bytes"]), _margin(c), _g(c["cpu_ram_bytes"]), _g(c["disk_bytes"]),
                  _g(c["checkpoint_bytes"]), time_cell(c), Text(verdict), style=style)
    con.print(t)
    if pick is None:
        con.print(Text("Nothing fits. The closest candidates above say why; try more GPUs, --quant nf4, "
                       "a smaller --seq-len or --lora-r, or offload.", style="bold red"))
        return
    c = cands[pick]
    cap = data["hardware"]["memory_bytes"]
    layout = "plain PyTorch (no DeepSpeed)" if c.get("engine") == "torch" else f"ZeRO-{c['zero_stage']}"
    con.print(Text(f"Pick #{pick}: {layout}, offload {c['offload']}, {c['gpus']} GPU(s), micro-batch "
                   f"{c['micro_batch']} x accumulation {c['grad_accum']}, checkpointing "
                   f"{'on' if c['grad_checkpointing'] else 'off'}; peak in {c['peak_phase']}.", style="bold"))
    policy = data.get("pick_policy") or {}
    if policy.get("reason"):
        con.print(Text(f"  why: {policy['reason']}."))
        con.print(Text(f"  policy: {policy['text']} (docs/estimate.md#the-pick)."))
    for n in c["notes"]:
        con.print(Text(f"  note: {n}"))
    _bar(con, c, cap, data["headroom"], cpu)
    if data.get("why_not_faster"):
        con.print(Text("Faster-looking options not picked:"))
        for w in data["why_not_faster"]:
            con.print(Text(f"  - {w}"))
    con.print(Text(disk_line(c)))
    con.print(Text(time_line(c)))
    if explain:
        _explain(con, c, data)


def time_cell(c: dict) -> str:
    """'27 min (20-36 min)': the figure and the band it likely falls in (docs/estimate.md#time)."""
    b = (c.get("time_detail") or {}).get("band")
    if not b:
        return fmt_seconds(c["time_seconds"])
    return f"{fmt_seconds(c['time_seconds'])} ({fmt_span(b['low_s'], b['high_s'])})"


def time_line(c: dict) -> str:
    """'Time: 27 min, likely 20-36 min (band: ...).'"""
    b = (c.get("time_detail") or {}).get("band")
    line = f"Time: {fmt_seconds(c['time_seconds'])}"
    if b:
        line += f", likely {fmt_span(b['low_s'], b['high_s'])} (band from {b['source']})"
    return line + "."


def _disk_source(c: dict, part: str) -> str:
    """' (scaled)', or for the checkpoints ' (computed: 3 on disk at once of 47 saves)'."""
    src = (c.get("disk_sources") or {}).get(part)
    n, saves = c.get("checkpoints_on_disk"), c.get("checkpoint_saves")
    if part == "checkpoints" and n:
        src = f"{src or 'computed'}: {n} on disk at once" + (f" of {saves} save(s)" if saves else "")
    return f" ({src})" if src else ""


def disk_line(c: dict) -> str:
    """'Disk: X to write = part size (source), ...; already on this machine, not counted: ...; one checkpoint Y.'"""
    parts = [f"{k} {fmt_bytes(v)}{_disk_source(c, k)}" for k, v in c["disk_breakdown"].items() if v]
    line = f"Disk: {fmt_bytes(c['disk_bytes'])} to write = " + ", ".join(parts)
    present = c.get("disk_present") or {}
    if present:
        line += "; already on this machine, not counted: " + ", ".join(
            f"{k} {fmt_bytes(v)}{_disk_source(c, k)}" for k, v in present.items())
    return line + f"; one checkpoint {fmt_bytes(c['checkpoint_bytes'])}."


def _bar(con, c: dict, cap: int, headroom: float, cpu: bool = False) -> None:
    from rich.text import Text

    width = 50
    con.print(Text(f"{'Process' if cpu else 'Per-GPU'} memory of the pick against {cap / GiB:.1f} GiB "
                   f"(| marks the {1 - headroom:.0%} usable limit):"))
    limit_col = int(width * (1 - headroom))
    for name, b in sorted(c["vram_breakdown"].items(), key=lambda kv: -kv[1]):
        if b <= 0:
            continue
        n = max(1, round(width * b / cap))
        bar = ("#" * n).ljust(width)
        bar = bar[:limit_col] + "|" + bar[limit_col:]
        con.print(Text(f"  {name:<26} {bar} {b / GiB:7.2f} GiB"))
    total = "= peak RSS" if cpu else "= nvidia-smi at peak"
    con.print(Text(f"  {total:<26} {'':{width + 1}} {c['vram_per_gpu_bytes'] / GiB:7.2f} GiB "
                   f"(allocated {c['vram_allocated_per_gpu_bytes'] / GiB:.2f} GiB)"))


def _explain(con, c: dict, data: dict) -> None:
    from rich.text import Text

    con.print(Text("\nHow each number is computed (bytes; sources in brackets):", style="bold"))
    for name, b in c["vram_breakdown"].items():
        con.print(Text(f"  GPU  {name}: {fmt_bytes(b)} = {c['vram_formulas'][name]}"))
    for name, b in c["cpu_breakdown"].items():
        con.print(Text(f"  CPU  {name}: {fmt_bytes(b)}"))
    con.print(Text(f"  CPU  pinned (page-locked) memory: {fmt_bytes(c['pinned_cpu_bytes'])} (compare `ulimit -l`)"))
    for name, b in c["checkpoint_breakdown"].items():
        con.print(Text(f"  ckpt {name}: {fmt_bytes(b)}"))
    present = c.get("disk_present") or {}
    for name, b in c["disk_breakdown"].items():
        here = f"; {fmt_bytes(present[name])} already on this machine, not counted" if name in present else ""
        con.print(Text(f"  disk {name}: {fmt_bytes(b)}{_disk_source(c, name)}{here}"))
    td = c["time_detail"]
    con.print(Text(f"  time {td['steps']} steps x {c['time_seconds'] / max(1, td['steps']):.2f} s per step; "
                   f"{td['flops_per_step'] / 1e12:.1f} TFLOP per step at {td['utilisation_prior']:.0%} of "
                   f"{td['peak_tflops']:.0f} TFLOPS" + (f"; collectives over {td['link']}" if td.get("link") else "")))
    sources = td.get("term_sources") or {}
    for name, sec in (td.get("terms_s_per_step") or {}).items():
        con.print(Text(f"  time {name}: {sec:.3f} s per step = {sources.get(name, '')}"))
    pg = data["param_groups"]
    con.print(Text("  params " + ", ".join(f"{k} {v:,}" for k, v in pg.items())))
    m = data["model"]
    if m.get("image_tokens"):
        size = m.get("image_size")
        con.print(Text(f"  image tokens per image{f' at {size[0]}x{size[1]} (height x width)' if size else ''}: "
                       f"{m['image_tokens']} in the LLM's sequence, {m.get('tower_tokens_per_image')} through the "
                       "vision tower (the projector family's counts; docs/estimate.md#model-families)"))


def render_infer(con, data: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    m, hw, pick = data["model"], data["hardware"], data["pick"]
    cands = data["candidates"]
    lines = [
        f"inference {m['name']}{_family(m)}: {m['params'] / 1e9:.2f} B params, stored {m['stored_dtype']}; context "
        f"{data['context']} tokens x batch {data['batch']}; weights in {', '.join(data['dtypes'])}"
        + (f" (--quant {data['quant']})" if data.get("quant") else ""),
        f"hardware  {hw['nodes']} node(s) x {hw['gpus_per_node']} x {hw['gpu_name']} "
        f"({hw['memory_bytes'] / GiB:.1f} GiB each; {data['gpus_source']}); headroom {data['headroom']:.0%}",
    ]
    kbit = [d for d in data["dtypes"] if d in ("int8", "nf4")]
    if kbit:
        lines.append(f"compute   KV cache and activations in {data['compute_dtype']} beside {'/'.join(kbit)} weights, "
                     "in the weights' own dtype otherwise")
    lines += [f"note      {a}" for a in data.get("assumptions", [])]
    if pick is not None:
        c = cands[pick]
        gpus = f"{c['gpus']} GPU" + ("s" if c["gpus"] > 1 else "")
        lines.append(f"pick      #{pick}: {c['dtype']} weights on {gpus}. Why: {data['pick_reason']}")
    for line in lines:
        con.print(Text(line))
    t = Table(title="device_map='auto' split per weight dtype (VRAM as nvidia-smi shows it; per GPU = the fullest; "
                    "GiB = 2^30 bytes)", title_justify="left")
    for col in ("#", "weights", "GPUs", "weights/GPU GiB", "KV cache/GPU GiB", "VRAM/GPU GiB", "VRAM total GiB",
                "decode tok/s", "verdict"):
        t.add_column(col, justify="left" if col in ("weights", "verdict") else "right")
    for i, c in enumerate(cands):
        verdict = "PICK" if i == pick else ("fits" if c["fits"] else "no: " + _short(c, data))
        t.add_row(f"*{i}" if i == pick else str(i), c["dtype"], str(c["gpus"]), _g(c["vram_breakdown"]["weights"]),
                  _g(c["vram_breakdown"]["kv_cache"]), _g(c["vram_per_gpu_bytes"]), _g(c["vram_total_bytes"]),
                  f"{c['time_detail']['decode_tokens_per_s']:.0f}", Text(verdict),
                  style="bold green" if i == pick else ("" if c["fits"] else "dim"))
    con.print(t)
    con.print(Text("decode tok/s: weights / HBM bandwidth + attention over the context + per-layer host ops "
                   "(bitsandbytes int8/nf4 add ops per Linear, so they decode slower than 16-bit); "
                   "docs/estimate.md#inference."))
    if pick is not None and cands[pick]["time_detail"].get("band"):
        b = cands[pick]["time_detail"]["band"]
        con.print(Text(f"Time (prefill + {256} tokens): {fmt_seconds(cands[pick]['time_seconds'])}, likely "
                       f"{fmt_seconds(b['low_s'])}-{fmt_seconds(b['high_s'])} ({b['source']})."))
    if pick is None:
        con.print(Text(f"N{data['pick_reason'][1:]}. Try more GPUs, a smaller --context or --batch.",
                       style="bold red"))
