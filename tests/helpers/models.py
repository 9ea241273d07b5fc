"""Helpers for the invdyn library tests: small real model directories and a loopback HTTP file server."""

from __future__ import annotations

import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

import invdyn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # kept in the repo: a clone tests itself
CD_HOME = FIXTURES / "cleandiffuser"
CD_NAME = "hopper-medium-v2"
CD_DIR = CD_HOME / ".CleanDiffuser" / "pretrained" / "invdyn" / CD_NAME


def make_model_dir(path, *, obs_dim=5, act_dim=2, hidden_dim=16, seed=0, name=None, **metrics) -> Path:
    """A small trained-looking model directory written by `save_model_dir` (random weights, real format)."""
    torch.manual_seed(seed)
    net = invdyn.FancyMlpInvDynamic(obs_dim, act_dim, hidden_dim=hidden_dim)
    rng = np.random.default_rng(seed)
    normalizer = invdyn.GaussianNormalizer(rng.normal(size=obs_dim), rng.uniform(0.5, 2.0, size=obs_dim))
    path = Path(path)
    name = name or path.name
    return invdyn.save_model_dir(
        path,
        net,
        normalizer,
        name=name,
        dataset={"name": name, "sha256": "ab" * 32},
        metrics={"heldout_mse": 0.01 + seed, "baseline_mse": 0.02 + seed, **metrics},
        training={"lr": 3e-4, "batch_size": 512},
    )


def make_bundle(tmp_path, names=("a-v0", "b-v0"), zip_name="bundle.zip") -> Path:
    dirs = [make_model_dir(tmp_path / "dirs" / n, seed=i) for i, n in enumerate(names)]
    return invdyn.write_bundle(tmp_path / zip_name, dirs)


def rewrite_zip(src, dst, *, replace=None, add=(), drop=()):
    """Copy a zip member by member, replacing some members' bytes, adding raw members, dropping others."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.get(info.filename, zin.read(info.filename))
            zout.writestr(info, data)
        for info, data in add:
            zout.writestr(info, data)
    return Path(dst)


class FileServer:
    """A real `http.server` on 127.0.0.1 serving one folder, with Range support and injectable faults.

    `cut_after`: send only this many body bytes per response, then drop the connection (for this many
    responses, `cuts`); `ignore_range`: answer 200 with the whole file even when a Range is asked.
    `redirects` maps a path to a Location answered with 302. `requests` records (path, Range header).
    """

    def __init__(self, root):
        self.root = Path(root)
        self.cut_after: int | None = None
        self.cuts = 0
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.redirects: dict[str, str] = {}  # "/path" -> Location
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = path.read_bytes()
                start = 0
                m = re.match(r"bytes=(\d+)-$", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if server.cut_after is not None and server.cuts > 0:
                    server.cuts -= 1
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
