"""Units and how vramplan prints them: bytes, durations, timestamps.

vramplan computes in bytes and prints GiB (2**30) or GB (10**9), never a bare "G". Every size,
duration and UTC timestamp it prints goes through the formatters here.
"""

from __future__ import annotations

import datetime as _dt
import re

from vramplan.contract import fmt_bytes as fmt_bytes  # one formatter, shared with the trainer
from vramplan.errors import UsageError

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40
KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12

def gib(n: float) -> str:
    """Format bytes as GiB with two decimals: '13.27 GiB'."""
    return f"{n / GiB:.2f} GiB"


def fmt_seconds(s: float | None) -> str:
    """A duration to the nearest sensible unit: '45 s', '12.5 min', '1.5 h', '3.2 d' (estimates)."""
    if s is None:
        return "n/a"
    s = float(s)
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def fmt_span(low: float, high: float) -> str:
    """A range of durations, the unit said once when both ends share it: '4.4-8.1 d', '43.7 h-3.3 d'."""
    lo, hi = fmt_seconds(low), fmt_seconds(high)
    lo_num, _, lo_unit = lo.partition(" ")
    return f"{lo_num}-{hi}" if lo_unit == hi.partition(" ")[2] else f"{lo}-{hi}"


def fmt_clock(s: float | None) -> str:
    """A duration as a clock: '0:12', '4:05', '1:30:00' (progress, ETA); None (unknown yet) is 'n/a'."""
    if s is None:
        return "n/a"
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def utc_stamp(t: float | None = None) -> str:
    """A UTC timestamp as written into run files: '2026-01-31T12:00:00Z'; `t` (epoch seconds) or now."""
    when = _dt.datetime.now(_dt.timezone.utc) if t is None else _dt.datetime.fromtimestamp(t, _dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNIT = {"b": 1, "kb": KB, "mb": MB, "gb": GB, "tb": TB, "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}


def parse_size(text: str, flag: str) -> int:
    """Parse '64GiB', '500GB', '1.5TiB' into bytes. A bare 'G'/'T' is rejected as ambiguous."""
    m = _SIZE_RE.match(str(text))
    if not m or not m.group(2):
        raise UsageError(f"{flag}: cannot read size {text!r}",
                         hint=f"give a number with a unit, e.g. {flag} 64GiB or {flag} 500GB")
    unit = m.group(2).lower()
    if unit in ("k", "m", "g", "t", "ki", "mi", "gi", "ti"):
        raise UsageError(f"{flag}: {text!r} is ambiguous (GB = 10^9 bytes, GiB = 2^30 bytes)",
                         hint=f"write {m.group(1)}GiB or {m.group(1)}GB")
    if unit not in _UNIT:
        raise UsageError(f"{flag}: unknown unit in {text!r}", hint="use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    return int(float(m.group(1)) * _UNIT[unit])
