"""MKL / OpenMP threading layers.

conda's MKL numpy (with mkl-service) aborts a process that loaded GNU OpenMP (libgomp, which torch
brings) first: `Error: mkl-service + Intel(R) MKL: MKL_THREADING_LAYER=INTEL is incompatible with
libgomp.so.1 library. Try to import numpy first or set the threading layer accordingly. Set
MKL_SERVICE_FORCE_INTEL to force it.` Fix from InternLM/xtuner#350 and the InternLM tutorials:
`export MKL_SERVICE_FORCE_INTEL=1` and `export MKL_THREADING_LAYER=GNU` (also IntelPython/mkl-service#14,
pytorch/pytorch#37377).
`vramplan run` exports both for the trainer (vramplan/run/launch.py); other launches need them.
"""

from __future__ import annotations

from collections.abc import Mapping

from vramplan.preflight.base import CheckResult, Context

NAME = "mkl-openmp"
FIX = "export MKL_SERVICE_FORCE_INTEL=1 MKL_THREADING_LAYER=GNU"
CRASH_SIGNATURE = "is incompatible with libgomp"
VALID_LAYERS = {"INTEL", "GNU", "SEQUENTIAL", "TBB"}


def assess_mkl(facts: dict, env: Mapping[str, str], crash_text: str = "") -> CheckResult:
    """Decide from what the probe saw (facts) and the environment. Pure: tests feed combinations.

    facts keys: torch_blas ("mkl"/...), torch_mkl (bool), numpy_blas (e.g. "mkl-rt", "scipy-openblas"),
    mkl_service (bool: the `mkl` module of mkl-service is importable), libs (loaded .so names or None).
    """
    layer = (env.get("MKL_THREADING_LAYER") or "").strip()
    force = (env.get("MKL_SERVICE_FORCE_INTEL") or "").strip() not in ("", "0")
    libs = facts.get("libs") or []
    gomp = any("libgomp" in x for x in libs)
    iomp = any("libiomp" in x for x in libs)
    numpy_mkl = "mkl" in str(facts.get("numpy_blas") or "").lower()
    torch_mkl = bool(facts.get("torch_mkl")) or str(facts.get("torch_blas") or "").lower() == "mkl"
    found = (
        f"torch BLAS {facts.get('torch_blas') or '?'}{' (MKL)' if torch_mkl else ''}, "
        f"numpy BLAS {facts.get('numpy_blas') or '?'}, "
        f"mkl-service {'present' if facts.get('mkl_service') else 'absent'}, "
        f"OpenMP {'libgomp' if gomp else ''}{' + ' if gomp and iomp else ''}{'libiomp5' if iomp else ''}"
        f"{'none seen' if not (gomp or iomp) else ''}; MKL_THREADING_LAYER={layer or 'unset'}, "
        f"MKL_SERVICE_FORCE_INTEL={env.get('MKL_SERVICE_FORCE_INTEL') or 'unset'}"
    )
    out = dict(facts, MKL_THREADING_LAYER=layer or None, MKL_SERVICE_FORCE_INTEL=env.get("MKL_SERVICE_FORCE_INTEL"))
    if crash_text:
        return CheckResult(NAME, "FAIL", f"a new process that imports torch then numpy aborts: {crash_text.strip()}",
                           FIX + "   # or reinstall numpy from pip (no mkl-service)", out)
    if layer and layer.upper() not in VALID_LAYERS:
        return CheckResult(NAME, "WARN", f"MKL_THREADING_LAYER={layer} is not one of "
                                         f"{', '.join(sorted(VALID_LAYERS))} (MKL ignores it); {found}", FIX, out)
    if facts.get("mkl_service") and gomp and not force and layer.upper() != "GNU":
        return CheckResult(NAME, "WARN", f"mkl-service with libgomp loaded and no threading layer chosen: processes "
                                         f"that import numpy after torch can abort with 'MKL_THREADING_LAYER=INTEL is "
                                         f"incompatible with libgomp.so.1' (vramplan run sets the fix for the "
                                         f"trainer); {found}", FIX, out)
    if layer.upper() == "INTEL" and gomp and (torch_mkl or numpy_mkl):
        return CheckResult(NAME, "WARN", f"MKL_THREADING_LAYER=INTEL makes MKL load Intel OpenMP next to torch's "
                                         f"libgomp (two OpenMP runtimes: oversubscription or an abort); {found}",
                           FIX, out)
    if not (torch_mkl or numpy_mkl or facts.get("mkl_service")):
        return CheckResult(NAME, "PASS", f"no MKL in use, nothing to configure; {found}", "", out)
    return CheckResult(NAME, "PASS", f"no MKL/OpenMP conflict; {found}", "", out)


def check_mkl(ctx: Context) -> CheckResult:
    res = ctx.probes.get("torch")
    if res is None:
        return CheckResult(NAME, "SKIP", "the torch probe did not run")
    crash = ""
    for text in (res.stderr, res.stdout, *(str(v.get("error", "")) for v in res.steps.values())):
        if CRASH_SIGNATURE in (text or ""):
            crash = next(ln for ln in text.splitlines() if CRASH_SIGNATURE in ln)
            break
    torch_st = res.step("torch") or {}
    np_st = res.step("numpy") or {}
    if not crash and not torch_st.get("ok"):
        return CheckResult(NAME, "SKIP", f"torch does not import ({torch_st.get('error') or res.died()}); "
                                         f"see 'torchvision'")
    facts = {"torch_blas": torch_st.get("blas"), "torch_mkl": torch_st.get("mkl"),
             "numpy_blas": np_st.get("blas"), "numpy_version": np_st.get("version"),
             "mkl_service": np_st.get("mkl_service"), "libs": (res.step("libs") or {}).get("loaded")}
    if np_st.get("mkl_service_error"):
        crash = crash or np_st["mkl_service_error"]
    return assess_mkl(facts, ctx.env, crash)
