"""`--gpus` grammar, and the local GPUs/NPUs (read by vramplan/inputs/devices.py) as a selection.

Grammar (case-insensitive, spaces ignored):  [NODES x] [GPUS x] CARD
  CARD = a size: `24G`, `24GB`, `80GiB` (the memory marketed on the box), or
         a card: profile id (`a100-80gb`), alias (`4090`, `RTX4090`, `910B`, `H100`), display name,
         with an optional size suffix (`A100-80G`).
Examples: `1x24G`, `2x80G`, `8x910B`, `2xA100-80G`, `4xH100`, `2x8xA100-80G` (2 nodes x 8 GPUs), `A100-80G`.

A size alone picks a representative card of that size: among the NVIDIA cards of that marketed size
(any vendor if there is none), the one that reports the LEAST memory, ties broken by the lower bf16
TFLOPS. `--gpus 24G` asks "does it fit on a 24 GB card?", and fit is decided by memory: planning with
the smallest reported total makes the answer hold for every card of that size. Time figures then come
from that card; the selection's `note` names it and says how to plan for a specific card.
(24G -> A10 at 23028 MiB; 48G -> L40S; 80G -> H100 80GB at 81559 MiB; 40G -> A100-40GB; 16G -> T4.)
An alias shared by several profiles (`A100`: 40 GB and 80 GB) is ambiguous and is an error listing both.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace

from vramplan.errors import UsageError
from vramplan.estimate.specs import HardwareSpec
from vramplan.inputs import devices

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)(?:g|gb|gib)$")
_COUNTS = re.compile(r"^(?:(\d+)x)?(?:(\d+)x)?(.+)$")
_STRIP_PREFIXES = ("nvidia", "geforce", "tesla", "huawei", "ascend")


@dataclass(frozen=True)
class GpuSelection:
    nodes: int
    gpus_per_node: int
    hardware: HardwareSpec
    by_size_only: bool = False  # the text gave a size; a representative card was chosen
    note: str = ""  # what was assumed (the representative card, or detection details)
    text: str = ""  # what the user wrote (or "detected")
    detected: dict = field(default_factory=dict)  # detection facts (names, measured memory), when detected

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


def normalize(name: str) -> str:
    """Lowercase alphanumerics only, vendor prefixes dropped, 'gb'/'gib' -> 'g': 'NVIDIA A100-80GB' -> 'a10080g'."""
    s = re.sub(r"[^a-z0-9]", "", name.lower())
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if s.startswith(p) and len(s) > len(p):
                s, changed = s[len(p):], True
    return re.sub(r"(\d)(gib|gb)", r"\1g", s)


def _name_table() -> tuple[dict[str, set[str]], dict[str, dict]]:
    """normalized name -> profile ids; and id -> raw profile."""
    from vramplan.inputs.profiles import hardware_raw

    raw = hardware_raw()
    table: dict[str, set[str]] = {}
    for hid, d in raw.items():
        for n in [hid, d["display_name"], *d.get("aliases", [])]:
            table.setdefault(normalize(n), set()).add(hid)
    return table, raw


def representative(size_gb: int) -> tuple[HardwareSpec, list[HardwareSpec]]:
    """The representative card of a marketed size (see module doc) and all cards of that size."""
    from vramplan.inputs.profiles import all_hardware

    cards = [h for h in all_hardware() if h.marketed_memory_gb == size_gb]
    if not cards:
        return None, []  # type: ignore[return-value]
    pool = [h for h in cards if h.vendor == "nvidia"] or cards
    return min(pool, key=lambda h: (h.memory_gib, h.bf16_tflops, h.name)), cards


def _count(v: str | None, what: str, text: str) -> int:
    n = int(v) if v else 1
    if n < 1 or n > 100000:
        raise UsageError(f"--gpus {text!r}: {what} must be 1..100000, got {n}", "e.g. --gpus 2x8xA100-80G")
    return n


def parse_gpus(text: str) -> GpuSelection:
    """Parse a `--gpus` value (grammar in the module doc). Unknown cards raise UsageError with close matches."""
    from vramplan.inputs.profiles import load_hardware

    raw_text = text
    s = re.sub(r"\s+", "", text or "").replace("*", "x").replace("\u00d7", "x")  # U+00D7 MULTIPLICATION SIGN
    m = _COUNTS.match(s.lower())
    if not s or not m:
        raise UsageError("--gpus is empty", "e.g. --gpus 1x24G, 2xA100-80G, 8x910B or 2x8xH100")
    a, b, card = m.groups()
    shown = s[len(s) - len(card):]  # the card as the user spelled it
    if b is not None:
        nodes, per_node = _count(a, "nodes", raw_text), _count(b, "GPUs per node", raw_text)
    else:
        nodes, per_node = 1, _count(a, "GPUs", raw_text)
    sm = _SIZE.match(card)
    if sm:
        size = float(sm.group(1))
        hw, cards = representative(int(size)) if size.is_integer() else (None, [])
        if hw is None:
            from vramplan.inputs.profiles import all_hardware

            sizes = sorted({h.marketed_memory_gb for h in all_hardware()})
            raise UsageError(f"--gpus {raw_text!r}: no {sm.group(1)} GB card in the hardware profiles",
                             f"known sizes (GB): {', '.join(map(str, sizes))}; or name the card, e.g. 1xRTX4090; "
                             "`vramplan profiles` lists them")
        others = ", ".join(h.name for h in cards if h.name != hw.name)
        note = (f"--gpus {raw_text}: planned for {hw.display_name} ({hw.memory_gib:.2f} GiB reported, "
                f"{hw.bf16_tflops or hw.fp16_tflops:g} {'bf16' if hw.bf16_supported else 'fp16'} TFLOPS), "
                f"the {int(size)} GB card with the least usable memory"
                + (f"; name yours for its exact figures ({others})" if others else ""))
        return GpuSelection(nodes, per_node, hw, True, note, raw_text)
    table, raw = _name_table()
    key = normalize(card)
    ids = table.get(key, set())
    if not ids:
        # a bare size suffix after a known name, e.g. "h100-80g" when only "h100" is an alias
        for k, v in table.items():
            if key.startswith(k) and _SIZE.match(key[len(k):] or "-"):
                want = int(float(_SIZE.match(key[len(k):]).group(1)))
                ids = {i for i in v if raw[i]["marketed_memory_gb"] == want}
                if ids:
                    break
    if len(ids) > 1:
        names = sorted(ids)
        raise UsageError(f"--gpus {raw_text!r}: {shown!r} is ambiguous: {' or '.join(names)}",
                         f"say which, e.g. --gpus {nodes * per_node}x{names[-1]}")
    if not ids:
        close = difflib.get_close_matches(key, list(table), n=6, cutoff=0.5)
        close_ids = sorted({i for k in close for i in table[k]})
        raise UsageError(f"--gpus {raw_text!r}: unknown GPU {shown!r}",
                         (f"did you mean {', '.join(close_ids)}? " if close_ids else "")
                         + "a size also works (e.g. 1x24G); `vramplan profiles` lists the hardware")
    return GpuSelection(nodes, per_node, load_hardware(ids.pop()), False, "", raw_text)


# ---------------------------------------------------------------------------------------------
# detection (never raises)


def match_detected(name: str, memory_bytes: int, vendor: str) -> HardwareSpec:
    """The profile whose detect_names occur in `name` and whose memory is closest to the measured
    total; otherwise an ad-hoc spec with the measured memory and unknown (zero) compute figures."""
    from vramplan.inputs.profiles import hardware_raw, load_hardware

    gib = memory_bytes / 2**30
    best = None
    for hid, d in hardware_raw().items():
        if d["vendor"] != vendor:
            continue
        if any(normalize(n) in normalize(name) for n in d.get("detect_names", [])):
            diff = abs(d["memory_gib"] - gib) / max(gib, 1e-9)
            if diff < 0.08 and (best is None or diff < best[0]):
                best = (diff, hid)
    if best:
        hw = load_hardware(best[1])
        return replace(hw, memory_gib=gib) if gib else hw
    return HardwareSpec(name="detected", source="measured on this host", vendor=vendor, display_name=name,
                        memory_gib=gib, marketed_memory_gb=max(1, round(memory_bytes / 1e9)), bf16_tflops=0.0,
                        fp16_tflops=0.0, bf16_supported=False, hbm_bandwidth_gbps=0.0, host_link_gbps=0.0,
                        interconnect="unknown", interconnect_gbps=0.0, bnb_4bit_supported=vendor == "nvidia")


def _nvidia() -> list[tuple[str, int]]:
    """(name, total memory bytes) of the NVIDIA GPUs NVML read (those read before an NVML error included)."""
    return [(g.name, g.total) for g in devices.nvml_snapshot().gpus]


def _ascend() -> list[tuple[str, int]]:
    """(name, HBM total bytes) of the 910-family training NPUs npu-smi reports (its MB are MiB)."""
    return [(c.name, c.hbm_total_mb * 2**20) for c in devices.read_npu_smi() if "910" in c.name]


def detect_local_gpus() -> GpuSelection | None:
    """GPUs (NVML) or NPUs (npu-smi) on this host as a 1-node selection; None when none is found.
    Never raises: any probe failure counts as 'nothing detected'."""
    try:
        for vendor, read in (("nvidia", _nvidia), ("ascend", _ascend)):
            devs = read()
            if not devs:
                continue
            name = devs[0][0]
            hw = match_detected(name, min(m for _, m in devs), vendor)
            names = sorted({n for n, _ in devs})
            note = f"detected {len(devs)} x {name} ({min(m for _, m in devs) / 2**30:.2f} GiB each) on this host"
            if len(names) > 1:
                note += f"; mixed models ({', '.join(names)}): planned with the smallest memory"
            if hw.name == "detected":
                note += ("; no matching hardware profile, so compute and bandwidth figures are unknown "
                         "(time not estimated)")
            else:
                note += f"; compute figures from profile {hw.name}"
            return GpuSelection(1, len(devs), hw, False, note, "detected",
                                {"vendor": vendor, "devices": [{"name": n, "memory_bytes": m} for n, m in devs]})
    except Exception:  # noqa: BLE001 - detection must not stop `estimate`; --gpus says what to plan for
        return None
    return None
