"""D4RL downloads from a real loopback HTTP server (with Range support): resume, validity check, offline
errors."""

import http.server
import os
import re
import subprocess
import sys
import threading

import pytest

from invdyn.errors import DownloadError
from pipeline.data.catalog import DatasetError, file_path
from pipeline.data.download import dataset_url, download_dataset
from pipeline.data.sources import load_transitions

NAME = "hopper-medium-v2"
REL = "gym_mujoco_v2/hopper_medium-v2.hdf5"


class Server:
    """http.server on 127.0.0.1 serving `root`, honouring Range; can cut its first response after N bytes."""

    def __init__(self, root, cut_first_at=None):
        self.root, self.cut_first_at, self.requests = root, cut_first_at, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                path = outer.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if outer.cut_first_at is not None and len(outer.requests) == 1:
                    body = body[: outer.cut_first_at]  # the connection drops mid-transfer
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def mirror(tmp_path, d4rl_file, monkeypatch):
    """A D4RL-layout hopper file (11 / 3 dims) laid out as on D4RL's server, and the env var to use it."""
    src, _ = d4rl_file(name="src.hdf5", episodes=(300, 300), obs_dim=11, act_dim=3)
    served = tmp_path / "www" / REL
    served.parent.mkdir(parents=True)
    src.rename(served)

    def serve(**kw):
        server = Server(tmp_path / "www", **kw)
        monkeypatch.setenv("INVDYN_D4RL_MIRROR", server.url)
        return server

    return served, serve


def test_download_by_name_then_load(mirror):
    served, serve = mirror
    with serve() as server:
        assert dataset_url(NAME) == f"{server.url}/{REL}"
        t = load_transitions(NAME, download=True)
    dest = file_path(NAME)
    assert dest.read_bytes() == served.read_bytes() and dest.name == "hopper_medium-v2.hdf5"
    assert len(t) == 600 and t.stats["env_id"] == "Hopper-v5"
    assert server.requests == [(f"/{REL}", None)]


def test_interrupted_transfer_resumes_with_range(mirror):
    served, serve = mirror
    size = served.stat().st_size
    with serve(cut_first_at=size // 3) as server:
        path = download_dataset(NAME, progress=False)
    assert path.read_bytes() == served.read_bytes()
    assert server.requests[1] == (f"/{REL}", f"bytes={size // 3}-")
    assert not path.with_name(path.name + ".part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(mirror):
    served, serve = mirror
    data = served.read_bytes()
    dest = file_path(NAME)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_name(dest.name + ".part").write_bytes(data[:1000])
    with serve() as server:
        download_dataset(NAME, progress=False)
    assert server.requests == [(f"/{REL}", "bytes=1000-")]
    assert dest.read_bytes() == data


def test_a_download_that_is_not_hdf5_is_removed(mirror):
    served, serve = mirror
    served.write_text("<html>maintenance</html>")
    with serve(), pytest.raises(DatasetError, match="not a valid D4RL file, so it was removed"):
        download_dataset(NAME, progress=False)
    assert not file_path(NAME).exists()


def test_unreachable_server_names_url_and_path(monkeypatch):
    monkeypatch.setenv("INVDYN_D4RL_MIRROR", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(DownloadError) as e:
        download_dataset(NAME, progress=False)
    assert f"http://127.0.0.1:9/{REL}" in str(e.value) and str(file_path(NAME)) in str(e.value)


def test_offline_cli_download_exits_nonzero_naming_url_and_path(isolated_dirs):
    env = {**os.environ, "INVDYN_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.datasets", "download", NAME],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode != 0
    assert f"http://rail.eecs.berkeley.edu/datasets/offline_rl/{REL}" in r.stderr
    assert str(file_path(NAME)) in r.stderr
    assert not file_path(NAME).exists()
