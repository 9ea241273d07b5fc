"""The record of every transition an agent's training collected (with the simulator state, D4RL's
infos/qpos / infos/qvel), kept as numbered .npz parts in the run folder, flushed at each checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import gymnasium
import numpy as np

#: actions are applied as int16 codes / ACTION_SCALE (within 3e-5 of what the agent asked): the applied
#: action is then exactly representable in 2 bytes, so the committed replay record is exact and small
ACTION_SCALE = 32767
KEYS = ("observations", "actions", "next_observations", "rewards", "terminals", "timeouts", "qpos", "qvel")


def quantize(action: np.ndarray) -> np.ndarray:
    """int16 codes of actions in [-1, 1] (every locomotion env's box)."""
    return np.round(np.clip(action, -1.0, 1.0) * ACTION_SCALE).astype(np.int16)


def dequantize(codes: np.ndarray) -> np.ndarray:
    return (codes.astype(np.float32) / np.float32(ACTION_SCALE)).astype(np.float32)


class RecordingWrapper(gymnasium.Wrapper):
    """Applies the quantized action and remembers each transition until `flush` writes them as one part."""

    def __init__(self, env):
        super().__init__(env)
        low, high = env.action_space.low, env.action_space.high
        if not (np.all(low == -1.0) and np.all(high == 1.0)):
            raise ValueError(f"{env.spec.id}: the record assumes an action box of [-1, 1], got {low}..{high}")
        self._rows: dict[str, list] = {k: [] for k in KEYS}
        self._obs = None

    def reset(self, **kwargs):
        self._obs, info = self.env.reset(**kwargs)
        return self._obs, info

    def step(self, action):
        data = self.env.unwrapped.data
        qpos, qvel = data.qpos.copy(), data.qvel.copy()
        applied = dequantize(quantize(np.asarray(action)))
        next_obs, reward, terminated, truncated, info = self.env.step(applied)
        for key, value in zip(
            KEYS,
            (self._obs, applied, next_obs, reward, terminated, truncated and not terminated, qpos, qvel),
            strict=True,
        ):
            self._rows[key].append(value)
        self._obs = next_obs
        return next_obs, reward, terminated, truncated, info

    def pending(self) -> int:
        return len(self._rows["rewards"])

    def flush(self, folder: Path, start: int) -> int:
        """Write the transitions since the last flush as part `start`..`start + n`; returns n."""
        n = self.pending()
        if n:
            data = {k: np.asarray(v) for k, v in self._rows.items()}
            data["observations"] = data["observations"].astype(np.float32)
            data["next_observations"] = data["next_observations"].astype(np.float32)
            data["rewards"] = data["rewards"].astype(np.float32)
            write_part(folder, start, data)
            self._rows = {k: [] for k in KEYS}
        return n


def _part_name(start: int, end: int) -> str:
    return f"part-{start:09d}-{end:09d}.npz"


def write_part(folder: Path, start: int, data: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    end = start + len(data["rewards"])
    tmp = folder / f".tmp-{_part_name(start, end)}"
    with open(tmp, "wb") as f:
        np.savez(f, **data)
    os.replace(tmp, folder / _part_name(start, end))


def parts(folder: Path) -> list[tuple[int, int, Path]]:
    """(start, end, path) of the record's parts, in order."""
    out = []
    for p in sorted(folder.glob("part-*.npz")):
        _, start, end = p.stem.split("-")
        out.append((int(start), int(end), p))
    return out


def truncate(folder: Path, steps: int) -> None:
    """Drop parts past `steps` (written after the last checkpoint) and mark the record's last transition as
    an episode end: the resumed run starts a new episode there."""
    kept = []
    for start, end, path in parts(folder):
        if end > steps:
            path.unlink()
        else:
            kept.append((start, end, path))
    if kept:
        start, _, path = kept[-1]
        with np.load(path) as f:
            data = dict(f)
        if not (data["terminals"][-1] or data["timeouts"][-1]):
            data["timeouts"][-1] = True
            write_part(folder, start, data)


def load(folder: Path, steps: int | None = None) -> dict[str, np.ndarray]:
    """The first `steps` recorded transitions (all if None), one array per key."""
    chunks: dict[str, list] = {k: [] for k in KEYS}
    for start, _, path in parts(folder):
        if steps is not None and start >= steps:
            break
        with np.load(path) as f:
            for k in KEYS:
                chunks[k].append(f[k])
    if not chunks["rewards"]:
        return {}
    data = {k: np.concatenate(v) for k, v in chunks.items()}
    return {k: v[:steps] for k, v in data.items()} if steps is not None else data
