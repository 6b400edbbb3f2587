"""A local stand-in for the Hugging Face hub (HF_ENDPOINT) serving model dirs, for tests/test_hub.py.

It answers the endpoints huggingface_hub calls (hf_api.py model_info, file_download.py get_hf_file_metadata
and http_get): `GET /api/models/{repo}[/revision/{rev}]` and `HEAD`/`GET /{repo}/resolve/{rev}/{file}` with
ETag, X-Repo-Commit and Content-Length, and byte ranges (206 + Content-Range). It counts the bytes of
safetensors tensor data it sent, which must stay 0: vramplan reads headers, never weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos, self.gated = repos, gated
        self.weight_bytes = 0  # tensor data bytes sent (after a safetensors header)
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_HEAD(self):
                hub.serve(self, head=True)

            def do_GET(self):
                hub.serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.server.shutdown()
        self.server.server_close()

    def error(self, h, status: int, code: str):
        body = json.dumps({"error": code}).encode()
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def serve(self, h, head: bool):
        path = h.path.split("?")[0]
        self.requests.append(f"{h.command} {path} {h.headers.get('Range', '')}")
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        r = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = (m or r).group(1) if (m or r) else None
        if repo in self.gated:
            return self.error(h, 401, "GatedRepo")
        if repo not in self.repos:
            return self.error(h, 404 if repo else 400, "RepoNotFound")
        d = self.repos[repo]
        rev = (m.group(2) if m else r.group(2)) or "main"
        if rev not in ("main", COMMIT):
            return self.error(h, 404, "RevisionNotFound")
        if m:
            sib = [{"rfilename": p.relative_to(d).as_posix()} for p in sorted(d.rglob("*")) if p.is_file()]
            return self.send(h, json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": sib}).encode(),
                             head, {"Content-Type": "application/json"})
        f = d / r.group(3)
        if not f.is_file():
            return self.error(h, 404, "EntryNotFound")
        data = f.read_bytes()
        extra = {"ETag": '"' + hashlib.sha1(data).hexdigest() + '"', "X-Repo-Commit": COMMIT,
                 "Accept-Ranges": "bytes"}
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
        if rng and not head:
            first, last = int(rng.group(1)), min(int(rng.group(2) or len(data) - 1), len(data) - 1)
            extra["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            self.count(f, data, first, last + 1)
            return self.send(h, data[first:last + 1], head, extra, status=206)
        if not head:
            self.count(f, data, 0, len(data))
        return self.send(h, data, head, extra)

    def count(self, f: Path, data: bytes, begin: int, end: int):
        if f.suffix == ".safetensors":
            start = 8 + struct.unpack("<Q", data[:8])[0]
            self.weight_bytes += max(0, end - max(begin, start))

    @staticmethod
    def send(h, body: bytes, head: bool, headers: dict, status: int = 200):
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
