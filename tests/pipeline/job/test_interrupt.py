"""Ctrl-C (SIGINT) and SIGTERM in the middle of real work, sent to a real subprocess at the moment it is busy:

- a download from a loopback server that streams slowly (`invdyn fetch`, `pipeline.datasets download`):
  only the resumable `.part` stays; the next run resumes with an HTTP Range request and installs;
- the Arrow cache write of a prepared dataset: no half-written cache file; the next run rebuilds it;
- a training run (`python -m pipeline.train`): no model directory, no temp directory; the next run trains;
- a bundle export (`invdyn.write_bundle`, what `pipeline.registry.export` writes with): no partial zip.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import write_d4rl_file
from helpers.models import make_bundle, make_model_dir

import invdyn
from invdyn.settings import model_cache_dir

TEMP_MARKS = (".tmp-", ".old-", ".fetch-", ".extract-")


def _temps(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if any(m in p.name for m in TEMP_MARKS))


class SlowServer:
    """Loopback http.server with Range support that sends `chunk` bytes every `delay` seconds while `slow`."""

    def __init__(self, root, chunk=16 << 10, delay=0.02):
        self.root, self.chunk, self.delay, self.slow = Path(root), chunk, delay, True
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                m = re.match(r"bytes=(\d+)-$", rng or "")
                start = int(m.group(1)) if m else 0
                self.send_response(206 if m else 200)
                if m:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                try:
                    for i in range(start, len(data), server.chunk):
                        self.wfile.write(data[i : i + server.chunk])
                        if server.slow:
                            time.sleep(server.delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client was killed: that is the test

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def slow_server(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    server = SlowServer(www)
    yield server, www
    server.close()


def _default_sigint():
    """A shell runs background jobs with SIGINT ignored, and children inherit that: give Ctrl-C back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_when(cmd, ready, sig, *, timeout=60, env=None):
    """Run `cmd`; as soon as `ready()` is true send `sig`; return (returncode, stderr). Fails if never
    ready."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint
    )
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "never reached the point to interrupt"
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _part_bytes(folder: Path) -> int:
    parts = list(folder.rglob("*.part")) if folder.exists() else []
    return parts[0].stat().st_size if parts else 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fetch_interrupted_mid_download_resumes(tmp_path, slow_server, sig):
    server, www = slow_server
    bundle = make_bundle(tmp_path, names=("a-v0",))
    big = make_model_dir(tmp_path / "big" / "b-v0", hidden_dim=700)  # ~4 MB: many slow chunks
    bundle = invdyn.write_bundle(www / "models.zip", [tmp_path / "dirs" / "a-v0", big])
    home = Path(os.environ["INVDYN_HOME"])
    rc, err = _interrupt_when(
        [sys.executable, "-m", "invdyn", "fetch", server.url("models.zip"), "--quiet"],
        lambda: _part_bytes(home / "downloads") > 200_000,
        sig,
    )
    assert rc == (130 if sig == signal.SIGINT else -signal.SIGTERM), err
    assert "Traceback" not in err
    kept = _part_bytes(home / "downloads")
    assert 200_000 <= kept < bundle.stat().st_size
    assert not model_cache_dir().exists() or not [
        p for p in model_cache_dir().iterdir() if not p.name.startswith(".")
    ]
    assert _temps(home) == []
    server.slow = False
    assert invdyn.fetch(server.url("models.zip"), progress=False) == ["a-v0", "b-v0"]
    assert server.ranges[-1] == f"bytes={kept}-"  # resumed, not restarted
    assert invdyn.load("b-v0").params["config"]["hidden_dim"] == 700
    assert list((home / "downloads").glob("*.part")) == [] and _temps(home) == []


def test_d4rl_download_interrupted_then_resumed(tmp_path, slow_server, monkeypatch):
    """`python -m pipeline.datasets download` from a mirror: SIGINT mid-file, then the rerun resumes."""
    server, www = slow_server
    name = "hopper-medium-v2"
    from pipeline.data.catalog import file_path
    from pipeline.data.download import D4RL_BASE, dataset_url

    rel = dataset_url(name)[len(D4RL_BASE) :]
    (www / rel.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    write_d4rl_file(www / rel.lstrip("/"), episodes=(20000, 20000), obs_dim=11, act_dim=3)
    monkeypatch.setenv("INVDYN_D4RL_MIRROR", server.url("").rstrip("/"))
    dest = file_path(name)
    rc, err = _interrupt_when(
        [sys.executable, "-m", "pipeline.datasets", "download", name, "--quiet"],
        lambda: _part_bytes(dest.parent) > 100_000,
        signal.SIGINT,
    )
    assert rc != 0 and not dest.exists(), err
    kept = _part_bytes(dest.parent)
    server.slow = False
    from pipeline.data.cli import main

    assert main(["download", name, "--quiet"]) == 0
    assert server.ranges[-1] == f"bytes={kept}-"
    from pipeline.data.sources import load_transitions

    assert len(load_transitions(name)) == 40000 - 2 + 2  # next_observations: every row is a pair


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cache_write_interrupted_leaves_no_partial_cache(tmp_path, sig):
    path = tmp_path / "big.hdf5"
    write_d4rl_file(path, episodes=(300_000, 300_000), obs_dim=17, act_dim=6)
    cache = Path(os.environ["INVDYN_HOME"]) / "transitions"
    code = f"from pipeline.data.sources import load_transitions; load_transitions({str(path)!r})"
    rc, err = _interrupt_when(
        [sys.executable, "-c", code],
        lambda: cache.is_dir() and any(".tmp-" in p.name for p in cache.iterdir()),
        sig,
    )
    assert rc != 0, err
    assert list(cache.glob("*.arrow")) == []  # no cache file, whole or half
    assert _temps(cache) == []
    from pipeline.data.sources import load_transitions

    t = load_transitions(str(path))
    assert t.stats["cache_hit"] is False and len(t) == 600_000
    assert load_transitions(str(path)).stats["cache_hit"] is True


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_training_run_interrupted_writes_nothing(tmp_path, sig):
    data = tmp_path / "data.hdf5"
    write_d4rl_file(data, episodes=(2000, 2000, 2000), obs_dim=5, act_dim=2)
    out = tmp_path / "out" / "model"
    log = tmp_path / "train.log"
    cmd = [
        sys.executable,
        "-m",
        "pipeline.training.cli",
        "--dataset",
        str(data),
        "--out",
        str(out),
        "--max-epochs",
        "1000",
        "--patience",
        "1000",
        "--hidden-dim",
        "64",
        "--threads",
        "1",
    ]
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint
        )
    try:
        deadline = time.monotonic() + 120
        while "val_mse" not in log.read_text():  # training has begun: at least one evaluation done
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not out.exists() and _temps(tmp_path / "out") == []
    from pipeline.training.cli import main

    assert (
        main(
            ["--dataset", str(data), "--out", str(out), "--max-epochs", "2", "--hidden-dim", "16", "--quiet"]
        )
        == 0
    )
    assert invdyn.read_model_dir(out).params["config"]["hidden_dim"] == 16


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_bundle_export_interrupted_leaves_no_partial_zip(tmp_path, sig):
    dirs = [make_model_dir(tmp_path / "dirs" / f"m{i}-v0", hidden_dim=900, seed=i) for i in range(3)]
    out = tmp_path / "export" / "bundle.zip"
    out.parent.mkdir()
    old = invdyn.write_bundle(out, dirs[:1])  # a previous export must survive an interrupted new one
    old_bytes = old.read_bytes()
    code = (
        "import sys, invdyn; from pathlib import Path; "
        f"invdyn.write_bundle({str(out)!r}, [Path(p) for p in {[str(d) for d in dirs]!r}])"
    )
    rc, err = _interrupt_when(
        [sys.executable, "-c", code], lambda: any(".tmp-" in p.name for p in out.parent.iterdir()), sig
    )
    assert rc != 0, err
    assert out.read_bytes() == old_bytes and _temps(out.parent) == []
    invdyn.write_bundle(out, dirs)
    assert len(invdyn.verify_bundle(out)["models"]) == 3


@pytest.mark.parametrize("maker", ["mkstemp", "mkdtemp"])
def test_interrupt_right_after_the_temp_appears_still_removes_it(tmp_path, monkeypatch, maker):
    """The window between the temp path appearing on disk and the clean-up `try` (hit once under load)."""
    import tempfile

    from invdyn._files import atomic_dir, atomic_file

    real = getattr(tempfile, maker)

    def make_then_interrupt(*args, **kwargs):
        made = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # delivered as soon as Python checks for signals
        return made

    monkeypatch.setattr(tempfile, maker, make_then_interrupt)
    target = tmp_path / "target"
    atomic = atomic_file(target) if maker == "mkstemp" else atomic_dir(target)
    # Python's own SIGINT handler (raising KeyboardInterrupt), whatever an earlier test in this process
    # installed (an in-process Ray driver installs its own)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), atomic as t:
            t.write(b"x") if maker == "mkstemp" else (t / "f").write_text("x")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp
