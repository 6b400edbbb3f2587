"""torch / torchvision pairing and the transformers import the trainer does.

A torchvision whose compiled ops were built for another torch (another version, or a CUDA build
next to a CPU torch) fails at `import torchvision` with `RuntimeError: operator torchvision::nms does
not exist`, and - because transformers' image utilities import it whenever it is installed - every
`from transformers import LlavaForConditionalGeneration` fails too (transformers utils/import_utils.py
`is_torchvision_available` checks only package metadata; pytorch/pytorch#122494, pytorch/vision#8985,
vllm-project/vllm-ascend#479).
"""

from __future__ import annotations

import re

from vramplan.preflight.base import CheckResult, Context

# torch <-> torchvision releases (pytorch/vision README "Installation" table): torch 2.N.p pairs with
# torchvision 0.(N+15).p for N >= 1 (2.1.2 <-> 0.16.2, ..., 2.13.0 <-> 0.28.0); 2.0.p <-> 0.15.(p+1);
# torch 1.N.p <-> 0.(N+1).p (1.13.1 <-> 0.14.1).


def _release(v: str) -> tuple[int, ...]:
    m = re.match(r"^(\d+)\.(\d+)(?:\.(\d+))?", v or "")
    if not m:
        return ()
    return tuple(int(x) for x in m.groups(default="0"))


def torchvision_for_torch(torch_version: str) -> str | None:
    """The torchvision release built for this torch release, e.g. '2.13.0+cpu' -> '0.28.0'."""
    r = _release(torch_version)
    if len(r) < 3:
        return None
    major, minor, patch = r
    if major == 2 and minor == 0:
        return f"0.15.{patch + 1}"
    if major == 2:
        return f"0.{minor + 15}.{patch}"
    if major == 1 and minor >= 7:
        return f"0.{minor + 1}.{patch}"
    return None


def local_tag(version: str | None) -> str:
    """'2.13.0+cpu' -> 'cpu', '0.28.0+cu130' -> 'cu130', '2.5.1' -> ''."""
    return version.split("+", 1)[1] if version and "+" in version else ""


def index_url(torch_version: str) -> str:
    """The package index torch came from, by its local version tag (download.pytorch.org layout)."""
    tag = local_tag(torch_version)
    if tag == "cpu" or re.fullmatch(r"cu\d+|rocm[\d.]+|xpu", tag or ""):
        return f"https://download.pytorch.org/whl/{tag}"
    return ""


def torchvision_fix(torch_version: str) -> str:
    want = torchvision_for_torch(torch_version)
    uninstall = "pip uninstall -y torchvision   # the bundled trainer does not need it"
    if not want:
        return uninstall
    idx = index_url(torch_version)
    install = f"pip install --force-reinstall --no-deps torchvision=={want}" + (f" --index-url {idx}" if idx else "")
    return f"{uninstall}\n# or, to keep it, the build made for torch {torch_version}: {install}"


def _pairing_problem(torch_v: str, tv: dict) -> str:
    """'' when the installed torchvision is the one made for this torch, else what differs."""
    want = torchvision_for_torch(torch_v)
    have = tv.get("build_version") or tv.get("version") or tv.get("dist_version") or ""
    problems = []
    if want and _release(have)[:2] and _release(have)[:2] != _release(want)[:2]:
        problems.append(f"torchvision {have} is not the release for torch {torch_v} (that is {want})")
    pins = [r for r in tv.get("requires_torch") or [] if "==" in r]
    for pin in pins:
        pinned = pin.split("==", 1)[1].strip(" )")
        if _release(pinned) and _release(pinned) != _release(torch_v):
            problems.append(f"its metadata requires torch=={pinned}, installed torch is {torch_v}")
    t_tag, v_tag = local_tag(torch_v), local_tag(have)
    cuda_tv = v_tag.startswith("cu") or tv.get("bundles_cudart")
    if t_tag == "cpu" and cuda_tv:
        problems.append(f"torchvision {have} is a CUDA build but torch {torch_v} is a CPU build")
    elif t_tag and v_tag and t_tag != v_tag:
        problems.append(f"torchvision is a {v_tag} build, torch a {t_tag} build")
    return "; ".join(problems)


def _torch_step(ctx: Context):
    """(torch step dict or None, why-not text)."""
    res = ctx.probes.get("torch") if ctx.probes else None
    if res is None:
        return None, "the torch probe did not run"
    st = res.step("torch")
    if st is None:
        return None, res.died() or "the torch probe reported nothing"
    return st, ""


def check_torchvision(ctx: Context) -> CheckResult:
    name = "torchvision"
    res = ctx.probes.get("torch")
    torch_st, why = _torch_step(ctx)
    if torch_st is None:
        return CheckResult(name, "FAIL", f"could not import torch: {why}", "pip install -c constraints.txt torch")
    if not torch_st.get("ok"):
        if "No module named 'torch'" in torch_st.get("error", ""):
            return CheckResult(name, "SKIP", "torch is not installed (see check 'packages')", "")
        return CheckResult(name, "FAIL", f"import torch fails: {torch_st.get('error')}",
                           "pip install --force-reinstall -c constraints.txt torch", {"torch": torch_st})
    torch_v = torch_st.get("version", "?")
    tv = res.step("torchvision")
    if tv is None:
        return CheckResult(name, "FAIL", f"import torchvision crashed the process: {res.died()}",
                           torchvision_fix(torch_v), {"torch": torch_v})
    facts = {"torch": torch_v, "torchvision": tv}
    if not tv.get("ok"):
        return CheckResult(name, "FAIL", f"probing torchvision failed: {tv.get('error')}", torchvision_fix(torch_v),
                           facts)
    if not tv.get("installed"):
        return CheckResult(name, "PASS", f"torchvision is not installed: fine, the trainer does not need it "
                                         f"(transformers uses its PIL image processors); torch {torch_v}", "", facts)
    have = tv.get("build_version") or tv.get("dist_version") or "?"
    pairing = _pairing_problem(torch_v, tv)
    if not tv.get("import_ok"):
        detail = f"import torchvision {have} fails with torch {torch_v}: {tv.get('import_error')}"
        if pairing:
            detail += f" - {pairing}"
        return CheckResult(name, "FAIL", detail + "; it also breaks transformers model imports",
                           torchvision_fix(torch_v), facts)
    if not tv.get("nms_ok"):
        detail = (f"torchvision {have} imports but its compiled ops do not work: "
                  f"torch.ops.torchvision.nms -> {tv.get('nms_error') or tv.get('nms_result')}")
        return CheckResult(name, "FAIL", detail + (f" - {pairing}" if pairing else ""), torchvision_fix(torch_v), facts)
    if pairing:
        return CheckResult(name, "WARN", f"torchvision {have} imports and nms runs, but {pairing}",
                           torchvision_fix(torch_v), facts)
    return CheckResult(name, "PASS", f"torchvision {have} imports, its compiled ops are registered "
                                     f"(torchvision::nms ran on CPU) and it is the release for torch {torch_v}",
                       "", facts)


def check_transformers_import(ctx: Context) -> CheckResult:
    name = "transformers-import"
    res = ctx.probes.get("torch")
    torch_st, why = _torch_step(ctx)
    if torch_st is None or not torch_st.get("ok"):
        return CheckResult(name, "SKIP", f"torch does not import ({why or torch_st.get('error')}); see 'torchvision'")
    st = res.step("transformers")
    if st is None:
        where = "at `import torchvision`, before the transformers import" if res.step("torchvision") is None \
            else "during `from transformers import LlavaForConditionalGeneration`"
        return CheckResult(name, "FAIL", f"the process crashed {where}: {res.died()}",
                           "see the fix of check 'torchvision'" if res.step("torchvision") is None else
                           "pip install --force-reinstall -c constraints.txt transformers")
    if not st.get("ok"):
        err = st.get("error", "")
        tv = res.step("torchvision") or {}
        caused_by_tv = "torchvision" in err or (tv.get("installed") and not tv.get("import_ok"))
        fix = torchvision_fix(torch_st.get("version", "")).splitlines()[0] if caused_by_tv else \
            "pip install --force-reinstall -c constraints.txt transformers"
        why = " (the broken torchvision is the cause: transformers imports it when it is installed)" if caused_by_tv \
            else ""
        return CheckResult(name, "FAIL", f"`from transformers import LlavaForConditionalGeneration` fails: {err}{why}; "
                                         f"peft and the Trainer fail the same way", fix, {"transformers": st})
    if not st.get("installed"):
        return CheckResult(name, "FAIL", "transformers is not installed; the trainer needs it",
                           "pip install -c constraints.txt 'transformers>=4.46'", {"transformers": st})
    return CheckResult(name, "PASS", f"transformers {st.get('version')}: `from transformers import "
                                     f"LlavaForConditionalGeneration` works ({st.get('seconds', 0):.1f} s)",
                       "", {"transformers": st})
