"""Oracle planners from the committed agents: the plan a perfect state planner would give, so an IDM can be
judged by whether executing the plans brings the return (`pipeline.sim.closed_loop`).

At each step the plan is the observation reached from the env's *true* current state (copied into a second
env) under the actor's mean action; for a jumpy model (k > 1) it is k actor steps ahead. `expert` plans an
expert's motion, `medium` a medium one. Plan noise, ŝ + σ·std·ε, is the runner's (one ε stream per episode).
The IDM only ever sees the plan, never the actor's action.
"""

from __future__ import annotations

import numpy as np

from pipeline.data.catalog import DatasetError
from pipeline.sim.agent_policy import CHECKPOINTS
from pipeline.sim.agent_rollout import _actor
from pipeline.sim.rollout import make_env

#: planners a closed loop can be run with: the committed agents' checkpoints
PLANNERS = CHECKPOINTS


class OraclePlanner:
    """Plans ŝ_{t+k} for a batch of live episodes from their true MuJoCo states (see the module doc)."""

    def __init__(self, env_name: str, planner: str = "expert", k: int = 1):
        import mujoco

        if planner not in PLANNERS:
            raise DatasetError(f"unknown planner {planner!r}; choose one of {', '.join(PLANNERS)}")
        if k < 1:
            raise DatasetError(f"plan horizon k must be >= 1, got {k}")
        self.env_name, self.planner, self.k = env_name, planner, k
        self.actor = _actor(env_name, planner)
        self.env = make_env(env_name)  # the planner's own env: the episodes' envs are never touched
        self._spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self._size = mujoco.mj_stateSize(self.env.model, self._spec)

    def close(self) -> None:
        self.env.close()

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The actor's mean action for a batch of observations (what the oracle plans with)."""
        import torch

        with torch.no_grad():
            return self.actor.act(np.asarray(obs, np.float32))

    def state_of(self, env) -> np.ndarray:
        """An episode env's full integration state (qpos, qvel, warm start, time...)."""
        import mujoco

        state = np.empty(self._size)
        mujoco.mj_getState(env.model, env.data, state, self._spec)
        return state

    def plan(self, envs: list, obs: np.ndarray) -> np.ndarray:
        """ŝ_{t+k} for each episode env in `envs` (their current observations `obs`, one row each): k steps
        of the actor's mean action from each env's true state, in the planner's env."""
        import mujoco

        model, data, env = self.env.model, self.env.data, self.env
        states = np.stack([self.state_of(e) for e in envs])
        current = np.asarray(obs, np.float64)
        for _ in range(self.k):
            actions = self.act(current).astype(np.float64)
            nxt = np.empty_like(current)
            for i in range(len(envs)):
                mujoco.mj_setState(model, data, states[i], self._spec)
                env.do_simulation(actions[i], env.frame_skip)
                nxt[i] = env._get_obs()
                if self.k > 1:
                    mujoco.mj_getState(model, data, states[i], self._spec)
            current = nxt
        return current
