"""Parse-from-HDF5 versus cached (Arrow, memory-mapped) load of a 1M-transition D4RL-layout dataset:
`python bench/dataset_cache.py [--transitions 1000000] [--repeat 3]`; writes bench/dataset_cache.md."""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, header, load_note, md_table, parser, write_record  # noqa: E402

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
    ap = parser(__doc__)
    ap.add_argument("--transitions", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    add_out(ap, ROOT / "bench" / "dataset_cache.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["INVDYN_HOME"] = str(Path(tmp) / "home")  # a private cache: the bench never touches yours
        title = "The dataset cache: parse once, memory-map after"
        lines = header(title, "bench/dataset_cache.py", "CPU only, " + load_note())
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
    rows = [
        ["parse from HDF5 (no cache)", t_parse, "1x"],
        ["first load (parse + write cache)", t_build, f"{t_parse / t_build:.2f}x"],
        ["cached load (memory map)", t_cached, f"{t_parse / t_cached:.0f}x faster"],
        ["cached load + read every array", t_touch, f"{t_parse / t_touch:.1f}x faster"],
        ["cached load in a fresh process", t_fresh, f"{t_parse / t_fresh:.1f}x faster"],
    ]
    lines += [
        f"Dataset: {len(t):,} transitions, HDF5 {size:.0f} MB, Arrow cache {arrow:.0f} MB; best of "
        f"{args.repeat} runs each, the OS page cache warm.",
        "",
        *md_table(["load", "ms", "vs parsing"], [[what, f"{secs * 1e3:.1f}", x] for what, secs, x in rows]),
    ]
    write_record(lines, args.out)


if __name__ == "__main__":
    main()
