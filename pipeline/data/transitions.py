"""The one in-memory shape of a prepared dataset: aligned transition arrays plus provenance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Transitions:
    """Pairs `(obs[i], act[i], next_obs[i])` that never cross an episode boundary.

    obs, next_obs: float32 (N, obs_dim); act: float32 (N, act_dim); episode: int64 (N,), the
    episode each pair came from (used for the episode split). qpos / qvel (float64, (N, nq) / (N, nv))
    hold the simulator state at `obs[i]` when the source file has `infos/qpos`, `infos/qvel`, else None.
    `stats` holds transitions, episodes, obs_dim, act_dim, act_min, act_max, sha256 (of the source file),
    source (path), env_id (Gymnasium id when known) and anything else the reader learned.
    """

    name: str
    obs: np.ndarray
    act: np.ndarray
    next_obs: np.ndarray
    episode: np.ndarray
    qpos: np.ndarray | None = None
    qvel: np.ndarray | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.act.shape[1])

    @property
    def sha256(self) -> str:
        return str(self.stats.get("sha256", ""))
