"""Shared test setup: every test runs with its own invdyn home, D4RL dir and HOME, never the user's."""

import pytest
from helpers.float_order import summed_in_another_order


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path_factory, monkeypatch):
    """Point every place invdyn / pipeline read or write at fresh temp folders (per test)."""
    root = tmp_path_factory.mktemp("env")
    for var, sub in (("INVDYN_HOME", "invdyn-home"), ("D4RL_DATASET_DIR", "d4rl"), ("HOME", "home")):
        (root / sub).mkdir()
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.delenv("INVDYN_OFFLINE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


# ---- datasets: simulated files for any test, and a writer of D4RL-layout files ----


@pytest.fixture(scope="session")
def sim_files(tmp_path_factory):
    """name -> Path of small simulated D4RL-layout files (real MuJoCo rollouts), made once per session.

    Pass a path as the dataset spec: `load_transitions(str(sim_files["sim-hopper-random-v0"]))`.
    """
    from pipeline.sim.simulate import simulate

    out = tmp_path_factory.mktemp("sim-datasets")
    sizes = {"sim-halfcheetah-random-v0": 6000, "sim-hopper-random-v0": 6000}
    return {
        name: simulate(name, transitions=n, seed=0, out_dir=out, workers=1, progress=False)
        for name, n in sizes.items()
    }


def write_d4rl_file(
    path,
    episodes=(5, 7, 4),
    obs_dim=3,
    act_dim=2,
    *,
    dtype="float32",
    next_obs=True,
    timeouts=True,
    terminal_episodes=(0,),
    seed=0,
    **extra,
):
    """Write a D4RL-layout HDF5 file whose rows encode where they are: obs[:, 0] = episode, obs[:, 1] = step.

    A pair (obs, next_obs) is inside one episode iff next_obs[:, 0] == obs[:, 0] and next_obs[:, 1] ==
    obs[:, 1] + 1. Episodes in `terminal_episodes` end with terminals=1, the others with timeouts=1.
    `extra` keys are written as given (None deletes a key). Returns the dict of arrays written.
    """
    import h5py
    import numpy as np

    rng = np.random.default_rng(seed)
    n = sum(episodes)
    ep = np.repeat(np.arange(len(episodes)), episodes)
    step = np.concatenate([np.arange(k) for k in episodes])
    obs = rng.normal(size=(n, obs_dim))
    obs[:, 0], obs[:, 1] = ep, step
    nxt = obs.copy()
    nxt[:, 1] += 1
    nxt[:, 2:] = rng.normal(size=(n, obs_dim - 2))
    ends = np.cumsum(episodes) - 1
    term, tout = np.zeros(n, bool), np.zeros(n, bool)
    for e, (end, length) in enumerate(zip(ends, episodes, strict=True)):
        if length:
            (term if e in terminal_episodes else tout)[end] = True
    data = {
        "observations": obs.astype(dtype),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(dtype),
        "rewards": rng.normal(size=n).astype(dtype),
        "terminals": term,
        "timeouts": tout,
        "next_observations": nxt.astype(dtype),
    }
    if not next_obs:
        del data["next_observations"]
    if not timeouts:
        del data["timeouts"]
    for k, v in extra.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v)
    return data


@pytest.fixture
def d4rl_file(tmp_path):
    """Factory: d4rl_file(name="x.hdf5", **write_d4rl_file kwargs) -> (path, arrays)."""

    def make(name="data.hdf5", **kw):
        path = tmp_path / name
        return path, write_d4rl_file(path, **kw)

    return make


# ---- hardening: how many hostile-input cases ran, printed in the terminal summary ----


@pytest.fixture
def hostile_case(request):
    """count(kind): record one executed hostile-input case (hypothesis example or explicit case) of `kind`."""
    counts = request.config.stash.setdefault(_HOSTILE_KEY, {})

    def count(kind: str, n: int = 1) -> None:
        counts[kind] = counts.get(kind, 0) + n

    return count


_HOSTILE_KEY = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, config):
    counts = config.stash.get(_HOSTILE_KEY, {})
    if counts:
        terminalreporter.write_sep("-", f"hostile-input cases executed: {sum(counts.values())}")
        for kind, n in sorted(counts.items()):
            terminalreporter.write_line(f"{kind:>28}: {n}")


def pytest_report_header(config):
    """The CPU kind on the first lines of every run: float32 / bf16 rounding differs between kinds."""
    from pipeline.machine import cpu_line

    return f"cpu: {cpu_line()}"


@pytest.fixture(params=["as_built", "another_order"])
def summation(request):
    """Each equivalence test runs twice: with the population's matmuls as built, and summed in another
    order (`summed_in_another_order`), so it passes for the right reason on every CPU kind."""
    if request.param == "as_built":
        yield request.param
        return
    with summed_in_another_order():
        yield request.param
