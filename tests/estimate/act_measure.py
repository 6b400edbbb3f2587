"""Measure bytes saved for backward with torch.autograd.graph.saved_tensors_hooks.

Used by the activation truth tests and by benchmarks/measure_activations.py. Counts each
saved storage once (dedup by data_ptr) and skips parameter storages (weights saved by
matmuls are not activations).
"""

from __future__ import annotations

import torch


def saved_bytes(fn, params) -> int:
    """Run fn() (forward) and return unique saved-for-backward bytes, parameters excluded."""
    param_ptrs = set()
    for p in params:
        try:
            param_ptrs.add(p.untyped_storage().data_ptr())
        except Exception:
            pass
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in param_ptrs and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
