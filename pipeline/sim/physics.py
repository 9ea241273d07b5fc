"""Replay recorded states in MuJoCo to judge an IDM by what its actions do, not only by action MSE: the
one-step error and the closed-loop tracking drift (see `physics_metrics`)."""

from __future__ import annotations

import json

import numpy as np

from pipeline.data.catalog import CATALOG, SIM_ENVS
from pipeline.sim.rollout import log_mujoco_warnings

#: dataset family (the name's first word, after an optional "sim-") -> Gymnasium environment
ENV_IDS = {family: spec["env_id"] for family, spec in SIM_ENVS.items()}

#: largest normalized difference between the env's observation of a recorded state and the recorded
#: observation for which we call the two "the same" (float32 storage rounds at ~1e-6 of that scale)
STATE_OBS_TOLERANCE = 1e-3


class PhysicsUnavailable(Exception):
    """The dataset cannot be replayed in a simulator; `str(err)` says why (reported, not fatal)."""


def env_id_for(transitions) -> str:
    """The Gymnasium id a dataset was recorded in: stats["env_id"], else from its name (D4RL / sim-*)."""
    env_id = (transitions.stats or {}).get("env_id")
    if env_id:
        return str(env_id)
    name = transitions.name.lower()
    family = name.removeprefix("sim-").split("-")[0]
    if family in ENV_IDS:
        return ENV_IDS[family]
    raise PhysicsUnavailable(
        f"dataset {transitions.name!r} has no known Gymnasium environment (known families: "
        f"{sorted(ENV_IDS)}; a simulated file names it in its 'env_id' attribute)"
    )


def env_kwargs_for(transitions) -> dict:
    """Keyword arguments of the env (e.g. Ant without contact forces): stats["env_kwargs"], else the
    catalog."""
    kwargs = (transitions.stats or {}).get("env_kwargs")
    if kwargs is None:
        kwargs = (CATALOG.get(transitions.name) or {}).get("env_kwargs") or {}
    return json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)


def zero_padding(transitions, env_obs_dim: int) -> int:
    """How many trailing observation dims the dataset has beyond the env's, if they are all zero.

    D4RL's ant files carry 84 contact-force dims that MuJoCo >= 2.0 left at zero after Ant's 27; the env
    reproduces the 27 and the zeros are appended. Any other extra dims are a mismatch (returns 0).
    """
    extra = transitions.obs_dim - env_obs_dim
    if extra <= 0:
        return 0
    zeros = not transitions.obs[:, env_obs_dim:].any() and not transitions.next_obs[:, env_obs_dim:].any()
    return extra if zeros else 0


def successor_mask(transitions) -> np.ndarray:
    """True at row i when row i+1 is the recorded continuation of row i (same episode, obs[i+1] ==
    next_obs[i])."""
    n = len(transitions)
    ok = np.zeros(n, dtype=bool)
    if n > 1:
        same = transitions.episode[1:] == transitions.episode[:-1]
        cont = np.isclose(transitions.obs[1:], transitions.next_obs[:-1], rtol=1e-5, atol=1e-6).all(axis=1)
        ok[:-1] = same & cont
    return ok


def window_starts(successor: np.ndarray, allowed: np.ndarray, horizon: int) -> np.ndarray:
    """Rows i in `allowed` from which `horizon` recorded steps follow without leaving the episode."""
    run = np.zeros(len(successor) + 1, dtype=np.int64)
    for i in range(len(successor) - 1, -1, -1):  # length of the unbroken chain of successors from i
        run[i] = run[i + 1] + 1 if successor[i] else 0
    return np.flatnonzero((run[:-1] >= horizon) & allowed)


def seeded_sample(rows: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    """Up to `n` of `rows`, sorted, drawn from stream `stream` of `seed` (0: one-step rows, 1: tracking
    starts)."""
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(rows, min(n, len(rows)), replace=False))


class Replay:
    """One unwrapped Gymnasium MuJoCo env that can be put into any recorded (qpos, qvel) and stepped.

    Stepping is the env's own `do_simulation` + `_get_obs` (exactly `env.step` without reward bookkeeping),
    so observation layouts are the env's, whatever it is.
    """

    def __init__(self, transitions, env_kwargs: dict | None = None):
        if transitions.qpos is None or transitions.qvel is None:
            raise PhysicsUnavailable(
                f"dataset {transitions.name!r} has no recorded simulator state (HDF5 keys 'infos/qpos', "
                "'infos/qvel'); physics metrics need them"
            )
        self.env_id = env_id_for(transitions)
        import gymnasium as gym  # lazily: evaluation without physics must not need MuJoCo

        log_mujoco_warnings()
        kwargs = env_kwargs if env_kwargs is not None else env_kwargs_for(transitions)
        try:
            self.env = gym.make(self.env_id, **kwargs).unwrapped
        except Exception as e:  # noqa: BLE001 - gymnasium raises many types for a missing/broken env
            raise PhysicsUnavailable(
                f"cannot make Gymnasium env {self.env_id!r}: {type(e).__name__}: {e}"
            ) from None
        self.model, self.data = self.env.model, self.env.data
        self.frame_skip = self.env.frame_skip
        self.env_obs_dim = self.env.observation_space.shape[0]
        self.pad = zero_padding(transitions, self.env_obs_dim)
        got = {
            "obs_dim": (transitions.obs_dim, self.env_obs_dim + self.pad),
            "act_dim": (transitions.act_dim, self.model.nu),
            "qpos": (transitions.qpos.shape[1], self.model.nq),
            "qvel": (transitions.qvel.shape[1], self.model.nv),
        }
        bad = [f"{k} {d} vs {e}" for k, (d, e) in got.items() if d != e]
        if bad:
            raise PhysicsUnavailable(
                f"dataset {transitions.name!r} does not fit {self.env_id} ({', '.join(bad)}: dataset vs env)"
            )
        self.transitions = transitions
        self.successor = successor_mask(transitions)
        self.bar = None  # an optional tqdm bar counting env steps
        #: during `rollout`, each start's current MuJoCo integration state (for act_fns that search in the
        #: sim)
        self.states = None

    def close(self) -> None:
        self.env.close()

    def _set(self, qpos, qvel) -> None:
        self.env.set_state(np.asarray(qpos, np.float64), np.asarray(qvel, np.float64))

    def _step(self, action) -> np.ndarray:
        self.env.do_simulation(np.asarray(action, np.float64), self.frame_skip)
        if self.bar is not None:
            self.bar.update()
        return self._obs()

    def _obs(self) -> np.ndarray:
        obs = self.env._get_obs()
        return np.concatenate([obs, np.zeros(self.pad)]) if self.pad else obs

    def observe(self, rows) -> np.ndarray:
        """The env's observation of the recorded states at `rows`, float64."""
        tr = self.transitions
        out = np.empty((len(rows), tr.obs_dim))
        for k, i in enumerate(rows):
            self._set(tr.qpos[i], tr.qvel[i])
            out[k] = self._obs()
        return out

    def state_obs_gap(self, rows, std) -> float:
        """Max normalized |env obs of recorded state - recorded obs|: ~1e-7 when obs is a function of
        state."""
        rows = np.asarray(rows)
        if len(rows) == 0:
            return 0.0
        d = len(std)
        return float(np.max(np.abs(self.observe(rows)[:, :d] - self.transitions.obs[rows, :d]) / std))

    def references(self, rows, std) -> tuple[np.ndarray, str]:
        """Reference next observations for `rows` (which must have a successor) and how they were made.

        Computed in float64 from the recorded next state (qpos, qvel) when observations are a function of
        that state (HalfCheetah, Hopper, Walker2d; checked on the data), so the float32 rounding of stored
        observations does not hide the floor; otherwise the recorded next_obs.
        """
        rows = np.asarray(rows)
        probe = rows[:: max(1, len(rows) // 64)] + 1
        if self.state_obs_gap(probe, std) <= STATE_OBS_TOLERANCE:
            return self.observe(rows + 1), "env observation of the recorded next state (float64)"
        return self.transitions.next_obs[rows].astype(np.float64), "recorded next_obs"

    def reference_trajectory(self, starts, horizon: int, std) -> np.ndarray:
        """Reference observations (len(starts), horizon, obs_dim) of the `horizon` recorded steps after
        each start."""
        steps = np.asarray(starts)[:, None] + np.arange(1, horizon + 1)[None, :]
        ref, _ = self.references(steps.reshape(-1) - 1, std)
        return ref.reshape(len(starts), horizon, -1)

    def step_from(self, rows, actions) -> np.ndarray:
        """Observation after one env step from each recorded state `rows[k]` with `actions[k]`."""
        tr = self.transitions
        out = np.empty((len(rows), tr.obs_dim))
        for k, i in enumerate(rows):
            self._set(tr.qpos[i], tr.qvel[i])
            out[k] = self._step(actions[k])
        return out

    def rollout(self, starts, horizon: int, act_fn) -> np.ndarray:
        """Closed-loop rollouts from each start; returns the simulated observations (len(starts), H, obs_dim).

        `act_fn(k, obs, targets)` gets the step index, the current simulated observations of all starts and
        the recorded observations to reach next, and returns one action per start (batched, so a network
        is called once per step). Each start's full integration state is kept between steps.
        """
        import mujoco

        tr = self.transitions
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        states = np.empty((len(starts), mujoco.mj_stateSize(self.model, spec)))
        obs = np.empty((len(starts), tr.obs_dim))
        for s, i in enumerate(starts):
            self._set(tr.qpos[i], tr.qvel[i])
            mujoco.mj_getState(self.model, self.data, states[s], spec)
            obs[s] = self._obs()
        out = np.empty((len(starts), horizon, tr.obs_dim))
        self.states = states
        for k in range(horizon):
            actions = np.asarray(act_fn(k, obs, tr.obs[np.asarray(starts) + k + 1]), dtype=np.float64)
            for s in range(len(starts)):
                mujoco.mj_setState(self.model, self.data, states[s], spec)
                obs[s] = self._step(actions[s])
                mujoco.mj_getState(self.model, self.data, states[s], spec)
            out[:, k] = obs
        return out


def normalized_rmse(a: np.ndarray, b: np.ndarray, std: np.ndarray, axis=None):
    """Root mean square of (a - b) / std over `axis` (all by default), on the first len(std) dims."""
    d = len(std)
    return np.sqrt(
        np.mean(((np.asarray(a, np.float64)[..., :d] - np.asarray(b)[..., :d]) / std) ** 2, axis=axis)
    )


#: every metric physics_metrics reports, None when it cannot be computed
_NULL_METRICS = dict.fromkeys(
    (
        "one_step_error",
        "one_step_baseline",
        "one_step_floor",
        "tracking_drift",
        "tracking_baseline",
        "tracking_floor",
        "drift_per_step",
        "baseline_drift_per_step",
        "floor_drift_per_step",
    )
)


def physics_metrics(
    transitions,
    predict,
    std: np.ndarray,
    mean_action: np.ndarray,
    allowed: np.ndarray,
    *,
    horizon: int,
    one_step_samples: int,
    tracking_starts: int,
    seed: int,
    env_kwargs: dict | None = None,
    progress: bool = False,
) -> dict:
    """One-step error and H-step tracking drift on rows in `allowed` (a bool mask, e.g. held-out episodes),
    both in normalized-state units (the model's observation normalizer).

    - one-step error: reset the simulator to the recorded state s_t, apply an action, compare the
      observation reached with the recorded s_{t+1}. With the recorded action this is the *floor*
      (floating-point level on simulated data: it proves the reset really restores the state).
    - closed-loop tracking: from a recorded state, for H steps, ask for the action toward the next
      recorded observation from the *simulated* current observation, step, and measure how far the
      simulated trajectory has drifted from the recorded one at every step.

    `predict(obs, next_obs)` maps raw observations (N, obs_dim) to actions (N, act_dim). Returns a dict of
    plain floats / lists; when the dataset cannot be simulated, every metric is None and "physics_reason"
    says why. The sizes (horizon, samples, starts, seed) come from the caller's evaluation config.
    """
    null = {**_NULL_METRICS, "horizon": horizon}
    try:
        replay = Replay(transitions, env_kwargs)
    except PhysicsUnavailable as e:
        return {**null, "physics_reason": str(e)}
    from tqdm.auto import tqdm

    desc = f"MuJoCo replay {transitions.name}"
    # disable=None: a bar on a terminal only, no carriage-return frames in a log file
    replay.bar = tqdm(desc=desc, unit="step", unit_scale=True, disable=None if progress else True)
    # padding dims are zero in data and simulation alike: leave them out of the RMSE instead of diluting it
    std = np.asarray(std, np.float64)[: replay.env_obs_dim]
    mean_action = np.asarray(mean_action, np.float64)
    try:
        rows = np.flatnonzero(replay.successor & allowed)
        if len(rows) == 0:
            return {**null, "physics_reason": "no held-out transition has a recorded next state"}
        # separate streams: the tracking starts do not depend on how many one-step samples were drawn
        rows = seeded_sample(rows, one_step_samples, seed, 0)
        result = {**_one_step(replay, rows, predict, std, mean_action), "horizon": horizon}
        starts = window_starts(replay.successor, allowed, horizon)
        if len(starts) == 0:
            reason = f"no held-out episode has {horizon + 1} consecutive recorded states"
            return {**null, **result, "physics_reason": reason}
        starts = seeded_sample(starts, tracking_starts, seed, 1)
        result.update(_tracking(replay, starts, horizon, predict, std, mean_action), physics_reason=None)
        return result
    finally:
        replay.bar.close()
        replay.close()


def _one_step(replay: Replay, rows, predict, std, mean_action) -> dict:
    """One-step error of the model's actions, of the mean action (baseline) and of the recorded ones
    (floor)."""
    tr = replay.transitions
    ref, ref_kind = replay.references(rows, std)
    pred = predict(tr.obs[rows], tr.next_obs[rows])
    baseline = np.broadcast_to(mean_action, pred.shape)
    return {
        "env_id": replay.env_id,
        "reference": ref_kind,
        "one_step_samples": int(len(rows)),
        "one_step_error": float(normalized_rmse(replay.step_from(rows, pred), ref, std)),
        "one_step_baseline": float(normalized_rmse(replay.step_from(rows, baseline), ref, std)),
        "one_step_floor": float(normalized_rmse(replay.step_from(rows, tr.act[rows]), ref, std)),
    }


def _tracking(replay: Replay, starts, horizon: int, predict, std, mean_action) -> dict:
    """Drift per step of the closed loop under the model, the mean action and the recorded actions."""
    tr = replay.transitions
    ref_traj = replay.reference_trajectory(starts, horizon, std)
    policies = {
        "drift_per_step": lambda k, o, target: predict(o.astype(np.float32), target),
        "baseline_drift_per_step": lambda k, o, target: np.broadcast_to(
            mean_action, (len(o), len(mean_action))
        ),
        "floor_drift_per_step": lambda k, o, target: tr.act[starts + k],
    }
    out = {}
    for key, act_fn in policies.items():
        sim = replay.rollout(starts, horizon, act_fn)
        out[key] = normalized_rmse(sim, ref_traj, std, axis=(0, 2)).tolist()
    return {
        **out,
        "tracking_starts": int(len(starts)),
        "tracking_drift": out["drift_per_step"][-1],
        "tracking_baseline": out["baseline_drift_per_step"][-1],
        "tracking_floor": out["floor_drift_per_step"][-1],
    }
