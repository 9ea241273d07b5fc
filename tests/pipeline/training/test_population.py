"""Population training: a member follows the path of its config trained alone, stops and freezes on its own,
groups form by shape, and bad input is refused clearly."""

import json

import pytest
import torch
from conftest import write_d4rl_file
from helpers.training import assert_same_path, linear_transitions, small

import invdyn
from invdyn.model_dir import read_model_dir
from pipeline.training.config import TrainConfigError
from pipeline.training.population import run_search_space, shape_groups, train_population
from pipeline.training.trainer import train

MEMBERS = [  # one group: lr, weight decay, optimizer, schedule, weight average and keep rule all differ
    {},
    {"lr": 3e-3, "weight_decay": 0.0, "ema": 0.0},
    {"lr": 3e-4, "weight_decay": 1e-2, "optimizer": "adam", "schedule": "none", "keep": "last"},
]


@pytest.mark.parametrize("step", ["eager", "graph"])
@pytest.mark.parametrize("arch", ["fancy_mlp", "res_mlp"])
def test_member_follows_the_path_of_its_config_trained_alone(tmp_path, step, arch, summation):
    data = linear_transitions()
    configs = [small(step=step, arch=arch, max_epochs=4, **m) for m in MEMBERS]
    seen = []
    pop = train_population(
        data,
        configs,
        [tmp_path / f"p{i}" for i in range(3)],
        figures=False,
        on_eval=lambda i, r: seen.append((i, r["step"])),
    )
    for i, config in enumerate(configs):
        assert_same_path(pop[i], train(data, config, tmp_path / f"a{i}", figures=False), data, config)
        assert [s for j, s in seen if j == i] == [r["step"] for r in pop[i].curve]
        params = json.loads((pop[i].model_dir / "params.json").read_text())
        assert params["training"]["lr"] == config.lr
        assert params["training"]["resolved"]["population"] == {"members": 3, "group": 0, "index": i}
        assert params["training"]["resolved"]["step"] == step
    assert read_model_dir(pop[1].model_dir).predict(data.obs[:4], data.next_obs[:4]).shape == (4, 2)


@pytest.mark.parametrize("step, arch", [("eager", "fancy_mlp"), ("graph", "fancy_mlp"), ("eager", "res_mlp")])
def test_member_that_stops_early_is_frozen_while_the_others_go_on(tmp_path, step, arch, summation):
    """Actions independent of states: validation gets worse as members memorize, so the impatient members
    stop early. Each saves its best weights (those of its alone-training) and its curve ends where the
    alone-training's ends; the patient member trains on."""
    data = linear_transitions(noise_actions=True, episodes=10)
    base = {"step": step, "arch": arch, "max_epochs": 8, "schedule": "none", "ema": 0.0, "lr": 1e-2}
    base["hidden_dim"] = 128
    configs = [small(**base, patience=p) for p in (1, 2, 100)]
    pop = train_population(data, configs, [tmp_path / f"p{i}" for i in range(3)], figures=False)
    alone = [train(data, c, tmp_path / f"a{i}", figures=False) for i, c in enumerate(configs)]
    for member, single, config in zip(pop, alone, configs, strict=True):
        assert_same_path(member, single, data, config)
    assert pop[0].metrics["stopped_early"] and pop[1].metrics["stopped_early"]
    assert not pop[2].metrics["stopped_early"] and pop[2].metrics["epochs"] == 8
    assert pop[0].metrics["steps"] < pop[1].metrics["steps"] < pop[2].metrics["steps"]
    best = min(pop[0].curve, key=lambda r: r["val_mse"])
    assert pop[0].metrics["best_step"] == best["step"] < pop[0].curve[-1]["step"]


def test_a_member_without_dropout_is_untouched_by_a_neighbour_with_dropout(tmp_path, summation):
    data = linear_transitions()
    configs = [small(max_epochs=3), small(max_epochs=3, dropout=0.2)]
    assert shape_groups(configs) == [[0, 1]]
    pop = train_population(data, configs, [tmp_path / "p0", tmp_path / "p1"], figures=False)
    assert_same_path(pop[0], train(data, configs[0], tmp_path / "a0", figures=False), data, configs[0])
    loaded = read_model_dir(pop[1].model_dir)
    assert loaded.net.dropout == 0.2 and pop[1].metrics["heldout_mse"] < pop[1].metrics["baseline_mse"]
    # and the neighbour really trains with its dropout (member 0's net, built without a Dropout layer,
    # must not be the stack's template): its path leaves the no-dropout one
    curves = [[r["train_loss"] for r in p.curve] for p in pop]
    assert curves[0] != curves[1]


@pytest.mark.parametrize(
    "bug",
    [
        {"lr": 1.01e-2},  # an optimizer step 1 % off (a member reading another's lr or state)
        {"dropout": 0.1},  # a member given a neighbour's dropout
        {"patience": 2},  # a member that keeps training after it should have stopped
    ],
    ids=["lr-1%", "dropout", "trains-on"],
)
def test_the_equivalence_check_fails_a_member_that_trained_differently(tmp_path, bug):
    """The tolerance of `assert_same_path` is float32 rounding, not a behaviour change: the member is
    compared with an alone-training of a config that differs the way a real bug would make it differ."""
    data = linear_transitions(noise_actions=True, episodes=10)
    base = {"max_epochs": 6, "schedule": "none", "ema": 0.0, "lr": 1e-2, "hidden_dim": 128, "dropout": 0.0}
    config = small(**base, patience=1)
    (member,) = train_population(data, [config], [tmp_path / "p"], figures=False)
    other = small(**{**base, "patience": 1, **bug})
    with pytest.raises(AssertionError):
        assert_same_path(member, train(data, other, tmp_path / "a", figures=False), data, config)
    assert_same_path(member, train(data, config, tmp_path / "same", figures=False), data, config)


@pytest.mark.parametrize("step", ["eager", "graph"])
def test_members_with_input_noise_meet_their_alone_trainings_noise(tmp_path, step, summation):
    """Each member draws target / obs noise from its own generator: the same draws as alone, also after a
    member stopped and left the stack."""
    data = linear_transitions(noise_actions=True, episodes=10)
    base = {"step": step, "max_epochs": 5, "schedule": "none", "ema": 0.0, "lr": 1e-2, "hidden_dim": 64}
    noise = {"target_noise": 0.1, "obs_noise": 0.05}
    configs = [small(**base, **noise, patience=1), small(**base, **noise, patience=100, seed=3, split_seed=0)]
    assert len(shape_groups(configs)) == 1
    pop = train_population(data, configs, [tmp_path / f"p{i}" for i in range(2)], figures=False)
    for i, config in enumerate(configs):
        assert_same_path(pop[i], train(data, config, tmp_path / f"a{i}", figures=False), data, config)
    assert pop[0].metrics["stopped_early"] and not pop[1].metrics["stopped_early"]


def test_groups_form_by_shape_and_split():
    configs = [
        small(),  # 0
        small(lr=1e-2, weight_decay=0.0, dropout=0.1, ema=0.0, max_epochs=7),  # 1: same group as 0
        small(hidden_dim=32),  # 2: another shape
        small(arch="mlp"),  # 3: another architecture
        small(batch_size=32),  # 4: other batches
        small(seed=1),  # 5: seed 1 means split seed 1: another split
        small(seed=1, split_seed=0),  # 6: same split as 0, own initial weights and batches
        small(jump=2),  # 7: other pairs
    ]
    assert shape_groups(configs) == [[0, 1, 6], [2], [3], [4], [5], [7]]


def test_several_groups_come_back_in_the_order_of_the_configs(tmp_path):
    data = linear_transitions()
    configs = [
        small(hidden_dim=32, max_epochs=2),
        small(max_epochs=2),
        small(hidden_dim=32, lr=3e-3, max_epochs=2),
    ]
    pop = train_population(data, configs, [tmp_path / f"p{i}" for i in range(3)], figures=False)
    for i, config in enumerate(configs):
        params = json.loads((pop[i].model_dir / "params.json").read_text())
        assert params["config"]["hidden_dim"] == config.hidden_dim
        assert params["training"]["lr"] == config.lr
    assert [
        json.loads((r.model_dir / "params.json").read_text())["training"]["resolved"]["population"]
        for r in pop
    ] == [
        {"members": 2, "group": 0, "index": 0},
        {"members": 1, "group": 1, "index": 0},
        {"members": 2, "group": 0, "index": 1},
    ]


def test_search_space_trains_every_point_into_its_own_folder(tmp_path):
    data = linear_transitions()
    space = '{"lr": [1e-3, 3e-3], "hidden_dim": [32]}'
    results = run_search_space(data, small(max_epochs=2), space, tmp_path / "pop")
    assert sorted(p.name for p in (tmp_path / "pop").iterdir()) == [
        "hidden_dim-32_lr-0.001",
        "hidden_dim-32_lr-0.003",
        "search.json",
    ]
    summary = json.loads((tmp_path / "pop" / "search.json").read_text())
    assert summary["population"] is True
    assert [s["point"]["lr"] for s in summary["points"]] == [1e-3, 3e-3]
    assert [s["heldout_mse"] for s in summary["points"]] == [r.metrics["heldout_mse"] for r in results]
    assert all(s["test_mse"] > 0 for s in summary["points"])
    # one after another: the same points, the same figures (a member follows its alone-training)
    alone = run_search_space(data, small(max_epochs=2), space, tmp_path / "seq", population=False)
    assert json.loads((tmp_path / "seq" / "search.json").read_text())["population"] is False
    for a, b in zip(alone, results, strict=True):
        assert a.metrics["heldout_mse"] == pytest.approx(b.metrics["heldout_mse"], rel=1e-4)


def test_train_cli_trains_a_search_space_as_a_population(tmp_path, capsys):
    from pipeline.training.cli import main

    data = tmp_path / "rows.hdf5"
    write_d4rl_file(data, episodes=(60,) * 10, obs_dim=5)
    out = tmp_path / "pop"
    space = '{"lr": [1e-3, 3e-3]}'
    args = ["--dataset", str(data), "--out", str(out), "--search-space", space, "--population", "--quiet"]
    assert main([*args, "--hidden-dim", "32", "--batch-size", "64", "--max-epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "lr-0.001" in printed and "lr-0.003" in printed and "population of 2" in printed
    assert {p.name for p in out.iterdir()} == {"lr-0.001", "lr-0.003", "search.json"}
    assert main(["--dataset", str(data), "--out", str(tmp_path / "x"), "--population"]) == 2
    assert "--population needs --search-space" in capsys.readouterr().err


@pytest.mark.parametrize(
    "configs, dirs, message",
    [
        ([], [], "non-empty list"),
        ([small(), small()], ["a"], "needs as many output directories"),
        ([small(), small(lr=-1.0)], ["a", "b"], "member 1: lr must be"),
    ],
    ids=["empty", "mismatched-lengths", "bad-member"],
)
def test_bad_input_is_refused_clearly(tmp_path, configs, dirs, message):
    with pytest.raises(TrainConfigError, match=message):
        train_population(linear_transitions(), configs, [tmp_path / d for d in dirs])
    assert not any(tmp_path.iterdir())


def test_graph_population_step_is_capturable():
    """What a CUDA graph needs, checked on the CPU: the step reads no device value on the host, every
    tensor it touches keeps its address from step to step, and a frozen member's weights stay put."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.training.population_steps import PopulationGraphStep
    from pipeline.training.resident import Resident
    from pipeline.training.split import split_indices
    from pipeline.training.trainer import _build_model

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    data = linear_transitions()
    train_idx, val_idx = split_indices(data, "episodes", 0.2, 0)[:2]
    cpu = torch.device("cpu")
    resident = Resident.build(data, invdyn.GaussianNormalizer.from_data(data.obs), train_idx, val_idx, cpu)
    configs = [small(**m) for m in MEMBERS]
    nets = [_build_model(c, data, cpu) for c in configs]
    step = PopulationGraphStep(nets, resident, configs, [100] * 3, "fp32")
    step.begin_epoch(torch.stack([resident.train_idx] * 3))
    step(0)
    addresses = [
        t.data_ptr() for t in step.stack.params + step.stack.avg + [p.grad for p in step.stack.params]
    ]
    step.freeze([1])
    frozen = [p.detach()[1].clone() for p in step.stack.params]
    with Recorder() as recorder:
        step(1)
    host_reads = [op for op in recorder.ops if "_local_scalar_dense" in op or "nonzero" in op]
    assert host_reads == [] and any("tensor_lr" in op for op in recorder.ops)
    assert addresses == [
        t.data_ptr() for t in step.stack.params + step.stack.avg + [p.grad for p in step.stack.params]
    ]
    assert all(torch.equal(p.detach()[1], f) for p, f in zip(step.stack.params, frozen, strict=True))
    assert not torch.equal(step.stack.params[0].detach()[0], nets[0].mlp[0].weight.detach())
