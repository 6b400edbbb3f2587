"""A storage-lifetime memory tracker for one training step (docs/estimate.md#checked-against-reality).

`MemTracker` is a TorchDispatchMode: every new storage an ATen op returns is counted until the storage
dies (a weakref finalizer on the `UntypedStorage`, so views are not counted twice), rounded up to 512 B
as the CUDA caching allocator's `memory_allocated` does (c10/cuda/CUDACachingAllocator.cpp kMinBlockSize).
Storages carry a label so the peak splits into components: weights (quantized / frozen / trainable),
gradients, optimizer states, activations (saved for backward, via a saved_tensors_hooks pack hook) and
everything else as transients. The peak is kept per phase (forward, loss, loss backward, backward,
all-reduce, optimizer step). The same approach as torch's torch/distributed/_tools/mem_tracker.py, which
cannot be used as is: it registers hooks on frozen parameters (LoRA models) and misses bitsandbytes'
quant-state tensors.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BLOCK = 512  # CUDA caching allocator: every block is a multiple of 512 B
TRANSIENT = "transients"
ACTIVATIONS = "activations"
STATE_LABELS = ("weights_quantized", "weights_frozen", "weights_trainable", "gradients", "optimizer_states")
LABELS = (*STATE_LABELS, "buffers", "inputs", ACTIVATIONS, TRANSIENT)


def rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class MemTracker(TorchDispatchMode):
    """Live bytes by label; the peak (and its split by label) per phase."""

    def __init__(self, overrides: dict | None = None) -> None:
        super().__init__()
        self._live: dict[int, list] = {}  # id(storage) -> [rounded, raw, label]
        self.by_label: dict[str, int] = defaultdict(int)
        self.raw_by_label: dict[str, int] = defaultdict(int)
        self.current = 0
        self.phase = "init"
        self.peaks: dict[str, tuple[int, dict, dict]] = {}  # phase -> (peak, by label, raw by label)
        self.overrides = overrides or {}  # ATen/custom op -> fn(tracker, args, kwargs) (fake-mode stand-ins)

    # --- bookkeeping --------------------------------------------------------------------------------------
    def track(self, t, label: str = TRANSIENT, relabel: bool = False) -> None:
        """Count `t`'s storage (once) under `label`; `relabel` moves an already counted storage."""
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        rec = self._live.get(id(st))
        if rec is None:
            raw = st.nbytes()
            rec = [rounded(raw), raw, label, None]
            key = id(st)
            self._live[key] = rec
            rec[3] = weakref.finalize(st, self._free, key, rec)
            self._add(rec, 1)
        elif relabel and rec[2] != label:
            self._add(rec, -1)
            rec[2] = label
            self._add(rec, 1)

    def close(self) -> None:
        """Stop counting: detach every finalizer (none may fire once the fake mode is gone)."""
        for rec in list(self._live.values()):
            rec[3].detach()
        self._live.clear()

    def label_of(self, t) -> str | None:
        rec = self._live.get(id(t.untyped_storage()))
        return rec[2] if rec else None

    def _free(self, key: int, rec: list) -> None:
        if self._live.get(key) is rec:
            del self._live[key]
            self._add(rec, -1)

    def _add(self, rec: list, sign: int) -> None:
        self.by_label[rec[2]] += sign * rec[0]
        self.raw_by_label[rec[2]] += sign * rec[1]
        self.current += sign * rec[0]
        if sign > 0:
            best = self.peaks.get(self.phase)
            if best is None or self.current > best[0]:
                self.peaks[self.phase] = (self.current, dict(self.by_label), dict(self.raw_by_label))

    def set_phase(self, name: str) -> None:
        self.phase = name
        if name not in self.peaks:
            self.peaks[name] = (self.current, dict(self.by_label), dict(self.raw_by_label))

    # --- dispatch -----------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        fn = self.overrides.get(func)
        out = fn(self, args, kwargs) if fn is not None else func(*args, **kwargs)
        for t in tree_leaves(out):
            self.track(t)
        return out

    @contextmanager
    def saved_as_activations(self):
        """Label every tensor autograd saves for backward (unless it is already a weight or a gradient)."""

        def pack(t):
            if self.label_of(t) in (None, TRANSIENT):
                self.track(t, ACTIVATIONS, relabel=True)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    def report(self) -> dict:
        """{phase: {"peak": bytes, label: bytes, ..., "raw": {label: unrounded bytes}}} and the overall peak."""
        phases = {p: {"peak": v[0], **{k: v[1].get(k, 0) for k in LABELS}, "raw": {k: v[2].get(k, 0) for k in LABELS}}
                  for p, v in self.peaks.items()}
        top = max(phases, key=lambda p: phases[p]["peak"]) if phases else None
        return {"phases": phases, "peak": phases[top]["peak"] if top else 0, "peak_phase": top}
