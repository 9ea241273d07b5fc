"""invdyn's file helpers: the one JSON writer (stable bytes, atomic, JSON-safe) and the inter-process lock."""

import json
import math
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pytest

from invdyn._files import file_lock, write_json


def test_write_json_bytes_are_the_stable_dump_of_a_plain_dict(tmp_path):
    """Model checksums depend on params.json's bytes: sorted keys, indent 2, trailing newline, as before."""
    obj = {"b": [1, 2.5, {"z": None, "a": True}], "a": "x", "config": {"hidden_dim": 512}}
    write_json(tmp_path / "p.json", obj)
    expected = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    assert (tmp_path / "p.json").read_bytes() == expected.encode()


def test_write_json_makes_nan_paths_and_numpy_plain(tmp_path):
    obj = {
        "nan": math.nan,
        "inf": [1.0, -math.inf],
        "path": Path("/x/y"),
        "np": {"f32": np.float32(0.5), "i64": np.int64(3), "arr": np.arange(3), "nan32": np.float32("nan")},
        "tuple": (1, 2),
    }
    write_json(tmp_path / "p.json", obj)
    assert json.loads((tmp_path / "p.json").read_text()) == {
        "nan": None,
        "inf": [1.0, None],
        "path": "/x/y",
        "np": {"f32": 0.5, "i64": 3, "arr": [0, 1, 2], "nan32": None},
        "tuple": [1, 2],
    }


def test_write_json_refuses_unknown_types_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "p.json"
    write_json(target, {"v": 1})
    with pytest.raises(TypeError, match="JSON cannot hold object values"):
        write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]  # no temp file left


def _try_lock(path, queue):
    from filelock import Timeout

    try:
        with file_lock(path).acquire(timeout=0.2):
            queue.put("acquired")
    except Timeout:
        queue.put("timeout")


def test_file_lock_excludes_another_process(tmp_path):
    path = tmp_path / "sub" / ".x.lock"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with file_lock(path):
        p = ctx.Process(target=_try_lock, args=(path, queue))
        p.start()
        assert queue.get(timeout=60) == "timeout"
        p.join(60)
    p = ctx.Process(target=_try_lock, args=(path, queue))
    p.start()
    assert queue.get(timeout=60) == "acquired"
    p.join(60)
