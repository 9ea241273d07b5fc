"""Simulated datasets are real MuJoCo physics: every recorded step replays exactly from infos/qpos,
infos/qvel."""

import signal
import subprocess
import sys
import time

import gymnasium
import h5py
import numpy as np
import psutil
import pytest

import pipeline.sim.simulate
from pipeline.data.catalog import CATALOG, SIM_ENVS, SUITES, DatasetError
from pipeline.data.sources import load_transitions
from pipeline.sim.simulate import GENERATOR, simulate


def replay_errors(path, rows):
    """Max |obs - env obs at recorded state| and |next_obs - env stepped with recorded action| over `rows`."""
    with h5py.File(path, "r") as f:
        env_id, kwargs = f.attrs["env_id"], CATALOG[f.attrs["name"]]["env_kwargs"]
        obs, act, nxt = f["observations"][()], f["actions"][()], f["next_observations"][()]
        qpos, qvel = f["infos/qpos"][()], f["infos/qvel"][()]
    env = gymnasium.make(env_id, **kwargs).unwrapped  # a fresh env, built with the public API only
    env.reset(seed=12345)
    err_obs = err_next = 0.0
    for i in rows:
        env.set_state(qpos[i], qvel[i])
        err_obs = max(err_obs, np.abs(env._get_obs() - obs[i]).max())
        stepped, *_ = env.step(act[i])
        err_next = max(err_next, np.abs(stepped - nxt[i]).max())
    return err_obs, err_next


@pytest.mark.parametrize("name", ["sim-halfcheetah-random-v0", "sim-hopper-random-v0"])
def test_session_files_replay_in_mujoco(sim_files, name):
    path = sim_files[name]
    rows = np.random.default_rng(0).choice(6000, 150, replace=False)
    err_obs, err_next = replay_errors(path, rows)
    assert err_obs < 1e-5 and err_next < 1e-5  # float32 storage of the same physics


@pytest.mark.parametrize("name", ["sim-walker2d-gait-v0", "sim-ant-ou-v0", "sim-hopper-mixed-v0"])
def test_other_envs_and_policies_replay(tmp_path, name):
    path = simulate(name, transitions=800, seed=1, out_dir=tmp_path, workers=1, progress=False)
    with h5py.File(path, "r") as f:
        assert f.attrs["generator"] == GENERATOR and f.attrs["policy"] == CATALOG[name]["policy"]
        assert f["observations"].shape == (800, CATALOG[name]["obs_dim"])
    assert max(replay_errors(path, range(0, 800, 9))) < 1e-5
    stats = load_transitions(str(path)).stats
    assert stats["env_id"] == CATALOG[name]["env_id"] and stats["env_kwargs"] == CATALOG[name]["env_kwargs"]


def test_episode_boundaries_are_real(sim_files):
    with h5py.File(sim_files["sim-hopper-random-v0"], "r") as f:
        obs, nxt = f["observations"][()], f["next_observations"][()]
        term, tout, qpos = f["terminals"][()], f["timeouts"][()], f["infos/qpos"][()]
    done = term | tout
    # inside an episode the next observation is the following row; at a boundary the body was reset
    assert np.array_equal(nxt[:-1][~done[:-1]], obs[1:][~done[:-1]])
    assert term.sum() > 50 and tout[-1]  # random hopper falls often; the last episode is cut by the size
    # hopper terminates when unhealthy: torso height (qpos[1]) below 0.7 or an angle out of range
    env = gymnasium.make("Hopper-v5").unwrapped
    healthy_z, healthy_angle = env._healthy_z_range, env._healthy_angle_range
    z, angle = nxt[term][:, 0], nxt[term][:, 1]
    assert np.all((z < healthy_z[0]) | (angle < healthy_angle[0]) | (angle > healthy_angle[1]))
    assert np.all(qpos[1:][done[:-1]][:, 1] > healthy_z[0])  # every new episode starts healthy


def test_loaded_transitions_carry_states_and_env(sim_files):
    t = load_transitions(str(sim_files["sim-halfcheetah-random-v0"]))
    assert t.name == "sim-halfcheetah-random-v0" and t.stats["env_id"] == "HalfCheetah-v5"
    assert len(t) == 6000 and t.qpos.shape == (6000, 9) and t.qvel.shape == (6000, 9)
    np.testing.assert_allclose(t.obs[:, :8], t.qpos[:, 1:], atol=1e-6)  # HalfCheetah obs = qpos[1:], qvel


def test_policies_differ_in_temporal_structure(tmp_path):
    def lag1(name):
        path = simulate(name, transitions=2000, seed=0, out_dir=tmp_path, workers=1, progress=False)
        with h5py.File(path, "r") as f:
            a = f["actions"][()]
        return np.mean([np.corrcoef(a[:-1, j], a[1:, j])[0, 1] for j in range(a.shape[1])])

    assert abs(lag1("sim-halfcheetah-random-v0")) < 0.1
    assert lag1("sim-halfcheetah-ou-v0") > 0.6 and lag1("sim-halfcheetah-gait-v0") > 0.6


def test_reproducible_and_independent_of_worker_count(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.sim.simulate, "CHUNK", 1000)  # several chunks from a small dataset
    name, n = "sim-hopper-ou-v0", 3500
    one = simulate(name, transitions=n, seed=7, out_dir=tmp_path / "w1", workers=1, progress=False)
    two = simulate(name, transitions=n, seed=7, out_dir=tmp_path / "w2", workers=2, progress=False)
    other = simulate(name, transitions=n, seed=8, out_dir=tmp_path / "s8", workers=1, progress=False)
    with h5py.File(one) as a, h5py.File(two) as b, h5py.File(other) as c:
        for key in ("observations", "actions", "next_observations", "terminals", "timeouts", "infos/qpos"):
            assert np.array_equal(a[key][()], b[key][()]), key
        assert not np.array_equal(a["actions"][()], c["actions"][()])
    assert not list((tmp_path / "w2").glob(".*"))  # no temp files left behind


def test_sim_name_is_generated_on_demand(monkeypatch):
    monkeypatch.setenv("INVDYN_SIM_TRANSITIONS", "1500")
    t = load_transitions("sim-walker2d-random-v0")
    assert len(t) == 1500  # next_observations keep every row
    assert t.stats["source"].endswith("sim-walker2d-random-v0.hdf5") and t.stats["env_id"] == "Walker2d-v5"
    with pytest.raises(DatasetError, match="simulation is off"):
        load_transitions("sim-ant-random-v0", simulate=False)


def test_sim_suite_and_names():
    assert SUITES["sim"] == ["sim-halfcheetah-mixed-v0", "sim-hopper-mixed-v0", "sim-walker2d-mixed-v0"]
    assert all(CATALOG[n]["url"] is None and n.startswith("sim-") for n in CATALOG if CATALOG[n]["simulated"])
    assert {CATALOG[f"sim-{e}-random-v0"]["env_id"] for e in SIM_ENVS} == {
        "HalfCheetah-v5",
        "Hopper-v5",
        "Walker2d-v5",
        "Ant-v5",
    }


def test_cli_writes_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.sim.simulate",
            "sim-hopper-gait-v0",
            "--transitions",
            "300",
            "--seed",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    path = out / "sim-hopper-gait-v0.hdf5"
    assert r.stdout.strip() == str(path)
    with h5py.File(path) as f:
        assert f["actions"].shape == (300, 3) and f.attrs["seed"] == 2
    assert pipeline.sim.simulate.main(["hopper-medium-v2"]) != 0  # a D4RL name is never simulated
    assert "'hopper-medium-v2': it is a D4RL dataset" in capsys.readouterr().err


def test_gait_and_ou_reach_states_random_never_reaches():
    """Hopper: a fifth of gait / ou rows lie outside everything a random policy visited (random itself:
    about 1 %)."""
    from pipeline.sim.rollout import rollout_chunk

    base = rollout_chunk("hopper", "random", 0, 0, 3000)["observations"]
    lo, hi = base.min(0), base.max(0)

    def outside(policy):
        obs = rollout_chunk("hopper", policy, 1, 0, 3000)["observations"]
        return np.mean(((obs < lo) | (obs > hi)).any(1))

    assert outside("random") < 0.05
    assert outside("gait") > 0.1 and outside("ou") > 0.1 and outside("mixed") > 0.05


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_simulation_writes_nothing_and_stops_its_workers(tmp_path, sig):
    """Ctrl-C / SIGTERM while worker processes roll out chunks: no dataset file, no temp file, no process
    left behind; the next run writes the whole file."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.simulate", "sim-hopper-random-v0", "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--transitions", "400000", "--workers", "2"], stderr=subprocess.PIPE, text=True
    )
    try:
        me = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(me.children(recursive=True)) < 3 and time.monotonic() < deadline:  # forkserver + 2
            time.sleep(0.05)
        workers = me.children(recursive=True)
        assert len(workers) >= 3, "the worker processes never started"
        time.sleep(1.0)  # mid-run: chunks are being rolled out
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode in (130, 143) and "Traceback" not in err, err
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], f"worker processes left running: {alive}"
    assert not out.exists() or list(out.iterdir()) == []  # no dataset, whole or half, and no temp file
    r = subprocess.run([*cmd, "--transitions", "3000"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["sim-hopper-random-v0.hdf5"]


def test_a_failing_worker_is_named_in_the_error():
    jobs = [("hopper", "random", 0, 0, 100, 50), ("hopper", "no-such-policy", 0, 1, 100, 50)]
    with pytest.raises(DatasetError, match=r"worker failed on chunk 1 .*no-such-policy.*ValueError"):
        pipeline.sim.simulate._run(jobs, workers=2, progress=False, desc="test")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["sim-hopper-random-v0", "sim-hopper-nosuch-v0"], "'sim-hopper-nosuch-v0': it is not a simulated"),
        (["sim-hopper-random-v0", "--workers", "0"], "--workers must be at least 1"),
        (["sim-hopper-random-v0", "--transitions", "-5"], "--transitions must be positive"),
        (["sim-hopper-random-v0", "--out", "{file}/sub"], "a file is in the way"),
    ],
)
def test_cli_checks_every_argument_before_the_first_rollout(tmp_path, capsys, args, said):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = [a.format(file=blocker) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if "--transitions" not in args:
        args += ["--transitions", "300"]
    assert pipeline.sim.simulate.main(args) == 2
    assert said in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.hdf5"))  # not even the valid first name was simulated
