"""Runs in a subprocess (`python -c <this file's text> PART [ARG]`), never imported by vramplan.

Heavy imports (torch, torchvision, transformers, bitsandbytes, deepspeed) can crash or pollute a
process, so preflight does them here. After each step the probe prints one line
`@@vramplan-probe@@ {"key": ..., "value": ...}` to stdout (flushed), so the steps that finished
before a hard crash (e.g. MKL aborting the process) still reach the parent. Errors are reported as
"Type: message" with the chain of causes, never raised.
"""

import glob
import importlib.util
import json
import os
import sys
import time

MARK = "@@vramplan-probe@@"


def emit(key, value):
    sys.stdout.write("\n" + MARK + " " + json.dumps({"key": key, "value": value}, default=str) + "\n")
    sys.stdout.flush()


def err_text(e):
    """'Type: message' plus the chain of causes (transformers hides the real error in __cause__)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        parts.append(f"{type(e).__name__}: {msg}" if msg else type(e).__name__)
        e = e.__cause__ or e.__context__
    return " <- caused by: ".join(parts)


def loaded_libs():
    """Shared libraries of interest mapped into this process (Linux /proc/self/maps)."""
    names = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip().split(" ")[-1]
                base = os.path.basename(path)
                if any(k in base for k in ("libgomp", "libiomp", "libomp", "libmkl", "libopenblas", "libtbb")):
                    names.add(base)
    except OSError:
        return None
    return sorted(names)


def step(key, fn):
    t = time.time()
    try:
        value = fn()
        value = dict(value) if isinstance(value, dict) else {"value": value}
        value["ok"] = True
    except BaseException as e:  # noqa: BLE001 - report, never raise (SystemExit too)
        value = {"ok": False, "error": err_text(e)}
    value["seconds"] = round(time.time() - t, 3)
    emit(key, value)
    return value


def probe_torch():
    import torch

    cfg = ""
    try:
        cfg = torch.__config__.show()
    except Exception:  # noqa: BLE001
        pass
    blas = next((ln.split("BLAS_INFO=")[1].split(",")[0] for ln in cfg.split(",") if "BLAS_INFO=" in ln), None)
    d = {"version": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
         "mkl": bool(torch.backends.mkl.is_available()), "blas": blas,
         "openmp": bool(torch.backends.openmp.is_available()),
         "cuda_available": False, "cuda_devices": 0, "bf16_supported": None}
    try:
        d["cuda_available"] = bool(torch.cuda.is_available())
        d["cuda_devices"] = torch.cuda.device_count() if d["cuda_available"] else 0
        if d["cuda_available"]:
            d["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    except Exception as e:  # noqa: BLE001
        d["cuda_error"] = err_text(e)
    try:
        from importlib.metadata import version

        d["dist_version"] = version("torch")
    except Exception:  # noqa: BLE001
        pass
    return d


def probe_torch_npu():
    if importlib.util.find_spec("torch_npu") is None:
        return {"installed": False}
    import torch
    import torch_npu

    d = {"installed": True, "version": getattr(torch_npu, "__version__", None),
         "available": bool(torch.npu.is_available())}
    d["devices"] = torch.npu.device_count() if d["available"] else 0
    import torch.distributed as dist

    d["hccl"] = bool(dist.is_available() and dist.is_backend_available("hccl"))
    return d


def probe_torchvision():
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return {"installed": False}
    d = {"installed": True, "location": os.path.dirname(spec.origin or "") or None}
    try:
        from importlib.metadata import distribution

        dist = distribution("torchvision")
        d["dist_version"] = dist.version
        d["requires_torch"] = [r for r in (dist.requires or []) if r.replace(" ", "").startswith("torch") and
                               not r.replace(" ", "").startswith("torchvision")]
    except Exception:  # noqa: BLE001
        pass
    try:  # the build's version text without importing it (e.g. '0.28.0+cu130')
        with open(os.path.join(d["location"], "version.py")) as f:
            for line in f:
                if line.startswith("__version__"):
                    d["build_version"] = line.split("=", 1)[1].strip().strip("'\"")
    except (OSError, TypeError):
        pass
    libs = glob.glob(os.path.join(os.path.dirname(d["location"] or "."), "torchvision.libs", "libcudart*"))
    d["bundles_cudart"] = bool(libs)
    try:
        import torchvision

        d["import_ok"] = True
        d["version"] = torchvision.__version__
    except BaseException as e:  # noqa: BLE001
        d["import_ok"] = False
        d["import_error"] = err_text(e)
        return d
    try:
        import torch

        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50.0, 50.0, 60.0, 60.0]])
        scores = torch.tensor([0.9, 0.8, 0.7])
        keep = torch.ops.torchvision.nms(boxes, scores, 0.5)
        d["nms_ok"] = keep.tolist() == [0, 2]
        d["nms_result"] = keep.tolist()
    except BaseException as e:  # noqa: BLE001
        d["nms_ok"] = False
        d["nms_error"] = err_text(e)
    return d


def probe_numpy():
    already = "numpy" in sys.modules
    import numpy

    d = {"version": numpy.__version__, "imported_by_torch": already, "blas": None}
    try:
        cfg = numpy.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        d["blas"] = blas.get("name")
        d["blas_version"] = blas.get("version")
    except Exception:  # noqa: BLE001 - old numpy: no dict mode
        pass
    d["mkl_service"] = importlib.util.find_spec("mkl") is not None
    if d["mkl_service"]:
        try:
            import mkl

            d["mkl_service_version"] = getattr(mkl, "__version__", None)
            if hasattr(mkl, "get_version_string"):
                d["mkl_version"] = str(mkl.get_version_string())
        except BaseException as e:  # noqa: BLE001
            d["mkl_service_error"] = err_text(e)
    return d


def probe_transformers():
    if importlib.util.find_spec("transformers") is None:
        return {"installed": False}
    import transformers

    d = {"installed": True, "version": transformers.__version__}
    from transformers import LlavaForConditionalGeneration  # noqa: F401  (what the trainer imports)

    return d


def probe_bitsandbytes(device):
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"installed": False}
    import bitsandbytes as bnb
    import torch

    d = {"installed": True, "version": bnb.__version__, "device": device}
    if device == "npu":
        import torch_npu  # noqa: F401
    if device in ("cuda", "npu") and not getattr(torch, device).is_available():
        d["device_unavailable"] = f"torch.{device}.is_available() is False"
        return d
    lin = torch.nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to(device)
    x = torch.randn(2, 64, device=device)
    y = q(x)
    err = (y.float().cpu() - lin(x.cpu()).float()).abs().max().item()
    d.update(nf4_forward=True, quantized=bool(getattr(q.weight, "bnb_quantized", False)), max_abs_error=err)
    return d


def probe_deepspeed():
    if importlib.util.find_spec("deepspeed") is None:
        return {"installed": False}
    import deepspeed

    d = {"installed": True, "version": deepspeed.__version__}
    try:
        from deepspeed.accelerator import get_accelerator

        d["accelerator"] = get_accelerator().device_name()
    except Exception as e:  # noqa: BLE001
        d["accelerator_error"] = err_text(e)
    from deepspeed.git_version_info import installed_ops, torch_info

    d["installed_ops"] = {k: bool(v) for k, v in installed_ops.items()}
    d["torch_info"] = dict(torch_info)
    from deepspeed.ops.op_builder import CPUAdamBuilder

    b = CPUAdamBuilder()
    d["cpu_adam_prebuilt"] = bool(installed_ops.get("cpu_adam"))
    try:
        d["cpu_adam_compatible"] = bool(b.is_compatible(verbose=False))
    except Exception as e:  # noqa: BLE001
        d["cpu_adam_compatible"] = False
        d["cpu_adam_error"] = err_text(e)
    # a JIT build from an earlier run, in torch's extensions cache
    ext = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    built = glob.glob(os.path.join(ext, "**", "cpu_adam*.so"), recursive=True)
    d["cpu_adam_jit_cached"] = built[:1]
    d["extensions_dir"] = ext
    # a JIT build killed mid-way (Ctrl-C, OOM killer, scancel) leaves torch's FileBaton `lock` in the op's build
    # dir; every later build of that op waits for it to vanish, forever (torch/utils/cpp_extension.py
    # _jit_compile, file_baton.py; pytorch/pytorch#189245). Seconds since each was written.
    try:
        import inspect

        from torch.utils import cpp_extension

        d["baton_locks"] = "FileBaton" in inspect.getsource(cpp_extension._jit_compile)
    except Exception:  # noqa: BLE001 - source unavailable: assume the baton, as every torch to 2.13 has it
        d["baton_locks"] = True
    now = time.time()
    locks = glob.glob(os.path.join(ext, "*", "lock")) + glob.glob(os.path.join(ext, "*", "*", "lock"))
    d["build_locks"] = [[p, round(now - os.path.getmtime(p))] for p in sorted(locks) if os.path.isfile(p)][:5]
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        d["ninja"] = True
    except Exception as e:  # noqa: BLE001
        d["ninja"] = False
        d["ninja_error"] = err_text(e)
    import shutil
    import sysconfig

    cxx = os.environ.get("CXX", "c++")
    d["compiler"] = shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")
    inc = sysconfig.get_paths().get("include") or ""
    d["python_headers"] = os.path.isfile(os.path.join(inc, "Python.h"))
    d["python_include"] = inc
    return d


def main(argv):
    part = argv[0] if argv else ""
    if part == "torch":
        torch_ok = step("torch", probe_torch)["ok"]
        step("torchvision", probe_torchvision)
        step("numpy", probe_numpy)
        step("libs", lambda: {"loaded": loaded_libs()})
        if torch_ok:
            step("torch_npu", probe_torch_npu)
        step("transformers", probe_transformers)
    elif part == "accel":
        device = argv[1] if len(argv) > 1 else "cpu"
        step("bitsandbytes", lambda: probe_bitsandbytes(device))
        step("deepspeed", probe_deepspeed)
    else:
        emit("error", {"ok": False, "error": f"unknown probe part {part!r}"})
    emit("done", {"ok": True})


main(sys.argv[1:])
