"""Security pass: no unpickling, downloads only over http(s) and verified before use, no secret in what we
write (install records, params.json, manifests, messages), cluster.yaml keeps its services off the internet.
"""

import ast
import base64
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import write_d4rl_file
from helpers.models import make_bundle, rewrite_zip
from helpers.paths import REPO

import invdyn
from invdyn._download import download, redact_url
from invdyn.errors import ChecksumError, DownloadError
from invdyn.settings import model_cache_dir

ROOT = REPO
SOURCES = sorted(p for d in ("invdyn", "pipeline", "bench", "tests") for p in (ROOT / d).rglob("*.py"))
CANARY = "c4nary-S3CRET-7f3a"


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    """Dotted name of a call target: torch.load, pickle.loads, np.load, load (from-imported) ..."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _room(path: Path) -> str:
    """The top folder a source file sits in (invdyn, pipeline, bench, tests), at any depth below it."""
    return path.relative_to(ROOT).parts[0]


def _kw(call, name):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def test_every_torch_load_uses_weights_only():
    """torch.load unpickles: only `weights_only=True` is safe for files from anywhere.

    Shipped code only: tests may unpickle a file they made themselves (to prove a payload is live).
    """
    found, bad = 0, []
    for path in SOURCES:
        if _room(path) not in ("invdyn", "pipeline", "bench"):
            continue
        for call in _calls(path):
            if _name(call.func) == "torch.load":
                found += 1
                value = _kw(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    bad.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert found >= 1  # the scan sees the loader in invdyn/model_dir.py
    assert bad == [], f"torch.load without weights_only=True: {bad}"


def test_no_other_unsafe_deserialisation_or_shell():
    """No pickle / marshal / unsafe yaml / np.load(allow_pickle) / eval / exec / shell=True in shipped
    code."""
    bad = []
    for path in SOURCES:
        shipped = _room(path) in ("invdyn", "pipeline", "bench")
        for call in _calls(path):
            name = _name(call.func)
            if name in ("pickle.load", "pickle.loads", "marshal.loads", "dill.load", "cloudpickle.load"):
                bad.append((path, call.lineno, name))
            if name == "yaml.load" and not isinstance(_kw(call, "Loader"), ast.Attribute | ast.Name):
                bad.append((path, call.lineno, name))
            if name.endswith("np.load") or name == "numpy.load":
                value = _kw(call, "allow_pickle")
                if isinstance(value, ast.Constant) and value.value:
                    bad.append((path, call.lineno, "np.load(allow_pickle=True)"))
            if shipped and name in ("eval", "exec"):
                bad.append((path, call.lineno, name))
            value = _kw(call, "shell")
            if shipped and isinstance(value, ast.Constant) and value.value:
                bad.append((path, call.lineno, "shell=True"))
    assert bad == []


def test_only_the_downloader_fetches_urls():
    """Every byte we download goes through invdyn._download (http(s) only, resumable, verified)."""
    allowed = {
        ROOT / "invdyn" / "_download.py",
        # a GET of the MLflow server's /health before the job starts
        ROOT / "pipeline" / "registry" / "store.py",
    }
    net = (
        "urlopen",
        "urlretrieve",
        "requests.get",
        "requests.post",
        "http.client.HTTPConnection",
        "build_opener",
    )
    users = set()
    for path in SOURCES:
        if _room(path) not in ("invdyn", "pipeline"):
            continue
        for call in _calls(path):
            if any(_name(call.func).endswith(n) for n in net):
                users.add(path)
    assert users - allowed == set()
    assert ROOT / "invdyn" / "_download.py" in users


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://127.0.0.1/x",
        "data:,x",
        "jar:http://x!/",
        "/etc/passwd",
        "javascript:alert(1)",
        "HTTP:/no-host",
        "http://[::1",
    ],
)
def test_download_refuses_everything_but_http(tmp_path, url):
    with pytest.raises(DownloadError):
        download(url, tmp_path / "x", progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name != ".x.lock"] == []


class AuthServer:
    """A loopback file server that demands HTTP Basic auth user:CANARY; records every request line."""

    def __init__(self, root):
        self.root, self.seen = Path(root), []
        expected = "Basic " + base64.b64encode(f"user:{CANARY}".encode()).decode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.seen.append((self.requestline, self.headers.get("Authorization")))
                if self.headers.get("Authorization") != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="invdyn"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = server.root / self.path.split("?")[0].lstrip("/")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.port = self.httpd.server_address[1]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_credentials_in_a_url_are_sent_as_a_header_and_never_stored(tmp_path, capsys):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    server = AuthServer(tmp_path)
    try:
        secret_url = (
            f"http://user:{CANARY}@127.0.0.1:{server.port}/{bundle.name}?X-Amz-Signature={CANARY}&v=1"
        )
        assert invdyn.fetch(secret_url, progress=False) == ["a-v0"]
        line, auth = server.seen[-1]
        assert CANARY not in line.split("?")[0] and auth  # sent as a header, not in the request path
        model = invdyn.load("a-v0", source=secret_url)  # reuses the install: matched on the redacted URL
        assert CANARY not in model.source and len(server.seen) == 1
        from invdyn.__main__ import main

        assert main(["list", "--json"]) == 0 and main(["info", "a-v0"]) == 0
        wrong = secret_url.replace(f"user:{CANARY}", "user:wrong-" + CANARY[::-1])
        with pytest.raises(DownloadError, match="HTTP 401") as err:
            invdyn.fetch(wrong, progress=False, force=True)
        assert CANARY[::-1] not in str(err.value)
        assert main(["fetch", wrong, "--quiet"]) == 1
    finally:
        server.close()
    out = capsys.readouterr()
    assert CANARY not in out.out + out.err and CANARY[::-1] not in out.out + out.err
    assert _files_containing(Path(os.environ["INVDYN_HOME"]), CANARY) == []


def test_redact_url():
    assert redact_url("https://u:p@h:8/x?token=t&a=1") == "https://***@h:8/x?token=***&a=1"
    assert (
        redact_url("http://h/x?X-Amz-Credential=c&X-Amz-Signature=s")
        == "http://h/x?X-Amz-Credential=***&X-Amz-Signature=***"
    )
    assert redact_url("http://h/plain?a=1") == "http://h/plain?a=1"


def test_tampered_bundle_over_http_is_never_installed(tmp_path):
    from helpers.models import FileServer

    good = make_bundle(tmp_path, names=("a-v0",))
    with __import__("zipfile").ZipFile(good) as zf:
        params = zf.read("a-v0/params.json").replace(b'"heldout_mse": 0.01', b'"heldout_mse": 0.0001')
    rewrite_zip(good, tmp_path / "evil.zip", replace={"a-v0/params.json": params})
    with FileServer(tmp_path) as server, pytest.raises(ChecksumError, match="params.json"):
        invdyn.fetch(server.url("evil.zip"), progress=False)
    assert not (model_cache_dir() / "a-v0").exists()
    assert (
        list((Path(os.environ["INVDYN_HOME"]) / "downloads").glob("*.zip")) == []
    )  # the download is deleted


def test_no_secret_from_the_environment_lands_in_a_model(tmp_path, monkeypatch, capsys):
    """Tokens in the environment (cloud, MLflow, Ray, HF) never reach params.json, the card or the output."""
    for var in (
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "RAY_AUTH_TOKEN",
        "HF_TOKEN",
        "INVDYN_D4RL_MIRROR",
    ):
        monkeypatch.setenv(var, f"{var}-{CANARY}")
    data = tmp_path / "data.hdf5"
    write_d4rl_file(data, episodes=(200, 200, 200), obs_dim=4, act_dim=2)
    from pipeline.training.cli import main

    out = tmp_path / "model"
    assert (
        main(
            [
                "--dataset",
                str(data),
                "--out",
                str(out),
                "--max-epochs",
                "2",
                "--hidden-dim",
                "16",
                "--batch-size",
                "64",
            ]
        )
        == 0
    )
    assert _files_containing(out, CANARY) == []
    cap = capsys.readouterr()
    assert CANARY not in cap.out + cap.err
    bundle = invdyn.write_bundle(tmp_path / "b.zip", [out])
    assert CANARY.encode() not in bundle.read_bytes()
    assert CANARY not in json.dumps(invdyn.verify_bundle(bundle))


def test_cluster_yaml_keeps_services_private():
    """Dashboard on loopback (SSH tunnel), MLflow on the head's private address, Ray token auth everywhere."""
    text = (ROOT / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["setup_commands"])  # job drivers and `ray job submit` too
    assert any("auth_token" in k for k in cfg["file_mounts"])  # every node gets the cluster's token
    assert re.search(r"mlflow server\s+--host \$\(hostname -I", head)  # the head's private address
    assert "0.0.0.0" not in text and "--dashboard-host=0.0.0.0" not in text
    assert "token" not in json.dumps(cfg.get("provider", {})).lower()  # no secret pasted into the config
