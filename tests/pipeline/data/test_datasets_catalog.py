"""The catalog: D4RL's URL table as data, suites, and turning a --datasets string into specs."""

import pytest

from pipeline.data.catalog import (
    CATALOG,
    SUITES,
    DatasetMissingError,
    UnknownDatasetError,
    entry_for_file,
    file_path,
    nearest_names,
    resolve_datasets,
)

BASE = "http://rail.eecs.berkeley.edu/datasets/offline_rl"


def test_gym_mujoco_urls_follow_d4rl():
    assert CATALOG["halfcheetah-medium-v2"]["url"] == f"{BASE}/gym_mujoco_v2/halfcheetah_medium-v2.hdf5"
    assert (
        CATALOG["walker2d-medium-replay-v2"]["url"] == f"{BASE}/gym_mujoco_v2/walker2d_medium_replay-v2.hdf5"
    )
    assert CATALOG["ant-full-replay-v1"]["url"] == f"{BASE}/gym_mujoco_v1/ant_full_replay-v1.hdf5"
    assert CATALOG["walker2d-medium-replay-v0"]["url"] == f"{BASE}/gym_mujoco/walker_mixed.hdf5"
    assert CATALOG["antmaze-umaze-v2"]["url"].startswith(
        f"{BASE}/ant_maze_v2/Ant_maze_u-maze_noisy_multistart_False"
    )
    assert (
        CATALOG["kitchen-partial-v0"]["url"]
        == f"{BASE}/kitchen/kitchen_microwave_kettle_light_slider-v0.hdf5"
    )
    assert CATALOG["maze2d-umaze-v1"]["url"] == f"{BASE}/maze2d/maze2d-umaze-sparse-v1.hdf5"
    # every locomotion agent x variant x version D4RL published
    for agent in ("halfcheetah", "hopper", "walker2d", "ant"):
        for variant in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            for version in ("v0", "v1", "v2"):
                assert f"{agent}-{variant}-{version}" in CATALOG
        assert f"{agent}-full-replay-v2" in CATALOG and f"{agent}-full-replay-v1" in CATALOG


def test_dims_and_env_ids():
    dims = {n: (e["obs_dim"], e["act_dim"], e["env_id"]) for n, e in CATALOG.items()}
    assert dims["hopper-expert-v2"] == (11, 3, "Hopper-v5")
    assert dims["halfcheetah-random-v0"] == (17, 6, "HalfCheetah-v5")
    assert dims["walker2d-medium-v1"] == (17, 6, "Walker2d-v5")
    assert dims["ant-medium-v2"] == (111, 8, "Ant-v5")
    assert dims["antmaze-large-diverse-v2"][:2] == (29, 8) and dims["kitchen-mixed-v0"][:2] == (60, 9)
    assert dims["maze2d-large-dense-v1"][:2] == (4, 2)
    files = [file_path(n).name for n in CATALOG]
    assert len(files) == len(set(files))  # one file per dataset, so the file name identifies it
    assert entry_for_file("/somewhere/hopper_medium-v2.hdf5")["name"] == "hopper-medium-v2"


def test_suites():
    assert len(SUITES["mujoco"]) == 15 and all(n.endswith("-v2") for n in SUITES["mujoco"])
    assert SUITES["kitchen"] == ["kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"]
    assert len(SUITES["antmaze"]) == 6 and all(n.endswith("-v2") for n in SUITES["antmaze"])
    cd = SUITES["cleandiffuser"]
    assert len(cd) == 15 and "hopper-medium-replay-v2" in cd and "antmaze-large-diverse-v2" in cd
    assert "hopper-random-v2" not in cd and "kitchen-complete-v0" not in cd
    assert all(CATALOG[n]["simulated"] for n in SUITES["sim"]) and len(SUITES["sim"]) == 3
    assert set(SUITES["all"]) == set().union(*(SUITES[s] for s in SUITES if s != "all"))
    assert all(n in CATALOG for s in SUITES.values() for n in s)


def test_resolve_datasets(tmp_path):
    own = tmp_path / "mine.hdf5"
    own.write_bytes(b"")
    out = resolve_datasets(f"sim, hopper-medium-v2,{own},minari:mujoco/hopper/expert-v0,sim-hopper-mixed-v0")
    assert out == [*SUITES["sim"], "hopper-medium-v2", str(own), "minari:mujoco/hopper/expert-v0"]
    assert resolve_datasets(["kitchen", "kitchen-mixed-v0"]) == SUITES["kitchen"]
    with pytest.raises(UnknownDatasetError, match="Did you mean: hopper-medium-v2"):
        resolve_datasets("sim,hoper-medium-v2")
    with pytest.raises(DatasetMissingError, match="does not exist"):
        resolve_datasets(str(tmp_path / "absent.parquet"))


def test_nearest_names():
    assert nearest_names("halfcheetah-medium-expert")[0].startswith("halfcheetah-medium-expert-v")
    assert "cleandiffuser" in nearest_names("cleandifuser")
    assert nearest_names("zzzzzz") == []
