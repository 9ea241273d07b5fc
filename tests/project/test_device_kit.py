"""The GPU device kit (bench/device/) checked on the CPU: the scripts parse, datasets survive packing bit for
bit, Ray's wheel loses its jar with a RECORD pip accepts, the kit's pins cover what Ray needs beyond the GPU
image, and run.sh records a failed step and still runs the next."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from helpers.paths import REPO

ROOT = REPO
DEVICE = ROOT / "bench" / "device"
sys.path.insert(0, str(DEVICE))

import kit_data  # noqa: E402
import kit_manifest  # noqa: E402
import kit_wheels  # noqa: E402


def _sh(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize("script", ["run.sh", "make_kit.sh"])
def test_scripts_parse_and_explain_themselves(script):
    assert _sh("-n", DEVICE / script).returncode == 0
    helped = _sh(DEVICE / script, "--help")
    assert helped.returncode == 0, helped.stderr
    assert "--python" in helped.stdout if script == "make_kit.sh" else "--quick" in helped.stdout
    bad = _sh(DEVICE / script, "--no-such-option")
    assert bad.returncode == 2 and "--no-such-option" in bad.stderr


def test_run_sh_wants_an_output_folder():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = _sh(DEVICE / "run.sh", "--device", "cpu", env=env)
    assert r.returncode == 2 and "OUT" in r.stderr


def test_packed_dataset_reads_as_the_same_transitions(sim_files, tmp_path):
    from pipeline.data.catalog import CATALOG
    from pipeline.data.readers import read_hdf5

    src = sim_files["sim-hopper-random-v0"]
    info = kit_data.pack(src, tmp_path / "packed.npz.xz")
    assert info["bytes"] < src.stat().st_size / 2  # without infos/qpos, qvel and the shared next rows
    back = kit_data.unpack(tmp_path / "packed.npz.xz", tmp_path / "d4rl")
    assert back.name == "sim-hopper-random-v0.hdf5"
    entry = CATALOG["sim-hopper-random-v0"]
    a, b = (read_hdf5(p, name=entry["name"], expect=entry) for p in (src, back))
    for field in ("obs", "act", "next_obs", "episode"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert b.stats["env_id"] == a.stats["env_id"] and b.stats["policy"] == a.stats["policy"]


def _member_digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(path: Path, members: dict[str, bytes], executable=()) -> None:
    """A wheel-layout zip with a correct RECORD (as a build backend writes it)."""
    record = "demo-1.0.dist-info/RECORD"
    rows = [[n, _member_digest(d), str(len(d))] for n, d in members.items()] + [[record, "", ""]]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = ((0o755 if name in executable else 0o644) | stat.S_IFREG) << 16
            z.writestr(info, data)
        z.writestr(record, out.getvalue())


def test_repacked_wheel_drops_the_jar_keeps_modes_and_installs(tmp_path):
    members = {
        "ray/__init__.py": b"VERSION = 'demo'\n",
        "ray/core/raylet": b"#!/bin/sh\necho raylet\n",
        "ray/jars/ray_dist.jar": os.urandom(4096),
        "ray/rllib/__init__.py": b"",
        "ray/dashboard/client/build/main.js.map": b"{}",
        "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
        "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    src = tmp_path / "src" / "demo-1.0-py3-none-any.whl"
    src.parent.mkdir()
    _write_wheel(src, members, executable={"ray/core/raylet"})
    info = kit_wheels.repack(src, tmp_path / "out")
    dst = tmp_path / "out" / src.name
    assert info["removed"] == 3
    assert kit_wheels.check(dst) == []
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert "ray/jars/ray_dist.jar" not in names and "ray/rllib/__init__.py" not in names
        assert (z.getinfo("ray/core/raylet").external_attr >> 16) & 0o111
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)]
    subprocess.run([*pip, str(dst)], check=True, capture_output=True, timeout=120)
    assert os.access(site / "ray" / "core" / "raylet", os.X_OK)
    assert not (site / "ray" / "jars").exists()


def test_wheel_check_finds_a_changed_member(tmp_path):
    path = tmp_path / "demo-1.0-py3-none-any.whl"
    _write_wheel(path, {"demo/__init__.py": b"x = 1\n"})
    with zipfile.ZipFile(path) as z:
        record = z.read("demo-1.0.dist-info/RECORD")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("demo/__init__.py", b"x = 2\n")
        z.writestr("demo-1.0.dist-info/RECORD", record)
    assert kit_wheels.check(path) == ["demo/__init__.py: hash differs from RECORD"]


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str, extras: set[str]) -> set[str]:
    """Names this distribution requires on Python 3.12 with these extras (installed metadata)."""
    from packaging.requirements import Requirement

    names = set()
    for line in metadata.requires(dist) or []:
        req = Requirement(line)
        env = {"python_version": "3.12", "extra": ""}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            names.add(_normalized(req.name))
    return names


def test_kit_pins_cover_what_ray_tune_and_train_need_beyond_the_gpu_image():
    pins = re.search(r"PINS=\((.*?)\)", (DEVICE / "make_kit.sh").read_text(), re.S).group(1)
    pinned = {_normalized(p.split("==")[0]) for p in pins.split()}
    lines = (DEVICE / "gpu_image_packages.txt").read_text().splitlines()
    image = {_normalized(x) for x in lines if x.strip() and not x.startswith("#")}
    assert {"ray", "jsonschema", "mlflow", "gymnasium", "mujoco"}.isdisjoint(image)
    todo, seen, uncovered = [("ray", {"tune", "train"})], set(), set()
    while todo:
        dist, extras = todo.pop()
        for name in _requirements(dist, extras) - seen:
            seen.add(name)
            if name in pinned:
                todo.append((name, set()))
            elif name not in image:
                uncovered.add(name)
    assert uncovered == set(), f"add to make_kit.sh's PINS (the GPU image lacks them): {sorted(uncovered)}"


def test_manifest_check_names_the_fix(tmp_path, sim_files):
    kit = tmp_path / "kit"
    kit_data.pack(sim_files["sim-hopper-random-v0"], kit / "data" / "sim-hopper-random-v0.npz.xz")
    (kit / "wheels").mkdir()
    (kit / "wheels" / "x-1.0-py3-none-any.whl").write_bytes(b"not really")
    kit_manifest.write(kit, "3.9", ["sim-hopper-random-v0"])
    problems = kit_manifest.check(kit, need_wheels=True)
    assert any("make_kit.sh --python" in p for p in problems)
    (kit / "data" / "sim-hopper-random-v0.npz.xz").write_bytes(b"changed")
    assert any("differs from its sha256" in p for p in kit_manifest.check(kit, need_wheels=False))


def test_run_sh_records_a_failed_step_and_runs_the_next(tmp_path, sim_files):
    """A kit whose manifest lists a wheel that is not there: `check` fails, `data` and `env` still run, and
    the three files come back (run.sh --no-install uses this venv's Ray; no network, no GPU)."""
    data_dir = sim_files["sim-hopper-random-v0"].parent
    kit = tmp_path / "kit"
    env = {**os.environ, "PYTHON": sys.executable}
    made = _sh(
        DEVICE / "make_kit.sh", "--no-wheels", "--datasets", "sim-hopper-random-v0", "--data-dir", data_dir,
        "--out", kit, env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    manifest = json.loads((kit / "MANIFEST.json").read_text())
    manifest["data"].append({"file": "gone.npz.xz", "bytes": 1, "sha256": "0" * 64})
    (kit / "MANIFEST.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    r = _sh(
        DEVICE / "run.sh", "--device", "cpu", "--no-install", "--kit", kit, "--only", "check,data,env", out,
        env=env,
    )  # fmt: skip
    assert r.returncode == 3, r.stdout + r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "tables.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("check", "failed (rc 1)"),
        ("data", "ok"),
        ("env", "ok"),
    ]
    assert summary["env"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "| check | failed (rc 1) |" in (out / "tables.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        check_log = tar.extractfile("logs/check.log").read().decode()
        assert "gone.npz.xz is missing" in check_log
        assert "sim-hopper-random-v0.hdf5" in tar.extractfile("logs/data.log").read().decode()


def test_run_sh_budget_spent_runs_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    r = _sh(DEVICE / "run.sh", "--device", "cpu", "--no-install", "--budget", "10", tmp_path / "out", env=env)
    assert r.returncode == 3
    status = {
        s["step"]: s["status"] for s in json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    }
    assert {status.pop(k) for k in ("check", "data", "env", "throughput", "job")} == {"no time left"}
    assert set(status.values()) <= {"no time left", "not in checkout"}  # population, job_population


def test_report_reads_a_benchs_markdown_table():
    import report

    text = "title\n| contender | train samples/s |\n|---|---|\n| ours fp32 | 1,234 |\n\n"
    text += "| K | x |\n|--|--|\n| 9 | 2 |"
    assert report.parse_tables(text) == [
        {"contender": "ours fp32", "train samples/s": "1,234"},
        {"K": "9", "x": "2"},
    ]


def test_capacity_places_longest_first_and_takes_only_full_gpu_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import capacity

    assert capacity.makespan([3, 3, 2, 2, 2], 2) == 7  # longest first: {3, 2, 2} and {3, 2}
    assert capacity.makespan([5, 1, 1, 1], 4) == 5
    (tmp_path / "summary.json").write_text(json.dumps({"device": "cpu", "quick": True}))
    with pytest.raises(SystemExit, match="not a full --device cuda run"):
        capacity.device_run_rates(tmp_path)
