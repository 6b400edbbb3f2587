"""What it takes to run the trainer's real model code under FakeTensorMode (cpu fake tensors).

Each workaround is checked by tests/trace/test_fake_vs_real.py, which traces a reduced-size model both
fake and for real on CPU and requires byte-identical peaks in every phase (the versions are pinned in
constraints.txt; these touch library internals).
  * peft moves adapters with `.to()` (tuners_utils.py `_move_adapter_to_device_of_base_layer`,
    `_replace_module`), and nn.Module._apply swaps fake parameters with torch.utils.swap_tensors, which
    refuses tensors that have weakrefs. FakeTensorMode's converter memo (fake_tensor.py
    FakeTensorConverter.tensor_memo, a WeakValueDictionary) holds one: drop the two tensors' entries first.
  * bitsandbytes' Params4bit cannot wrap a FakeTensor: the packed weight is a plain uint8 Parameter of the
    same n/2 bytes carrying the quant state (a 16-bit stand-in would be upcast by peft's
    prepare_model_for_kbit_training, which skips only `Params4bit`).
    nn.Module._apply re-wraps parameters and drops those attributes: Linear4bit.forward's
    fix_4bit_weight_quant_state_from_module is made to restore the module's quant_state onto it.
  * bitsandbytes' `create_dynamic_map()` calls `.tolist()`: it is built (and cached in
    functional.name2qmap) outside the fake mode.
  * transformers' `is_tracing()` is True for fake tensors (utils/import_utils.py), which picks the
    export-safe branches: `find_packed_sequence_indices` returns a mask instead of None for one unpacked
    sequence per row (masking_utils.py), so it is made to return None; an all-ones attention mask is
    materialized instead of dropped, so the fake run passes none (the same SDPA is_causal path);
    TRANSFORMERS_DISABLE_TORCH_CHECK=1 skips LLaVA's image-token count check.
  * dropout (peft lora_dropout) takes CUDA's fused native_dropout path (a 1-byte mask), not CPU's
    2-byte noise tensor (`cuda_dropout`), in the fake and the real run alike.
  * masked_select (LLaVA's masked_scatter backward) has a data-dependent size: the known count is given.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager

import torch


@contextmanager
def cuda_dropout():
    """Dropout as it runs on CUDA: aten/src/ATen/native/Dropout.cpp `dropout` takes the fused
    `native_dropout` kernel on CUDA (is_fused_kernel_acceptable), which saves a 1-byte bool mask; on CPU it
    decomposes into a compute-dtype noise tensor (2 B per element for bf16) that `mul` saves."""
    import torch.nn.functional as F

    orig = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace and input.numel():
            return torch.native_dropout(input, p, True)[0]
        return orig(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = orig


@contextmanager
def patched(fake_mode) -> object:
    """The process-wide patches, undone on exit."""
    import transformers.masking_utils as mu

    stack = ExitStack()
    orig_swap = torch.utils.swap_tensors

    def swap(t1, t2):
        if fake_mode is not None:
            memo = fake_mode.fake_tensor_converter.tensor_memo
            for k in [k for k, v in list(memo.items()) if v is t1 or v is t2]:
                del memo[k]
        return orig_swap(t1, t2)

    import bitsandbytes.nn.modules as bm

    orig_fix = bm.fix_4bit_weight_quant_state_from_module

    def fix(module):  # a module re-wrap (nn.Module._apply) drops the stand-in's attributes: put them back
        if getattr(module.weight, "quant_state", None) is None and not isinstance(module.weight, bm.Params4bit):
            module.weight.quant_state = module.quant_state
            return None
        return orig_fix(module)

    orig_find = mu.find_packed_sequence_indices
    bm.fix_4bit_weight_quant_state_from_module = fix
    old_env = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    torch.utils.swap_tensors = swap
    if fake_mode is not None:
        mu.find_packed_sequence_indices = lambda position_ids: None
        os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    stack.enter_context(cuda_dropout())  # both fake and real runs: the CUDA kernel's allocations
    try:
        with stack:
            yield
    finally:
        torch.utils.swap_tensors = orig_swap
        bm.fix_4bit_weight_quant_state_from_module = orig_fix
        mu.find_packed_sequence_indices = orig_find
        if old_env is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = old_env


def warm_bnb_tables() -> None:
    """Build bitsandbytes' dynamic map outside the fake mode (it calls .tolist())."""
    import bitsandbytes.functional as F

    if "dynamic" not in F.name2qmap:
        F.name2qmap["dynamic"] = F.create_dynamic_map()


def quantize_linears(model, skip: tuple[str, ...], double_quant: bool, compute_dtype, fake: bool) -> int:
    """Replace every nn.Linear outside `skip` (and lm_head) by bitsandbytes Linear4bit holding NF4 weights,
    as transformers' bitsandbytes quantizer does (integrations/bitsandbytes.py replace_with_bnb_linear).
    Returns the number of layers replaced."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch.nn as nn
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and not any(n == s or n.startswith(s + ".") for s in skip) and not n.endswith("lm_head")]
    for name, lin in todo:
        with unset_fake_temporarily():  # the module shell on meta; its weight is set below
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                                  quant_storage=torch.uint8, device="meta")
        packed, state = F.quantize_4bit(lin.weight.data, blocksize=64, compress_statistics=double_quant,
                                        quant_type="nf4", quant_storage=torch.uint8)
        if fake:
            w = nn.Parameter(packed, requires_grad=False)
            w.quant_state, w.quant_type, w.bnb_quantized = state, "nf4", True
            w.blocksize, w.compress_statistics, w.quant_storage = 64, double_quant, torch.uint8
        else:
            w = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=64,
                                  compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8,
                                  bnb_quantized=True)
        q.weight = w
        q.quant_state = state
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return len(todo)


def adopt_fake_tensors(model, fake_mode) -> None:
    """peft's modules_to_save deep-copies the projector, FakeTensor.fake_mode included: point the copies
    back at the one mode."""
    from torch._subclasses.fake_tensor import FakeTensor

    for t in list(model.parameters()) + list(model.buffers()):
        if isinstance(t, FakeTensor) and t.fake_mode is not fake_mode:
            t.fake_mode = fake_mode


def masked_select_known(count: int):
    """aten.masked_select with a known number of selected elements (fake mode only)."""

    def run(tracker, args, kwargs):
        return args[0].new_empty((count,))

    return run
