"""Downloads and bundle installs over a real loopback HTTP server: resume, restart, checksums, offline,
races."""

import hashlib
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.models import FileServer, make_bundle

import invdyn
from invdyn._download import download
from invdyn.settings import model_cache_dir


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    payload = os.urandom(300_000)
    (root / "blob.bin").write_bytes(payload)
    with FileServer(root) as server:
        yield server, payload


def _leftovers(folder: Path) -> list[str]:
    """Temp / partial files a crash-safe writer must not leave behind (lock files are expected)."""
    return sorted(
        p.name
        for p in folder.rglob("*")
        if p.name.endswith(".part") or any(t in p.name for t in (".tmp-", ".old-", ".fetch-", ".extract-"))
    )


def test_download_verifies_and_renames(served, tmp_path):
    server, payload = served
    dest = tmp_path / "out" / "blob.bin"
    sha = hashlib.sha256(payload).hexdigest()
    assert download(server.url("blob.bin"), dest, expected_sha256=sha, progress=False) == dest
    assert dest.read_bytes() == payload
    assert _leftovers(tmp_path / "out") == []
    # already there with the right checksum: no second request
    n = len(server.requests)
    download(server.url("blob.bin"), dest, expected_sha256=sha, progress=False)
    assert len(server.requests) == n


def test_download_cut_midway_resumes_with_range(served, tmp_path):
    server, payload = served
    server.cut_after, server.cuts = 100_000, 1
    dest = download(server.url("blob.bin"), tmp_path / "blob.bin", progress=True)
    assert dest.read_bytes() == payload
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]


def test_interrupted_download_resumes_on_next_call(served, tmp_path):
    server, payload = served
    server.cut_after, server.cuts = 50_000, 10  # every response is cut: this call gives up
    dest = tmp_path / "blob.bin"
    with pytest.raises(invdyn.DownloadError, match="run again to resume"):
        download(server.url("blob.bin"), dest, progress=False)
    part = tmp_path / "blob.bin.part"
    have = part.stat().st_size
    assert have == 150_000 and not dest.exists()  # 3 attempts kept their bytes
    server.cuts = 0
    download(
        server.url("blob.bin"), dest, expected_sha256=hashlib.sha256(payload).hexdigest(), progress=False
    )
    assert dest.read_bytes() == payload and not part.exists()
    assert server.requests[-1][1] == f"bytes={have}-"


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    server, payload = served
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"stale bytes from an older file" * 100)
    dest = download(server.url("blob.bin"), tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == payload
    assert server.requests[-1][1] == "bytes=3000-"  # it asked to resume; the 200 made it start over


def test_complete_part_is_finished_without_body(served, tmp_path):
    server, payload = served
    (tmp_path / "blob.bin.part").write_bytes(payload)
    dest = download(server.url("blob.bin"), tmp_path / "blob.bin", progress=False)
    assert dest.read_bytes() == payload  # server answered 416 with the full size: the .part was whole


def test_redirects_only_to_http(served, tmp_path):
    server, payload = served
    server.redirects = {"/old.bin": server.url("blob.bin"), "/evil.bin": "ftp://127.0.0.1/blob.bin"}
    assert download(server.url("old.bin"), tmp_path / "a.bin", progress=False).read_bytes() == payload
    with pytest.raises(invdyn.DownloadError, match="only http"):
        download(server.url("evil.bin"), tmp_path / "b.bin", progress=False)
    assert not (tmp_path / "b.bin").exists()


def test_plain_progress_line_without_tqdm(served, tmp_path, monkeypatch, capsys):
    server, _ = served
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    download(server.url("blob.bin"), tmp_path / "blob.bin")
    err = capsys.readouterr().err
    assert "downloading blob.bin (0.3 MB)" in err and "blob.bin: 0.3 MB in" in err


def test_plain_progress_lines_when_stderr_is_not_a_terminal(served, tmp_path, capsys):
    """tqdm is installed, but a log file gets two plain lines, not carriage-return frames."""
    server, _ = served
    download(server.url("blob.bin"), tmp_path / "blob.bin")
    err = capsys.readouterr().err
    assert "\r" not in err and err.count("\n") == 2 and "blob.bin: 0.3 MB in" in err


def test_checksum_mismatch_leaves_nothing(served, tmp_path):
    server, _ = served
    with pytest.raises(invdyn.ChecksumError) as e:
        download(server.url("blob.bin"), tmp_path / "blob.bin", expected_sha256="0" * 64, progress=False)
    assert "0" * 64 in str(e.value) and server.url("blob.bin") in str(e.value)
    assert list(tmp_path.glob("blob.bin*")) == []


def test_download_errors_name_the_url(served, tmp_path, monkeypatch):
    server, _ = served
    url = server.url("missing.bin")
    with pytest.raises(invdyn.DownloadError, match=r"missing\.bin.*404"):
        download(url, tmp_path / "x", progress=False)
    with pytest.raises(invdyn.DownloadError, match="only http"):
        download("file:///etc/passwd", tmp_path / "x")
    with pytest.raises(invdyn.DownloadError, match="127.0.0.1:9"):
        download("http://127.0.0.1:9/x", tmp_path / "x", progress=False, timeout=5)
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    n = len(server.requests)
    with pytest.raises(invdyn.DownloadError, match="INVDYN_OFFLINE"):
        download(server.url("blob.bin"), tmp_path / "x", progress=False)
    assert len(server.requests) == n
    assert not (tmp_path / "x").exists()


def test_fetch_bundle_over_http_then_load(tmp_path):
    bundle = make_bundle(tmp_path)
    with FileServer(tmp_path) as server:
        server.cut_after, server.cuts = 4000, 1  # the first transfer is cut: fetch resumes it
        names = invdyn.fetch(server.url(bundle.name), progress=False)
    assert names == ["a-v0", "b-v0"]
    assert server.requests[1][1] == "bytes=4000-"
    model = invdyn.load("a-v0")
    local = invdyn.load("a-v0", source=tmp_path / "dirs" / "a-v0")
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(x, x), local.predict(x, x))
    assert model.source == "invdyn cache"
    records = {r["name"]: r for r in invdyn.list_models()}
    assert records["a-v0"]["source"] == server.url(bundle.name)
    assert records["b-v0"]["metrics"]["heldout_mse"] == pytest.approx(1.01)
    home = Path(os.environ["INVDYN_HOME"])
    assert _leftovers(home) == [] and not list((home / "downloads").glob("*.zip"))
    kept = list((home / "bundles").glob("*.json"))  # the verified manifest is kept
    assert len(kept) == 1 and '"a-v0"' in kept[0].read_text()


def test_load_from_url_downloads_once(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    with FileServer(tmp_path) as server:
        url = server.url(bundle.name)
        first = invdyn.load("a-v0", source=url)
        second = invdyn.load("a-v0", source=url)
        monkeypatch.setenv("INVDYN_OFFLINE", "1")
        third = invdyn.load("a-v0", source=url)  # installed from this URL: works offline
    assert len(server.requests) == 1
    assert first.source == second.source == third.source == url
    x = np.ones((2, 5), np.float32)
    np.testing.assert_array_equal(first.predict(x, x), third.predict(x, x))


def test_fetch_offline_touches_no_network(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    with FileServer(tmp_path) as server:
        with pytest.raises(invdyn.DownloadError, match="INVDYN_OFFLINE"):
            invdyn.fetch(server.url(bundle.name))
        with pytest.raises(invdyn.DownloadError, match="INVDYN_OFFLINE"):
            invdyn.load("a-v0", source=server.url(bundle.name))
    assert server.requests == []
    assert invdyn.fetch(bundle) == ["a-v0"]  # a local bundle is fine offline


def test_concurrent_fetches_end_with_one_good_copy(tmp_path):
    bundle = make_bundle(tmp_path)
    results, errors = [], []

    def worker(src):
        try:
            results.append(invdyn.fetch(src, force=True, progress=False))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    with FileServer(tmp_path) as server:
        sources = [server.url(bundle.name), str(bundle)] * 2
        threads = [threading.Thread(target=worker, args=(s,)) for s in sources]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == [] and results == [["a-v0", "b-v0"]] * 4
    cache = model_cache_dir()
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["a-v0", "b-v0"]
    assert _leftovers(Path(os.environ["INVDYN_HOME"])) == []
    for name in ("a-v0", "b-v0"):
        invdyn.load(name)  # checks every file against the checksums it was installed with


def test_fetch_skips_identical_and_replaces_changed(tmp_path):
    first = make_bundle(tmp_path, names=("a-v0",), zip_name="one.zip")
    stale = model_cache_dir() / ".fetch-killed" / "a-v0"  # what a fetch killed mid-extract leaves
    stale.mkdir(parents=True)
    (stale / "params.json").write_text("{")
    with pytest.raises(invdyn.ModelNotFoundError):
        invdyn.load("a-v0")  # a half-extracted copy is never visible
    invdyn.fetch(first)
    assert not stale.parent.exists()
    ckpt = model_cache_dir() / "a-v0" / "model.ckpt"
    inode = ckpt.stat().st_ino
    invdyn.fetch(first)
    assert ckpt.stat().st_ino == inode  # identical files: left alone
    from helpers.models import make_model_dir

    newer = make_model_dir(tmp_path / "v2" / "a-v0", seed=5)
    invdyn.fetch(invdyn.write_bundle(tmp_path / "two.zip", [newer]))
    assert invdyn.load("a-v0").metrics["heldout_mse"] == pytest.approx(5.01)


def test_a_pinned_bundle_is_refused_unless_its_sha256_matches(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    wrong = "f" * 64
    with pytest.raises(invdyn.ChecksumError, match=f"not the pinned {wrong}"):
        invdyn.fetch(bundle, sha256=wrong)
    with FileServer(tmp_path) as server:
        with pytest.raises(invdyn.ChecksumError, match=wrong):
            invdyn.fetch(server.url(bundle.name), sha256=wrong, progress=False)
        assert not model_cache_dir().exists() or not list(model_cache_dir().glob("a-v0"))
        assert _leftovers(Path(os.environ["INVDYN_HOME"])) == []
        assert invdyn.fetch(server.url(bundle.name), sha256=sha.upper(), progress=False) == ["a-v0"]
    assert invdyn.fetch(bundle, sha256=sha) == ["a-v0"]
