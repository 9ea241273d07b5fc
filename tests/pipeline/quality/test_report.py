"""pipeline.quality.report renders its tables and plots from a small real run (trained models, MuJoCo
replay)."""

import json
import re

import pytest

from pipeline.data.sources import load_transitions
from pipeline.quality.recipe import subset
from pipeline.quality.report import main, read_summary
from pipeline.training.trainer import TrainConfig, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK = {
    "hidden_dim": 64,
    "dropout": 0.0,
    "lr": 1e-3,
    "batch_size": 256,
    "max_epochs": 4,
    "patience": 4,
    "threads": 1,
}


@pytest.fixture(scope="module")
def summary(sim_files, tmp_path_factory):
    """What pipeline.pretrain_all leaves: DIR/summary.json, one record per dataset, model dirs relative."""
    root = tmp_path_factory.mktemp("job")
    records = []
    for name, path in sim_files.items():
        result = train(load_transitions(str(path)), TrainConfig(**QUICK), root / "models" / name)
        records.append(
            {
                "dataset": str(path),
                "heldout_mse": result.metrics["heldout_mse"],
                "baseline_mse": result.metrics["baseline_mse"],
                "config": QUICK,
                "model_dir": f"models/{name}",
            }
        )
    records.append(
        {"dataset": "sim-walker2d-random-v0", "status": "failed", "error": "trial crashed: planted"}
    )
    (root / "summary.json").write_text(json.dumps(records))
    return root / "summary.json"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_report_renders_table_and_plots_with_recipe(summary, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        main(
            [
                "--summary",
                str(summary),
                "--out",
                str(out),
                "--with-recipe",
                "--recipe-max-epochs",
                "1",
                "--threads",
                "1",
                "--starts",
                "6",
                "--samples",
                "200",
                "--horizon",
                "8",
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    for name in ("sim-halfcheetah-random-v0", "sim-hopper-random-v0"):
        for metric in ("action MSE", "one-step state error", "tracking drift at 8"):
            row = re.search(rf"^\| {name} \| {metric} \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", md, re.M)
            assert row, f"no row for {name} / {metric}"
            champion, recipe, baseline = (float(v) for v in row.groups())  # all three columns filled
            assert champion < baseline
        assert re.search(rf"^\| {name} \| [0-9.]+ \| [0-9.-]+ \| [0-9.]+ \| (well served|weak)", md, re.M)
    assert "sim-walker2d-random-v0: trial crashed: planted" in md  # a failed dataset is listed, not evaluated
    for png in ("learning_curves.png", "heldout_mse.png", "tracking_drift.png"):
        width, height = _png_size(out / png)
        assert width > 300 and height > 200
        assert f"]({png})" in md
    results = json.loads((out / "results.json").read_text())
    assert [len(e["champion"]["drift_per_step"]) for e in results] == [8, 8]
    assert all(e["recipe"]["heldout_episodes"] == e["champion"]["heldout_episodes"] for e in results)
    assert not list(out.glob(".*tmp*"))  # no temp files left behind
    assert "written:" in capsys.readouterr().out


def test_recipe_never_trains_on_held_out_episodes(sim_files):
    t = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    part = subset(t, [r for r in range(len(t)) if t.episode[r] % 2 == 0], "even")
    assert set(part.episode.tolist()) == {e for e in set(t.episode.tolist()) if e % 2 == 0}
    assert part.sha256 != t.sha256 and part.stats["subset_of"] == t.sha256
    assert part.qpos.shape[0] == len(part) == part.stats["transitions"]


def test_bad_summary_is_a_clear_error(tmp_path, capsys):
    assert main(["--summary", str(tmp_path / "nope.json"), "--out", str(tmp_path / "r")]) == 2
    assert "pretrain_all" in capsys.readouterr().err
    assert main(["--models", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps([{"dataset": "x"}]))
    with pytest.raises(Exception, match="record 0 has no 'model_dir'"):
        read_summary(bad)


def test_every_argument_is_checked_before_anything_is_evaluated(tmp_path, capsys, isolated_dirs):
    """Evaluating a catalog sim name simulates it first (50k MuJoCo steps): an unwritable --out, an unknown
    dataset or a bad option is refused before, and no dataset file appears."""
    from helpers.models import make_model_dir

    model = make_model_dir(tmp_path / "sim-hopper-random-v0", obs_dim=11, act_dim=3)
    (tmp_path / "a-file").write_text("x")
    unknown = tmp_path / "summary.json"
    unknown.write_text(json.dumps([{"dataset": "no-such-set-v0", "model_dir": str(model)}]))
    cases = [
        (["--models", str(model), "--out", str(tmp_path / "a-file" / "r")], "a file is in the way"),
        (["--summary", str(unknown), "--out", str(tmp_path / "r")], "unknown dataset 'no-such-set-v0'"),
        (["--models", str(model), "--out", str(tmp_path / "r"), "--threads", "0"], "--threads must be >= 1"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert list((isolated_dirs / "d4rl").iterdir()) == []


def test_entries_of_several_split_seeds_get_mean_and_std():
    """Several summaries (one per split seed) of one dataset: a table of mean ± sample std over the splits."""
    from pipeline.quality.report import markdown

    def entry(seed, champion_mse, recipe_mse):
        metrics = {"one_step_error": 0.1, "tracking_drift": 0.2, "one_step_baseline": 1.0}
        metrics.update(tracking_baseline=2.0, baseline_mse=1.0, per_dim_r2=[0.9, 0.8])
        return {
            "dataset": "sim-hopper-mixed-v0",
            "part": "test",
            "split_seed": seed,
            "champion": {**metrics, "heldout_mse": champion_mse},
            "recipe": {**metrics, "heldout_mse": recipe_mse},
            "champion_dir": f"split-{seed}",
        }

    md = markdown([entry(0, 0.1, 0.2), entry(1, 0.3, 0.3), entry(2, 0.2, 0.4)], horizon=32)
    assert "test episodes, which no choice" in md
    row = re.search(
        r"^\| sim-hopper-mixed-v0 \| 0,1,2 \| action MSE \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|",
        md,
        re.M,
    )
    assert row, md
    assert [c.strip() for c in row.groups()] == ["0.2 ± 0.1", "0.3 ± 0.1", "1 ± 0", "0.667 ± 0.29"]
    assert "Over split seeds" not in markdown([entry(0, 0.1, 0.2)], horizon=32)  # one split: no such table
