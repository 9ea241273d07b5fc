"""The one in-memory shape of a prepared dataset (aligned transition arrays plus provenance), and the one
rule every reader ends in: pairing rows into transitions that never cross an episode boundary."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pipeline.data.catalog import DatasetError

log = logging.getLogger(__name__)

#: refuse a dataset when more than this fraction of its pairs has NaN / inf values
MAX_NONFINITE_FRACTION = 0.01


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


def make_transitions(
    name: str,
    where: str,
    obs: np.ndarray,
    act: np.ndarray,
    *,
    terminals: np.ndarray,
    timeouts: np.ndarray,
    next_obs: np.ndarray | None = None,
    qpos: np.ndarray | None = None,
    qvel: np.ndarray | None = None,
    stats: dict | None = None,
) -> Transitions:
    """Pair rows into transitions that never cross `terminals | timeouts`; drop (and count) non-finite pairs.

    With `next_obs`, row i is the pair (obs[i], act[i], next_obs[i]) and done rows are kept (their next
    observation is real). Without it, pair i uses obs[i + 1] and exists only when row i is not done.
    """
    n = len(obs)
    done = np.asarray(terminals, bool) | np.asarray(timeouts, bool)
    episode_of_row = (
        np.concatenate([[0], np.cumsum(done[:-1], dtype=np.int64)]) if n else np.zeros(0, np.int64)
    )
    if next_obs is not None:
        idx = np.arange(n)
        nxt = next_obs
    else:
        idx = np.flatnonzero(~done[:-1]) if n > 1 else np.zeros(0, np.int64)
        nxt = obs[idx + 1]
    o, a = obs[idx], act[idx]
    if len(idx) == 0:
        raise DatasetError(f"{where}: no transitions (empty data, or every episode has a single step)")
    for key, arr in (("observations", o), ("actions", a)):
        if arr.shape[1] == 0:
            raise DatasetError(f"{where}: key {key!r} has 0 values per row; a dataset needs at least one")
    finite = np.isfinite(o).all(1) & np.isfinite(a).all(1) & np.isfinite(nxt).all(1)
    bad = int(len(idx) - finite.sum())
    if bad:
        frac = bad / len(idx)
        if frac > MAX_NONFINITE_FRACTION:
            keys = [
                key
                for key, arr in (("observations", o), ("actions", a), ("next_observations", nxt))
                if not np.isfinite(arr).all()
            ]
            raise DatasetError(
                f"{where}: {bad} of {len(idx)} transitions ({frac:.1%}) have NaN/inf values (keys: "
                f"{', '.join(keys)}); at most {MAX_NONFINITE_FRACTION:.0%} are dropped silently. "
                "Fix or regenerate the file."
            )
        log.warning("%s: dropped %d transitions with NaN/inf values (%.2f%%)", where, bad, 100 * frac)
        idx, o, a, nxt = idx[finite], o[finite], a[finite], nxt[finite]
    _, episode = np.unique(episode_of_row[idx], return_inverse=True)
    act32 = np.ascontiguousarray(a, np.float32)
    stats = dict(stats or {})
    stats.update(
        transitions=int(len(idx)),
        episodes=int(episode.max()) + 1,
        obs_dim=int(o.shape[1]),
        act_dim=int(a.shape[1]),
        act_min=act32.min(0).tolist(),
        act_max=act32.max(0).tolist(),
        dropped_nonfinite=bad,
    )
    stats.setdefault("env_id", None)
    return Transitions(
        name=name,
        obs=np.ascontiguousarray(o, np.float32),
        act=act32,
        next_obs=np.ascontiguousarray(nxt, np.float32),
        episode=episode.astype(np.int64),
        qpos=None if qpos is None else np.ascontiguousarray(qpos[idx], np.float64),
        qvel=None if qvel is None else np.ascontiguousarray(qvel[idx], np.float64),
        stats=stats,
    )


def jump_pairs(t: Transitions, k: int) -> Transitions:
    """The k-step pairs `(obs[i], act[i], next_obs[i + k - 1])` = (s_t, a_t, s_{t+k}) of every i whose rows
    i..i+k-1 are consecutive pairs of one episode (`episode_links`). k = 1 returns `t` itself. Episode ids
    and simulator state stay those of row i; `stats["jump"]` records k."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DatasetError(f"jump must be an integer >= 1, got {k!r}")
    if k == 1:
        return t
    n = len(t)
    link = episode_links(t)
    breaks = np.concatenate([[0], np.cumsum(~link, dtype=np.int64)])  # breaks[j]: broken links before row j
    start = np.arange(max(n - k + 1, 0))
    idx = start[breaks[start + k - 1] == breaks[start]]
    if len(idx) == 0:
        runs = np.diff(np.flatnonzero(np.concatenate([[True], ~link, [True]]))) if n else np.zeros(1, int)
        raise DatasetError(
            f"{t.name}: no episode has {k} consecutive transitions (the longest has {int(runs.max())}); "
            f"a jump of {k} needs them: use a smaller --jump / --jumps"
        )
    stats = {**t.stats, "transitions": int(len(idx)), "jump": int(k)}
    stats["episodes"] = int(np.unique(t.episode[idx]).shape[0])
    return Transitions(
        name=t.name,
        obs=t.obs[idx],
        act=t.act[idx],
        next_obs=t.next_obs[idx + k - 1],
        episode=t.episode[idx],
        qpos=None if t.qpos is None else t.qpos[idx],
        qvel=None if t.qvel is None else t.qvel[idx],
        stats=stats,
    )


def episode_links(t: Transitions) -> np.ndarray:
    """link[j] (length N - 1): row j + 1 continues row j's pair. Rows of one episode are in order, but a
    row dropped as non-finite leaves a gap the episode id does not show. Where the data shows its chain
    (most pairs' next observation is the following row's observation) a broken link is such a gap; data
    whose next observations were stored apart from the rows (no chain to see) has only its episode ids."""
    same = t.episode[1:] == t.episode[:-1]
    # a tolerance far below any real step: files that wrote next_observations separately differ by float noise
    chained = np.isclose(t.next_obs[:-1], t.obs[1:], rtol=1e-5, atol=1e-6).all(1)
    if not same.any() or chained[same].mean() < 0.5:
        return same
    return same & chained
