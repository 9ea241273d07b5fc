"""Sim datasets in the device kit: a D4RL-layout HDF5 file packed small enough to travel (64 MiB with Ray),
and unpacked on the GPU machine into an HDF5 file the pipeline reads as the same transitions.

    python bench/device/kit_data.py pack SRC.hdf5 DST.npz.xz
    python bench/device/kit_data.py unpack SRC.npz.xz DIR          # writes DIR/<name>.hdf5

What is kept: observations, actions, rewards, terminals, timeouts and the file's attributes, exactly. Of
next_observations only the rows that differ from the next row's observation are kept (an episode's last
step), the rest is that next row. infos/qpos and infos/qvel are left out: only the MuJoCo evaluation reads
them, and the GPU machine has no MuJoCo (the job then evaluates without physics). Floats are byte-shuffled
before xz, which packs a sim set to about 80% of its raw size instead of 93% without the shuffle.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import sys
from pathlib import Path

import h5py
import numpy as np

#: the per-step arrays stored whole
KEPT = ("observations", "actions", "rewards", "terminals", "timeouts")
FORMAT = "invdyn-device-kit-dataset/1"
SUFFIX = ".npz.xz"


def _shuffle(x: np.ndarray) -> np.ndarray:
    """Bytes of `x` grouped by position within an element (all first bytes, then all second bytes, ...)."""
    x = np.ascontiguousarray(x)
    return np.ascontiguousarray(x.view(np.uint8).reshape(-1, x.itemsize).T)


def _unshuffle(b: np.ndarray, dtype: str, shape: list[int]) -> np.ndarray:
    dt = np.dtype(dtype)
    return np.ascontiguousarray(b.reshape(dt.itemsize, -1).T).view(dt).reshape(shape)


def _attr(value):
    """An HDF5 attribute as JSON (numpy scalars to Python)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """The kept arrays + next_observations and the attributes of a D4RL-layout file."""
    with h5py.File(path, "r") as f:
        missing = [k for k in (*KEPT, "next_observations") if k not in f]
        if missing:
            raise SystemExit(
                f"{path}: no key(s) {', '.join(missing)}; pack needs a file pipeline.simulate wrote"
            )
        arrays = {k: f[k][()] for k in (*KEPT, "next_observations")}
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    return arrays, attrs


def pack_bytes(arrays: dict[str, np.ndarray], attrs: dict) -> bytes:
    obs, nxt = arrays["observations"], arrays["next_observations"]
    follows = np.zeros(len(obs), dtype=bool)  # next_observations[t] == observations[t + 1]
    follows[:-1] = np.all(nxt[:-1] == obs[1:], axis=1)
    own = np.flatnonzero(~follows)
    parts = {k: arrays[k] for k in KEPT}
    parts["own_next_rows"] = own.astype(np.int64)
    parts["own_next_observations"] = nxt[own]
    meta = {
        "format": FORMAT,
        "attrs": attrs,
        "arrays": {k: {"dtype": v.dtype.str, "shape": list(v.shape)} for k, v in parts.items()},
    }
    buf = io.BytesIO()
    shuffled = {k: _shuffle(v) for k, v in parts.items()}
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **shuffled)
    return lzma.compress(buf.getvalue(), preset=9)


def unpack_bytes(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(io.BytesIO(lzma.decompress(data)), allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        if meta.get("format") != FORMAT:
            raise SystemExit(f"not a device-kit dataset (format {meta.get('format')!r}, expected {FORMAT!r})")
        parts = {k: _unshuffle(z[k], **spec) for k, spec in meta["arrays"].items()}
    obs = parts["observations"]
    nxt = np.empty_like(obs)
    nxt[:-1] = obs[1:]
    nxt[parts["own_next_rows"]] = parts["own_next_observations"]
    arrays = {k: parts[k] for k in KEPT}
    arrays["next_observations"] = nxt
    return arrays, meta["attrs"]


def pack(src: Path, dst: Path) -> dict:
    """Pack `src` into `dst` and check that unpacking gives back every kept array bit for bit."""
    arrays, attrs = read_arrays(src)
    data = pack_bytes(arrays, attrs)
    back, back_attrs = unpack_bytes(data)
    for k, v in arrays.items():
        if v.dtype != back[k].dtype or not np.array_equal(v, back[k]):
            raise SystemExit(f"{src}: {k} does not survive packing; the kit would train on other data")
    if back_attrs != attrs:
        raise SystemExit(f"{src}: attributes do not survive packing: {attrs} vs {back_attrs}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    return {"name": attrs.get("name") or src.stem, "rows": len(arrays["observations"]), "bytes": len(data)}


def unpack(src: Path, out_dir: Path) -> Path:
    """Write `out_dir/<name>.hdf5` (the name from the packed attributes, else the file's)."""
    arrays, attrs = unpack_bytes(src.read_bytes())
    name = attrs.get("name") or src.name.removesuffix(SUFFIX)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="SRC.hdf5 -> DST.npz.xz (checked round trip)")
    pk.add_argument("src", type=Path)
    pk.add_argument("dst", type=Path)
    up = sub.add_parser("unpack", help="SRC.npz.xz ... -> DIR/<name>.hdf5")
    up.add_argument("src", type=Path, nargs="+")
    up.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        info = pack(args.src, args.dst)
        print(f"{info['name']}: {info['rows']:,} rows -> {args.dst} ({info['bytes'] / 2**20:.2f} MiB)")
    else:
        for src in args.src:
            print(unpack(src, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
