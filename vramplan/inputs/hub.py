"""`--model ORG/NAME[@REV]` from the Hugging Face hub: config files and safetensors headers, never the weights.

Online, through huggingface_hub (imported only here, only for a hub id):
  - `HfApi.model_info` names the commit and the files (`GET /api/models/{repo}[/revision/{rev}]`);
  - `hf_hub_download` fetches the small files into the hub cache: config.json, processor_config.json,
    preprocessor_config.json and model.safetensors.index.json, when the repo has them;
  - each weight file's safetensors header is read with two HTTP Range requests on its resolve URL: the
    first 8 bytes (little-endian header length N), then bytes 8..8+N-1
    (https://huggingface.co/docs/safetensors/index#format). huggingface_hub's own
    `parse_safetensors_file_metadata` (hf_api.py) always asks for the first 100 kB, which for a small header
    is mostly weight bytes, so it is not used.
The headers are cached as JSON under `$VRAMPLAN_CACHE_DIR` (default `$XDG_CACHE_HOME/vramplan`, i.e.
`~/.cache/vramplan`): `hub/models--{org}--{name}/{commit}/safetensors_headers.json`. The hub cache is never
given anything but real files, so `hf cache` tools and transformers see it unchanged.

Offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set), or when the hub cannot be reached, the answer comes from
the two caches; without them, one line says how to fetch (exit 2).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.inputs import hf_cache

SMALL_FILES = ("config.json", "processor_config.json", "preprocessor_config.json", "model.safetensors.index.json")
HEADERS_FILE = "safetensors_headers.json"
MAX_HEADER = 100 * 2**20  # safetensors caps headers at 100 MB
TOKEN_FIX = "set HF_TOKEN to a token with access (or run `hf auth login`), and accept the model's terms on its hub page"


def split_hub_id(arg: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); no `@` -> revision None (the default branch)."""
    repo, _, rev = arg.partition("@")
    return repo, (rev or None)


def offline(env=None) -> bool:
    """huggingface_hub's rule (constants.py): the first set of HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE is true."""
    env = os.environ if env is None else env
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ("1", "ON", "YES", "TRUE")


def vramplan_cache_dir(env=None) -> Path:
    env = os.environ if env is None else env
    if env.get("VRAMPLAN_CACHE_DIR"):
        return Path(env["VRAMPLAN_CACHE_DIR"]).expanduser()
    return Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "vramplan"


def headers_path(repo: str, commit: str) -> Path:
    return vramplan_cache_dir() / "hub" / ("models--" + repo.replace("/", "--")) / commit / HEADERS_FILE


def fetch_command(arg: str) -> str:
    return f"HF_HUB_OFFLINE=0 vramplan estimate --model {arg}"


def load_hub_model(arg: str):
    """ModelSpec of hub id `arg` (`org/name[@rev]`): online when allowed, else (or when unreachable) cached."""
    repo, rev = split_hub_id(arg)
    if not offline():
        try:
            fetch(repo, rev)
        except _Unreachable as e:
            spec = _from_cache(arg, repo, rev)
            if spec is None:
                raise UsageError(f"--model {arg}: cannot reach the Hugging Face hub ({e})",
                                 "check the network or HF_ENDPOINT and retry, or pass a local dir",
                                 code="model_not_found") from None
            return spec
    spec = _from_cache(arg, repo, rev)
    if spec is None:
        raise UsageError(f"--model {arg}: not a local dir, and not in the Hugging Face cache "
                         f"({hf_cache.hub_cache_dir()}) while HF_HUB_OFFLINE is set",
                         _fetch_hint(arg), code="model_not_found")
    return spec


def _fetch_hint(arg: str) -> str:
    repo, rev = split_hub_id(arg)
    dl = f"hf download {repo} config.json" + (f" --revision {rev}" if rev else "")
    return (f"fetch its config and weight headers (no weights) with `{fetch_command(arg)}`, or `{dl}` "
            f"plus the *.safetensors files; or pass a local dir")


def _from_cache(arg: str, repo: str, rev: str | None):
    from vramplan.inputs.model_dir import load_model_dir, safetensors_files

    snap = hf_cache.cached_snapshot(repo, hf_cache.hub_cache_dir(), rev or "main", containing="config.json")
    if snap is None:
        return None
    headers = None
    hp = headers_path(repo, snap.name)
    if hp.is_file():
        try:
            headers = json.loads(hp.read_text())
            if not isinstance(headers, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError, RecursionError) as e:
            raise UsageError(f"{hp}: unreadable cached headers ({e})",
                             f"delete it and fetch again: {fetch_command(arg)}") from None
    elif any(not f.is_file() for f in safetensors_files(snap)):
        return None  # an index without its shards and without cached headers: not enough to answer
    local_weights = headers is None and bool(safetensors_files(snap))
    return load_model_dir(snap, headers=headers, name=arg, local_weights=local_weights)


class _Unreachable(Exception):
    pass


def fetch(repo: str, rev: str | None) -> None:
    """Fill the caches for `repo` at `rev`: small files into the hub cache, headers into ours."""
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None
    arg = repo + (f"@{rev}" if rev else "")
    try:
        api = HfApi(endpoint=endpoint)
        info = api.model_info(repo, revision=rev)
        commit, names = info.sha, {s.rfilename for s in (info.siblings or [])}
        if "config.json" not in names:
            raise UsageError(f"--model {arg}: the repo has no config.json",
                             "vramplan reads a transformers model repo (config.json + *.safetensors)")
        for f in SMALL_FILES:
            if f in names:
                hf_hub_download(repo, f, revision=rev or "main", cache_dir=hf_cache.hub_cache_dir(),
                                endpoint=endpoint)
        hp = headers_path(repo, commit)
        if hp.is_file():
            return
        snap = hf_cache.cached_snapshot(repo, hf_cache.hub_cache_dir(), commit, containing="config.json")
        shards = _shards(snap, names)
        headers = {f: read_remote_header(api, repo, f, commit) for f in shards}
        hp.parent.mkdir(parents=True, exist_ok=True)
        tmp = hp.with_suffix(".tmp")
        tmp.write_text(json.dumps(headers))
        tmp.replace(hp)
    except UsageError:
        raise
    except HFValidationError as e:
        raise UsageError(f"--model {arg}: not a valid hub id ({str(e).splitlines()[0]})",
                         "write ORG/NAME or ORG/NAME@REVISION, or pass a local dir") from None
    except HfHubHTTPError as e:
        raise _http_error(arg, e) from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.TransportError) as e:
        raise _Unreachable(type(e).__name__ + (f": {str(e).splitlines()[0]}" if str(e) else "")) from None
    except OSError as e:
        raise UsageError(f"--model {arg}: cannot write the cache ({e})",
                         "free disk space or set HF_HUB_CACHE / VRAMPLAN_CACHE_DIR to a writable dir") from None


def _shards(snap: Path | None, names: set[str]) -> list[str]:
    """The weight files: the index's shards, or model.safetensors, or any top-level *.safetensors."""
    from vramplan.inputs.model_dir import safetensors_files

    if snap is not None and (snap / "model.safetensors.index.json").is_file():
        return [p.name for p in safetensors_files(snap)]
    if "model.safetensors" in names:
        return ["model.safetensors"]
    return sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)


def read_remote_header(api, repo: str, filename: str, commit: str) -> dict:
    """One safetensors header by two Range requests: 8 bytes of length, then the header itself."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session, hf_raise_for_status

    url = hf_hub_url(repo, filename, revision=commit, endpoint=api.endpoint)
    headers = api._build_hf_headers()  # the token (HF_TOKEN or `hf auth login`) and user agent

    def get(first: int, last: int) -> bytes:
        r = get_session().get(url, headers={**headers, "Range": f"bytes={first}-{last}",
                                            "Accept-Encoding": "identity"}, follow_redirects=True)
        hf_raise_for_status(r)
        if r.status_code != 206 and len(r.content) > last - first + 1:
            raise UsageError(f"--model {repo}: {filename}: the server ignored the Range request",
                             "set HF_ENDPOINT to a hub that serves byte ranges")
        return r.content[: last - first + 1]

    raw = get(0, 7)
    if len(raw) < 8:
        raise UsageError(f"--model {repo}: {filename}: not a valid safetensors file (shorter than 8 bytes)", "")
    (n,) = struct.unpack("<Q", raw)
    if not 0 < n <= MAX_HEADER:
        raise UsageError(f"--model {repo}: {filename}: not a valid safetensors file (header length {n})", "")
    try:
        header = json.loads(get(8, 8 + n - 1))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise UsageError(f"--model {repo}: {filename}: not a valid safetensors header ({e})", "") from None
    return header


def _http_error(arg: str, e) -> UsageError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, RevisionNotFoundError):
        return UsageError(f"--model {arg}: no such revision on the hub", "check the branch, tag or commit after @",
                          code="model_not_found")
    if isinstance(e, GatedRepoError) or status == 403 or (status == 401 and not isinstance(e, RepositoryNotFoundError)):
        has_token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        why = "your token has no access to it" if has_token else "it needs a token (gated or private)"
        return UsageError(f"--model {arg}: the hub refused access ({status}): {why}", TOKEN_FIX, code="model_gated")
    if isinstance(e, RepositoryNotFoundError) or status == 404:
        # the hub answers 401 RepoNotFound both for a missing repo and a private one without a token
        return UsageError(f"--model {arg}: no such model on the Hugging Face hub (or a private one your token "
                          "cannot see)", "check the spelling (ORG/NAME, as on its hub page); for a private "
                          "model set HF_TOKEN; or pass a local dir or a profile name", code="model_not_found")
    return UsageError(f"--model {arg}: the hub answered {status or 'an error'} ({str(e).splitlines()[0][:200]})",
                      "try again later, or run offline from the cache with HF_HUB_OFFLINE=1", code="model_not_found")
