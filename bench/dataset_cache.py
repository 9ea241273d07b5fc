"""Parse-from-HDF5 versus cached (Arrow, memory-mapped) load of a 1M-transition D4RL-layout dataset:
`python bench/dataset_cache.py [--transitions 1000000] [--repeat 3]`."""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

# Writes a HalfCheetah-shaped file (17 / 6 dims, 1000-step episodes, next_observations, infos/qpos,
# infos/qvel, float32 like D4RL v2) into a temp folder, then times:
#   parse          load_transitions(path, use_cache=False): sha256 + h5py read + pairing, what every
#                  process did without a cache
#   build          the first cached load: parse + write the Arrow file
#   cached         load_transitions(path): source index lookup + memory map (a later run / Ray worker)
#   cached+touch   the same, then one pass over every array (pages actually read)
#   fresh process  a cached load timed inside a new Python process with pyarrow imported (as in a Ray
#                  worker, which imports pyarrow itself): a worker's first load
# Best of --repeat runs each; the OS page cache is warm for all of them.


def write_file(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 17)).astype(np.float32)
    timeouts = np.zeros(n, bool)
    timeouts[999::1000] = True
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["next_observations"] = np.roll(obs, -1, axis=0)
        f["actions"] = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts
        f["infos/qpos"] = rng.normal(size=(n, 9))
        f["infos/qvel"] = rng.normal(size=(n, 9))


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transitions", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["INVDYN_HOME"] = str(Path(tmp) / "home")  # a private cache: the bench never touches yours
        from pipeline.data import cache
        from pipeline.data.sources import load_transitions

        path = Path(tmp) / "bench-halfcheetah.hdf5"
        write_file(path, args.transitions)
        time.sleep(2.1)  # older than the source index's racy window, like any file downloaded earlier
        size = path.stat().st_size / 1e6
        t_parse, t = best(lambda: load_transitions(str(path), use_cache=False), args.repeat)
        t0 = time.perf_counter()
        built = load_transitions(str(path))
        t_build = time.perf_counter() - t0
        t_cached, c = best(lambda: load_transitions(str(path)), args.repeat)

        def touch():
            x = load_transitions(str(path))
            return float(
                x.obs.sum() + x.next_obs.sum() + x.act.sum() + x.qpos.sum() + x.qvel.sum() + x.episode.sum()
            )

        t_touch, _ = best(touch, args.repeat)
        code = (
            "import time, pyarrow, pyarrow.compute; from pipeline.data.sources import load_transitions as L; "
            "t = time.perf_counter(); "
            f"x = L({str(path)!r}); assert x.stats['cache_hit']; print(time.perf_counter() - t)"
        )
        t_fresh = float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
            ).stdout
        )
        assert built.stats["cache_hit"] is False and c.stats["cache_hit"] is True
        assert np.array_equal(t.obs, c.obs) and np.array_equal(t.next_obs, c.next_obs)
        arrow = cache.cache_path(c.sha256).stat().st_size / 1e6
    print(f"dataset: {len(t):,} transitions, HDF5 {size:.0f} MB, Arrow cache {arrow:.0f} MB")
    print(f"{'parse from HDF5 (no cache)':<34}{t_parse * 1e3:>10.1f} ms")
    print(f"{'first load (parse + write cache)':<34}{t_build * 1e3:>10.1f} ms")
    print(f"{'cached load (memory map)':<34}{t_cached * 1e3:>10.1f} ms   {t_parse / t_cached:>8.0f}x faster")
    print(
        f"{'cached load + read every array':<34}{t_touch * 1e3:>10.1f} ms   {t_parse / t_touch:>8.1f}x faster"
    )
    print(
        f"{'cached load in a fresh process':<34}{t_fresh * 1e3:>10.1f} ms   {t_parse / t_fresh:>8.1f}x faster"
    )


if __name__ == "__main__":
    main()
