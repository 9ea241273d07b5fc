"""An agent's training (stable-baselines3 SAC, a few hundred steps) checkpoints, resumes, keeps a record of
every transition it collected and publishes actors that plain torch runs like SB3 does."""

import json

import numpy as np
import pytest
import torch

from pipeline.agents import record
from pipeline.agents.cli import main
from pipeline.agents.config import AgentConfig
from pipeline.agents.publish import publish
from pipeline.agents.train import read_state, train
from pipeline.data.catalog import DatasetError
from pipeline.sim.agent_policy import load_actor
from pipeline.sim.agent_rollout import replay_chunk, replay_size

SHORT = dict(learning_starts=100, eval_every=100, checkpoint_every=100, eval_episodes=1, medium_score=-1e9)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """300 steps through the CLI, then a resumed run to 500 steps (as after a cut)."""
    runs = tmp_path_factory.mktemp("runs")
    opts = ["--learning-starts", "100", "--eval-every", "100", "--checkpoint-every", "100"]
    opts += ["--eval-episodes", "1", "--medium-score", "-1000000", "--run-dir", str(runs)]
    assert main(["train", "Hopper-v5", "--steps", "300", *opts]) == 0
    first = read_state(runs / "Hopper-v5")
    assert main(["train", "Hopper-v5", "--steps", "500", *opts]) == 0
    return runs, first


def test_training_checkpoints_and_resumes(trained):
    runs, first = trained
    run = runs / "Hopper-v5"
    assert first["steps"] == 300 and first["checkpoint"] == "checkpoint-000000300.zip"
    state = read_state(run)
    assert state["steps"] == 500 and state["finished"] is True
    assert [p["step"] for p in state["curve"]] == [100, 200, 300, 400, 500]  # the resumed run kept the curve
    assert state["medium_step"] == 100 and state["cpu_s"] > first["cpu_s"]
    assert sorted(p.name for p in run.glob("checkpoint-*.zip")) == ["checkpoint-000000500.zip"]
    assert (run / "medium.safetensors").is_file() and (run / "expert.safetensors").is_file()


def test_record_holds_every_transition_with_its_state(trained):
    run = trained[0] / "Hopper-v5"
    spans = [(s, e) for s, e, _ in record.parts(run / "rollouts")]
    assert spans[0][0] == 0 and spans[-1][1] == 500
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, no gap
    data = record.load(run / "rollouts")
    assert len(data["rewards"]) == 500
    # Hopper's observation is qpos[1:] then clip(qvel): the recorded state is the one observed
    np.testing.assert_allclose(data["observations"][:, :5], data["qpos"][:, 1:], atol=1e-6)
    assert data["timeouts"][299]  # the episode cut by the resume is closed where the first run stopped
    inside = ~(data["terminals"] | data["timeouts"])[:-1]
    np.testing.assert_array_equal(data["next_observations"][:-1][inside], data["observations"][1:][inside])
    np.testing.assert_array_equal(data["actions"], record.dequantize(record.quantize(data["actions"])))


def test_exported_actor_is_sb3s_actor(trained):
    from stable_baselines3 import SAC

    run = trained[0] / "Hopper-v5"
    model = SAC.load(run / "checkpoint-000000500.zip", device="cpu")  # written by this test's own run
    actor, meta = load_actor(run / "expert.safetensors")
    assert meta["steps"] == 500 and meta["env_id"] == "Hopper-v5" and meta["hidden"] == [256, 256]
    obs = np.random.default_rng(0).normal(size=(16, 11)).astype(np.float32)
    sb3, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(actor.act(obs), sb3, atol=1e-5)
    with torch.no_grad():
        mu, log_std = model.actor.get_action_dist_params(torch.as_tensor(obs))[:2]
        ours = actor(torch.as_tensor(obs))
    np.testing.assert_allclose(ours[1].numpy(), log_std.numpy(), atol=1e-6)


def test_publish_writes_card_and_an_exact_replay_record(trained, tmp_path):
    runs, _ = trained
    dest = publish("Hopper-v5", run_dir=runs, out=tmp_path, eval_episodes=2)
    assert {p.name for p in dest.iterdir()} == {
        "medium.safetensors",
        "expert.safetensors",
        "medium_replay.npz",
        "card.json",
        "card.md",
        "returns.png",
    }
    card = json.loads((dest / "card.json").read_text())
    assert card["algorithm"] == "SAC" and card["steps"] == 500 and card["medium_step"] == 100
    assert card["library"]["stable-baselines3"] and card["hyperparameters"]["batch_size"] == 256
    assert set(card["scores"]) == {"medium", "expert"} and card["scores"]["expert"]["episodes"] == 2
    # medium-replay = the recorded transitions up to the medium step, replayed exactly from the record
    assert replay_size("hopper", str(tmp_path)) == 100
    replayed = replay_chunk("hopper", 0, 0, 0, 100, root=str(tmp_path))
    recorded = record.load(runs / "Hopper-v5" / "rollouts", 100)
    for key in ("observations", "actions", "next_observations", "rewards", "qpos", "qvel", "terminals"):
        np.testing.assert_array_equal(replayed[key], recorded[key], err_msg=key)


def test_best_expert_is_kept_and_published_by_choice(trained, tmp_path):
    runs, _ = trained
    run = runs / "Hopper-v5"
    state = read_state(run)
    after_medium = [p for p in state["curve"] if p["step"] >= state["medium_step"]]
    best = max(after_medium, key=lambda p: p["normalized"])  # the first of equal scores: strict > keeps it
    assert state["best"]["step"] == best["step"] and state["best"]["normalized"] == best["normalized"]
    _, meta = load_actor(run / "expert-best.safetensors")
    assert meta["steps"] == best["step"]
    shipped = publish("Hopper-v5", run_dir=runs, out=tmp_path / "best", eval_episodes=1)
    card = json.loads((shipped / "card.json").read_text())
    _, shipped_meta = load_actor(shipped / "expert.safetensors")
    assert card["expert_selection"] == "best" and card["scores"]["expert"]["steps"] == best["step"]
    assert shipped_meta["checkpoint"] == "expert" and shipped_meta["steps"] == best["step"]
    assert f"step {best['step']:,}" in (shipped / "card.md").read_text()
    latest = publish("Hopper-v5", run_dir=runs, out=tmp_path / "latest", eval_episodes=1, expert="latest")
    card = json.loads((latest / "card.json").read_text())
    assert card["expert_selection"] == "latest" and card["scores"]["expert"]["steps"] == 500
    with pytest.raises(DatasetError, match="--expert must be one of best, latest"):
        publish("Hopper-v5", run_dir=runs, out=tmp_path / "bad", expert="newest")


def test_bad_env_and_budget_are_refused(tmp_path, capsys):
    assert main(["train", "Humanoid-v5", "--run-dir", str(tmp_path)]) == 2
    assert "unknown agent env 'Humanoid-v5'" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="--steps must be positive"):
        train(AgentConfig(env="hopper", steps=0, run_dir=str(tmp_path), **SHORT))
    assert main(["publish", "walker2d", "--run-dir", str(tmp_path)]) == 2
    assert "has no trained agent" in capsys.readouterr().err


def test_cpu_budget_stops_with_a_checkpoint(tmp_path):
    cfg = AgentConfig(env="Hopper-v5", steps=5000, cpu_hours=1e-9, run_dir=str(tmp_path), **SHORT)
    state = train(cfg)
    assert 0 < state["steps"] < 5000 and state["finished"] is False
    assert (tmp_path / "Hopper-v5" / state["checkpoint"]).is_file()
    assert record.parts(tmp_path / "Hopper-v5" / "rollouts")[-1][1] == state["steps"]
