"""Real races between processes (spawned together, released by one barrier): one result, no corrupt file.

- two processes preparing the same dataset's Arrow cache: one parses, the other reads its result;
- processes fetching two versions of the same bundle while another keeps loading it: every load sees one
  whole version (checksums of every file match), the cache ends with one good copy;
- two processes asking for the same missing sim-* dataset: it is simulated once, both get the same data;
- two `simulate` runs writing the same file: the survivor is complete.
"""

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_d4rl_file
from helpers.models import FileServer, make_model_dir

import invdyn
from invdyn.settings import model_cache_dir

CTX = mp.get_context("spawn")  # a fresh interpreter per racer, like separate jobs / Ray workers
TIMEOUT = 120


def _leftovers(root: Path) -> list[str]:
    """Temp / partial files a crash-safe writer must not leave behind (lock files are fine)."""
    marks = (".tmp-", ".old-", ".fetch-", ".part")
    return sorted(str(p) for p in root.rglob("*") if any(m in p.name for m in marks))


def _race(target, args_list):
    """Start one process per args tuple; each waits on a shared barrier, then runs target(*args)."""
    barrier = CTX.Barrier(len(args_list))
    queue = CTX.Queue()
    procs = [CTX.Process(target=_racer, args=(barrier, queue, target, a)) for a in args_list]
    for p in procs:
        p.start()
    results = [queue.get(timeout=TIMEOUT) for _ in procs]
    for p in procs:
        p.join(TIMEOUT)
        assert p.exitcode == 0
    errors = [r for r in results if isinstance(r, str) and r.startswith("ERROR")]
    assert errors == []
    return results


def _racer(barrier, queue, target, args):
    barrier.wait()
    try:
        queue.put(target(*args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        queue.put(f"ERROR {type(e).__name__}: {e}")


def _prepare(path):
    from pipeline.data.sources import load_transitions

    t = load_transitions(path)
    return {"hit": t.stats["cache_hit"], "cache": t.stats["cache"], "n": len(t), "sum": float(t.obs.sum())}


def test_two_processes_prepare_one_cache(tmp_path):
    path = tmp_path / "data.hdf5"
    write_d4rl_file(path, episodes=(4000, 3000, 5000), obs_dim=11, act_dim=3)
    results = _race(_prepare, [(str(path),), (str(path),)])
    assert sorted(r["hit"] for r in results) == [False, True]  # parsed once, read once
    assert len({r["cache"] for r in results}) == 1 and len({(r["n"], r["sum"]) for r in results}) == 1
    arrows = list(Path(os.environ["INVDYN_HOME"]).rglob("*.arrow"))
    assert [str(a) for a in arrows] == [results[0]["cache"]]
    assert _leftovers(Path(os.environ["INVDYN_HOME"])) == []
    from pipeline.data.sources import load_transitions

    t = load_transitions(str(path))
    assert t.stats["cache_hit"] and len(t) == results[0]["n"]


def _fetch(url):
    return invdyn.fetch(url, force=True, progress=False)


def _load_loop(name, seconds):
    """Load `name` again and again; count whole loads, fail on anything half-installed."""
    deadline, loads, missing = time.monotonic() + seconds, 0, 0
    versions = set()
    while time.monotonic() < deadline:
        try:
            model = invdyn.load(name)  # checks every file against the checksums it was installed with
        except invdyn.ModelNotFoundError:
            missing += 1
            continue
        versions.add(model.metrics["heldout_mse"])
        loads += 1
    return {"loads": loads, "missing": missing, "versions": sorted(versions)}


def test_fetches_of_one_bundle_race_a_reader(tmp_path):
    www = tmp_path / "www"
    v1 = invdyn.write_bundle(
        www / "v1.zip", [make_model_dir(tmp_path / "v1" / "a-v0", seed=1, hidden_dim=256)]
    )
    v2 = invdyn.write_bundle(
        www / "v2.zip", [make_model_dir(tmp_path / "v2" / "a-v0", seed=2, hidden_dim=256)]
    )
    with FileServer(www) as server:
        urls = [server.url(v1.name), server.url(v2.name), server.url(v1.name)]
        results = _race(_call, [(_fetch, (u,)) for u in urls] + [(_load_loop, ("a-v0", 5))])
    assert results.count(["a-v0"]) == 3
    reader = next(r for r in results if isinstance(r, dict))
    assert reader["loads"] > 0, reader
    assert all(v in (pytest.approx(1.01), pytest.approx(2.01)) for v in reader["versions"]), reader
    final = invdyn.load("a-v0")  # one whole version, every checksum checked
    assert final.metrics["heldout_mse"] in (pytest.approx(1.01), pytest.approx(2.01))
    assert sorted(p.name for p in model_cache_dir().iterdir() if not p.name.startswith(".")) == ["a-v0"]
    assert _leftovers(Path(os.environ["INVDYN_HOME"])) == []


def _call(fn, args):
    return fn(*args)


def _prepare_sim(name, marker_dir):
    """load_transitions of a missing sim-* name; records (in marker_dir) every simulate() it really runs."""
    import pipeline.sim.simulate as sim
    from pipeline.data.sources import load_transitions

    real = sim.simulate

    def counting(*a, **kw):
        Path(marker_dir, f"simulated-{os.getpid()}").touch()
        return real(*a, **kw)

    sim.simulate = counting
    t = load_transitions(name)
    return {"n": len(t), "sha": t.sha256, "sum": float(np.asarray(t.act).sum())}


@pytest.mark.slow
def test_two_processes_simulate_one_missing_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "3000")
    markers = tmp_path / "markers"
    markers.mkdir()
    name = "sim-hopper-random-v0"
    results = _race(_prepare_sim, [(name, str(markers)), (name, str(markers))])
    assert len(list(markers.iterdir())) == 1  # simulated once; the other waited for the file
    assert results[0] == results[1] and results[0]["n"] > 2000
    d4rl = Path(os.environ["D4RL_DATASET_DIR"])
    assert sorted(p.name for p in d4rl.iterdir() if not p.name.endswith(".lock")) == [f"{name}.hdf5"]
    assert _leftovers(d4rl) == [] and _leftovers(Path(os.environ["INVDYN_HOME"])) == []


def _simulate_to(name, out):
    from pipeline.sim.simulate import simulate

    return str(simulate(name, transitions=2000, seed=0, out_dir=out, workers=1, progress=False))


@pytest.mark.slow
def test_two_simulate_runs_write_the_same_file(tmp_path):
    out = tmp_path / "out"
    results = _race(_simulate_to, [("sim-halfcheetah-random-v0", str(out))] * 2)
    assert len(set(results)) == 1
    from pipeline.data.readers import read_hdf5

    t = read_hdf5(results[0])
    assert len(t) == 2000 and t.qpos is not None
    assert _leftovers(out) == [] and [p.name for p in out.iterdir()] == ["sim-halfcheetah-random-v0.hdf5"]
