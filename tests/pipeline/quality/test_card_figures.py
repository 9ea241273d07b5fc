"""The model card's figures: training draws the learning curve and the held-out R², the card links them,
bundles carry and checksum them, and a directory written by the library alone links none."""

import json
import re
import zipfile

import numpy as np
import pytest
from helpers.models import make_model_dir

import invdyn
from invdyn.model_dir import FIGURES
from invdyn.settings import model_cache_dir
from pipeline.data.sources import load_transitions
from pipeline.training.trainer import TrainConfig, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: the figures training draws; closed_loop.png comes with a closed-loop evaluation
TRAINED = [name for name in FIGURES if name != "closed_loop.png"]
QUICK = TrainConfig(hidden_dim=32, batch_size=256, max_epochs=3, patience=3, threads=1)


def _links(card: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)


@pytest.fixture(scope="module")
def trained(sim_files, tmp_path_factory):
    data = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    return train(data, QUICK, tmp_path_factory.mktemp("m") / "sim-hopper-random-v0").model_dir


def test_training_writes_small_pngs_that_the_card_links(trained):
    model = invdyn.read_model_dir(trained)
    assert _links(model.card) == TRAINED
    for name in TRAINED:
        data = (trained / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 60_000, name
        assert f"![{FIGURES[name]}]({name})" in model.card
    r2 = model.params["heldout_per_dim"]["r2"]
    assert len(r2) == model.act_dim and all(0 < v <= 1 for v in r2)
    # the figure shows what the trainer measured: 1 - MSE / variance on the held-out rows
    assert np.mean(r2) > 1 - model.params["metrics"]["heldout_mse_normalized"] - 0.2


def test_bundles_carry_the_figures_with_checksums(trained, tmp_path):
    bundle = invdyn.write_bundle(tmp_path / "b.zip", [trained])
    manifest = invdyn.verify_bundle(bundle)
    files = manifest["models"][0]["files"]
    assert set(TRAINED) <= set(files)
    with zipfile.ZipFile(bundle) as zf:
        assert set(zf.namelist()) == {"manifest.json", *(f"{trained.name}/{f}" for f in files)}
    assert invdyn.fetch(bundle, progress=False) == [trained.name]
    installed = model_cache_dir() / trained.name
    for name in TRAINED:
        assert (installed / name).read_bytes() == (trained / name).read_bytes()
    model = invdyn.load(trained.name)
    assert all((installed / link).is_file() for link in _links(model.card))


def test_a_library_written_directory_links_no_figure(tmp_path):
    d = make_model_dir(tmp_path / "plain-v0")
    model = invdyn.read_model_dir(d)
    assert _links(model.card) == [] and not any((d / name).exists() for name in FIGURES)
    (d / "README.md").unlink()  # a card rebuilt from params.json links only what is there
    assert _links(invdyn.read_model_dir(d).card) == []
    assert json.loads((d / "params.json").read_text())["learning_curve"] == []


def test_training_without_figures(sim_files, tmp_path):
    data = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    out = train(data, QUICK, tmp_path / "m", figures=False).model_dir
    assert not any((out / name).exists() for name in FIGURES)
    assert _links(invdyn.read_model_dir(out).card) == []


def test_extra_files_may_not_replace_the_models_own(tmp_path):
    net = invdyn.FancyMlpInvDynamic(3, 2, 8)
    normalizer = invdyn.GaussianNormalizer(np.zeros(3), np.ones(3))
    for bad in ("params.json", "../x.png", "model.ckpt"):
        with pytest.raises(invdyn.FormatError, match="extra file"):
            invdyn.save_model_dir(tmp_path / "m", net, normalizer, files={bad: b"x"})
    assert not (tmp_path / "m").exists()


def test_a_closed_loop_evaluation_adds_its_plot_table_and_metrics(trained, tmp_path, sim_files):
    import shutil

    from pipeline.quality.closed_loop import ClosedLoopConfig
    from pipeline.quality.evaluate import attach_evaluation, evaluate

    copy = shutil.copytree(trained, tmp_path / trained.name)
    data = load_transitions(str(sim_files["sim-hopper-random-v0"]))
    loop = ClosedLoopConfig(plan_noise=(0.0, 0.1), episodes=2, max_steps=100)
    result = evaluate(invdyn.read_model_dir(copy), data, physics=False, part="test", closed_loop=loop)
    attach_evaluation(copy, result)
    model = invdyn.read_model_dir(copy)  # the weights' checksum still verifies
    assert _links(model.card) == list(FIGURES) and (copy / "closed_loop.png").read_bytes()[:8] == PNG_MAGIC
    rows = model.params["metrics"]["closed_loop"]
    assert [r["plan_noise"] for r in rows] == [0.0, 0.1] and rows == model.params["evaluation"]["closed_loop"]
    assert "### Closed loop: executing a planner's plans" in model.card and "| expert | 0.1 |" in model.card
