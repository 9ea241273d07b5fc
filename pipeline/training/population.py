"""Population training: a dataset's search points trained as stacked models, one batched step for all.

Grouping rule (`shape_groups`): members train together when everything that fixes the parameter shapes,
the data pairs, the split and the step's schedule of batches and evaluations is the same: arch,
hidden_dim, action_scale, jump, split, val_fraction, test_fraction, the split seed (`split_seed`, else
`seed`), batch_size, eval_every, loss, precision, device, step, threads, fp32_input_layer and delta_input
(its s' - s statistics come from the training rows: members of one data and split share them). Within a
group each member keeps its own lr, weight decay, optimizer, schedule, max_epochs, dropout, weight
average, early stopping and keep rule, and its own seed for its initial weights and its batches. So a
member takes exactly the batches and initial weights the same config trained alone would take, on the
same split (with `split_seed` unset, members of different seeds land in different groups, as their splits
differ). Each member is written by `trainer.finish` into an ordinary model directory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from invdyn._files import write_json
from pipeline.data.transitions import Transitions
from pipeline.training import search, trainer
from pipeline.training.config import TrainConfig, TrainConfigError
from pipeline.training.machine import flush_denormals, resolve_step
from pipeline.training.population_steps import PopulationEagerStep, PopulationGraphStep, member_state
from pipeline.training.resident import EVAL_CHUNK, EarlyStopping

GROUP_KEYS = (
    "arch",
    "hidden_dim",
    "action_scale",
    "jump",
    "split",
    "val_fraction",
    "test_fraction",
    "batch_size",
    "eval_every",
    "loss",
    "precision",
    "device",
    "step",
    "threads",
    "fp32_input_layer",
    "delta_input",
    "target_noise",  # one noise level per stack; each member draws from its own generator
    "obs_noise",
)


def group_key(config: TrainConfig) -> tuple:
    """What members of one group share (the module docstring says why); the split seed resolved."""
    split_seed = getattr(config, "split_seed", None)
    return (
        *(getattr(config, k, None) for k in GROUP_KEYS),
        config.seed if split_seed is None else split_seed,
    )


def _checked(configs, out_dirs=None) -> list[TrainConfig]:
    if not isinstance(configs, (list, tuple)) or not configs:
        raise TrainConfigError("a population needs a non-empty list of TrainConfig (got none)")
    if out_dirs is not None and len(out_dirs) != len(configs):
        raise TrainConfigError(
            f"a population of {len(configs)} configs needs as many output directories, got {len(out_dirs)}"
        )
    configs = [TrainConfig.from_dict(c) if isinstance(c, dict) else c for c in configs]
    for i, config in enumerate(configs):
        try:
            config.validate()
        except TrainConfigError as e:
            raise TrainConfigError(f"population member {i}: {e}") from None
    return configs


def shape_groups(configs: list[TrainConfig]) -> list[list[int]]:
    """Indices of `configs`, one list per group of members that can share a stacked step (in order)."""
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(_checked(configs)):
        groups.setdefault(group_key(config), []).append(i)
    return list(groups.values())


def train_population(
    transitions: Transitions,
    configs: list[TrainConfig],
    out_dirs: list,
    *,
    on_eval=None,
    dataset_name=None,
    figures: bool = True,
    resolved_extra: dict | None = None,
) -> list[trainer.TrainResult]:
    """Train every config on `transitions`, each group of shape-sharing configs as one stacked model; write
    member i to `out_dirs[i]` (an ordinary model directory) and return the results in the order of configs.

    `on_eval(i, record)` gets member i's learning-curve record at each of its evaluations. params.json's
    `training.resolved.population` says {"members": group size, "group": g, "index": i}."""
    configs = _checked(configs, out_dirs)
    results: list = [None] * len(configs)
    groups = shape_groups(configs)
    for g, members in enumerate(groups):
        started = time.perf_counter()
        prepared = trainer.prepare(transitions, configs[members[0]])
        with trainer.torch_threads(prepared.threads):
            with flush_denormals(prepared.device):
                fitted = _fit_group(prepared, [configs[i] for i in members], members, on_eval, started)
            for member, (i, (net, curve, stats)) in enumerate(zip(members, fitted, strict=True)):
                extra = {"population": {"members": len(members), "group": g, "index": member}}
                results[i] = trainer.finish(
                    dataclasses.replace(prepared, config=configs[i]),
                    net,
                    curve,
                    stats,
                    out_dirs[i],
                    started=started,
                    dataset_name=dataset_name,
                    figures=figures,
                    resolved_extra={**(resolved_extra or {}), **extra},
                )
    return results


def _member_net(prepared, config: TrainConfig):
    """Member's net, seeded and scaled exactly as a single training of `config` builds it."""
    return trainer.build_net(dataclasses.replace(prepared, config=config))


@dataclass
class _Member:
    """One member's bookkeeping on the host: its stopping rule, curve, kept weights and counters."""

    index: int  # position in the caller's configs (what on_eval is told)
    config: TrainConfig
    total_steps: int
    min_steps: int
    generator: torch.Generator
    stopper: EarlyStopping = None
    curve: list = field(default_factory=list)
    best: dict | None = None
    kept: dict | None = None
    steps: int = 0
    samples: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0
    stopped: bool = False


def _fit_group(prepared, configs, indices, on_eval, started) -> list[tuple]:
    """The optimization loop of one group; returns (net with kept weights, curve, stats) per member."""
    data, device = prepared.data, prepared.device
    n_train = int(data.train_idx.shape[0])
    batch = configs[0].batch_size
    per_epoch = math.ceil(n_train / batch)
    eval_every = configs[0].eval_every or per_epoch
    members = []
    for i, c in zip(indices, configs, strict=True):
        gen = torch.Generator(device=device)
        gen.manual_seed(c.seed)
        total = c.max_epochs * per_epoch
        members.append(
            _Member(
                i, c, total, c.resolved_min_epochs() * per_epoch, gen, EarlyStopping(c.patience, c.min_delta)
            )
        )
    nets = [_member_net(prepared, c) for c in configs]
    kind = resolve_step(configs[0].step, device)
    totals = [m.total_steps for m in members]
    if kind == "graph":
        take = PopulationGraphStep(nets, data, configs, totals, prepared.precision)
    else:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prepared.precision == "bf16")
        take = PopulationEagerStep(nets, data, configs, totals, autocast, prepared.precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    live = list(range(len(members)))  # rows of the stack still training (graph: every row stays in it)
    step = 0
    while live:
        perms = [
            data.train_idx[torch.randperm(n_train, device=device, generator=members[r].generator)]
            for r in live
        ]
        take.begin_epoch(_epoch_perm(take, live, perms, data.train_idx))
        t0 = time.perf_counter()
        for k in range(per_epoch):
            take(k)
            step += 1
            for r in live:
                members[r].steps += 1
                members[r].samples += min(batch, n_train - k * batch)
            due = [r for r in live if step % eval_every == 0 or step == members[r].total_steps]
            if not due:
                continue
            sync()
            t_eval = time.perf_counter()
            for r in live:
                members[r].train_time += t_eval - t0
            stopping = _evaluate(take, members, live, due, step, per_epoch, started, on_eval)
            spent = time.perf_counter() - t_eval
            for r in live:
                members[r].eval_time += spent
            if stopping:
                live = _drop(take, live, stopping)
                if not live:
                    break
            t0 = time.perf_counter()
        else:
            sync()
            for r in live:
                members[r].train_time += time.perf_counter() - t0
    return [_result(m, net, per_epoch, kind, take.captured) for m, net in zip(members, nets, strict=True)]


def _epoch_perm(take, live, perms, train_idx):
    """The epoch's permutations, one row per stack row: the eager stack holds only the live members; the
    graph step's fixed buffer holds every member (a stopped one keeps the plain order, drawing nothing)."""
    if isinstance(take, PopulationEagerStep):
        return torch.stack(perms)
    rows = [train_idx] * take.perm.shape[0]
    for r, perm in zip(live, perms, strict=True):
        rows[r] = perm
    return torch.stack(rows)


def _drop(take, live, stopping) -> list[int]:
    """Take the members that stopped out of training: out of the eager stack, masked in the graph step."""
    remaining = [r for r in live if r not in stopping]
    if isinstance(take, PopulationEagerStep):
        if remaining:
            take.keep([live.index(r) for r in remaining])
    else:
        take.freeze(stopping)
    return remaining


def _stack_row(take, live, r) -> int:
    return live.index(r) if isinstance(take, PopulationEagerStep) else r


def _evaluate(take, members, live, due, step, per_epoch, started, on_eval) -> list[int]:
    """Validate the members that are due; record, keep best weights, decide stops. Returns who stops."""
    rows = [_stack_row(take, live, r) for r in due]
    losses = take.loss.take_means(rows)
    val = _validate(take, rows)
    stopping = []
    for r, row, loss, (val_mse, val_norm) in zip(due, rows, losses, val, strict=True):
        m = members[r]
        where = f"population member {m.index} (lr={m.config.lr}, seed={m.config.seed}) at step {step}"
        if not (math.isfinite(loss) and math.isfinite(val_mse)):
            raise trainer.TrainingError(
                f"training loss {loss} / validation MSE {val_mse} of {where}; lower its lr, or use "
                "--precision fp32"
            )
        improved = m.stopper.update(val_mse, at=step)
        epoch = step / per_epoch
        record = {
            "epoch": int(epoch) if float(epoch).is_integer() else round(epoch, 4),
            "step": step,
            "train_loss": loss,
            "val_mse": val_mse,
            "val_mse_normalized": val_norm,
            "best_val_mse": m.stopper.best,
            "elapsed_s": time.perf_counter() - started,
            "train_time_s": m.train_time,
        }
        if improved or m.best is None:
            m.best = member_state(take.stack.net, row, take.stack.avg)
        m.curve.append(record)
        if on_eval is not None:
            on_eval(m.index, dict(record))
        early = m.stopper.should_stop and step >= m.min_steps
        if early or step >= m.total_steps:
            m.stopped = early
            m.kept = m.best if m.config.keep == "best" else member_state(take.stack.net, row, take.stack.avg)
            stopping.append(r)
    return stopping


@torch.no_grad()
def _validate(take, rows: list[int]) -> list[tuple[float, float]]:
    """(val MSE, normalized val MSE) of the stack rows `rows` with their averaged weights, in the training
    precision (as the single trainer's validation): one batched forward for every row."""
    stack, data = take.stack, take.data
    net = stack.net
    names = [name for name, _ in net.named_parameters()]
    weights = dict(zip(names, stack.avg, strict=True))
    k = stack.avg[0].shape[0]
    sq = torch.zeros(k, data.act.shape[1], dtype=torch.float64, device=data.act.device)
    chunk = max(256, EVAL_CHUNK // k)
    net.eval()
    try:
        with torch.inference_mode(), take.autocast:
            for start in range(0, data.val_idx.shape[0], chunk):
                idx = data.val_idx[start : start + chunk]
                obs = data.obs[idx].expand(k, -1, -1)
                nxt = data.next_obs[idx].expand(k, -1, -1)
                pred = torch.func.functional_call(net, weights, (obs, nxt), strict=False)
                sq += ((pred.float() - data.act[idx]).double() ** 2).sum(1)
    finally:
        net.train()
    per_dim = sq / max(int(data.val_idx.shape[0]), 1)
    mse, norm = per_dim.mean(1).tolist(), (per_dim / data.act_var).mean(1).tolist()
    return [(mse[r], norm[r]) for r in rows]


def _result(m: _Member, net, per_epoch: int, kind: str, captured: bool) -> tuple:
    """(net holding the member's kept weights, its curve, `finish`'s stats)."""
    net.load_state_dict(m.kept)
    net.eval()
    stats = {
        "steps": m.steps,
        "steps_per_epoch": per_epoch,
        "samples": m.samples,
        "train_time_s": m.train_time,
        "eval_time_s": m.eval_time,
        "stopped_early": m.stopped,
        "step": kind,
        "cuda_graph": captured,
    }
    return net, m.curve, stats


def point_name(point: dict) -> str:
    """A folder name for one search point: `hidden_dim-256_lr-0.001` (`default` for the empty point)."""
    if not point:
        return "default"
    text = "_".join(f"{k}-{point[k]}" for k in sorted(point))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


SEARCH_JSON = "search.json"  # what run_search_space writes beside the points' model directories


def run_search_space(
    transitions: Transitions,
    base: TrainConfig,
    space,
    out,
    on_eval=None,
    *,
    dataset_name=None,
    population: bool = True,
) -> list[trainer.TrainResult]:
    """Train every point of `space` (a dict, or `--search-space` JSON) on `base`, as one population or (with
    `population=False`) one after another; point i is written to `out/<point name>/`, and `out/search.json`
    lists every point with its validation (`heldout_mse`, what chooses) and test figures.
    `on_eval(i, record)` as in `train_population`."""
    if isinstance(space, str) or space is None:
        space = search.parse_space(space, search=False)
    points = search.grid_points(space)
    configs = [TrainConfig.from_dict({**base.to_dict(), **point}) for point in points]
    out = Path(out)
    out_dirs = [out / point_name(p) for p in points]
    if population:
        results = train_population(transitions, configs, out_dirs, on_eval=on_eval, dataset_name=dataset_name)
    else:
        results = []
        for i, (config, out_dir) in enumerate(zip(configs, out_dirs, strict=True)):
            each = None if on_eval is None else (lambda record, i=i: on_eval(i, record))
            results.append(
                trainer.train(transitions, config, out_dir, on_eval=each, dataset_name=dataset_name)
            )
    keys = ("heldout_mse", "test_mse", "test_r2", "epochs", "stopped_early")
    rows = [
        {"point": p, "model_dir": d.name, **{k: r.metrics.get(k) for k in keys}}
        for p, d, r in zip(points, out_dirs, results, strict=True)
    ]
    write_json(out / SEARCH_JSON, {"population": population, "points": rows})
    return results
