"""What bounds walker2d-mixed: the velocity clip, the data size, the inputs or the model? Each lever on TEST
episodes over split seeds (issue 16 item 3); writes the issue-16 levers section of
bench/studies/quality_limits.md.

    nice -n 10 python bench/studies/walker_levers.py --threads 1          # every lever, split seeds 0,1,2
    nice -n 10 python bench/studies/walker_levers.py --steps clip,oracle --threads 1   # only some levers
    python bench/studies/walker_levers.py --no-run                        # only rewrite the section

Protocol as bench/accuracy_table.py: test = 15 % of the episodes per split seed, which nothing chooses on;
the champion is `TrainConfig()` as shipped, capped at --epochs, threads --threads. Walker2d's 50k champions
are the accuracy table's (runs/accuracy_table/models/, reused, not retrained). Levers:

- clip: the champion's test MSE / R² on rows with no joint velocity at the +-10 observation clip, clipped in s
  or s' only, clipped in both (and on sim-halfcheetah-medium-v0, agent data, where |v| >= 10 is not clipped).
- oracle: bench/studies/idm_floor.py's identifiability on test rows of each clip group: does (s, s') fix
  the action when the raw velocities (infos/qvel) are hidden behind the clip?
- scale200k / scale1m: the champion on 200k / 1M simulated transitions (`pipeline.simulate`, seed 0).
- features: the same model and trainer on (s, s', s' - s) and on (s_{t-1}, s, s') instead of (s, s').
- ensemble: the mean of 3 members (init seeds 0, 1, 2 on one split) vs one member.
- groups: the data and input levers' models scored per clip group (after those levers ran).

Every finished unit is cached as JSON under --work/results/, so a rerun only writes the section.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/studies/: idm_floor
from common import ROOT, add_out, add_threads, add_work, load_note, machine, measured_on, parser  # noqa: E402

WALKER = "sim-walker2d-mixed-v0"
CHEETAH = "sim-halfcheetah-medium-v0"
STEPS = ("clip", "oracle", "scale200k", "features", "scale1m", "ensemble", "groups")
GROUPS = ("none", "one", "both")  # no velocity at the clip / in s or s' but not both / in s and s'
GROUP_TEXT = {"none": "(a) no velocity at the clip", "one": "(b) s or s', not both", "both": "(c) s and s'"}
FEATURE_TEXT = {"delta": "(s, s', s' - s)", "window": "(s_{t-1}, s, s')"}
FEATURES = tuple(FEATURE_TEXT)
SECTION = "## Issue 16: what bounds walker2d-mixed"
READING = "Reading (by hand, kept by reruns):"
SIMULATE = [
    f"python -m pipeline.simulate {name} --transitions {n} --seed 0 --out runs/walker_levers/data/{n}"
    for name, n in ((CHEETAH, 50_000), (WALKER, 200_000), (WALKER, 1_000_000))
]


def parse_args(argv=None):
    ap = parser(__doc__)
    ap.add_argument(
        "--steps", default=",".join(STEPS), help=f"levers to run, in order (of {','.join(STEPS)})"
    )
    ap.add_argument("--split-seeds", default="0,1,2", help="split seeds to repeat over")
    ap.add_argument("--epochs", type=int, default=30, help="epoch cap of every training (as the table)")
    ap.add_argument("--epochs-1m", type=int, default=10, help="epoch cap at 1M transitions")
    ap.add_argument("--seeds-1m", default="0", help="split seeds at 1M transitions")
    ap.add_argument("--oracle-rows", type=int, default=200, help="test rows per clip group for the oracle")
    ap.add_argument("--restarts", type=int, default=6, help="oracle: random starts per row (besides 0)")
    add_threads(ap, 1)
    add_work(ap, ROOT / "runs" / "walker_levers")
    ap.add_argument(
        "--champions",
        default=str(ROOT / "runs" / "accuracy_table" / "models"),
        help="the accuracy table's models (<dataset>/split-<s>/champion), reused at 50k",
    )
    record = ROOT / "bench" / "studies" / "quality_limits.md"
    add_out(ap, record, "the record whose issue-16 section it rewrites")
    ap.add_argument("--no-run", action="store_true", help="only write the section from cached results")
    return ap.parse_args(argv)


def data_spec(name: str, size: int, work: Path) -> str:
    """Walker2d at 50k: the catalog's file (the accuracy table's data); otherwise a file simulated once."""
    if name == WALKER and size == 50_000:
        return name
    from pipeline.sim.simulate import simulate

    path = work / "data" / str(size) / f"{name}.hdf5"
    if not path.is_file():
        simulate(name, transitions=size, seed=0, out_dir=path.parent, progress=False)
    return str(path)


def champion_config(split_seed: int, epochs: int, threads: int, seed: int = 0):
    from pipeline.training.config import TrainConfig

    return dataclasses.replace(
        TrainConfig(), seed=seed, split_seed=split_seed, max_epochs=epochs, threads=threads
    )


def train_one(t, config, out_dir: Path) -> dict:
    """Train (or reuse a finished) model directory; its test metrics and how much training it got."""
    from pipeline.training.trainer import train

    params = out_dir / "params.json"
    if not params.is_file():
        train(t, config, out_dir, figures=False)
    return summary(out_dir)


def summary(model_dir: Path) -> dict:
    params = json.loads((Path(model_dir) / "params.json").read_text())
    m = params["metrics"]
    keys = ("test_mse", "test_r2", "test_mse_normalized", "epochs", "steps", "best_epoch", "train_time_s")
    return {
        "model_dir": str(model_dir),
        "transitions": params["dataset"]["transitions"],
        **{k: m[k] for k in keys},
    }


def champion_dir(name: str, split_seed: int, args, work: Path) -> Path:
    """The shipped champion at 50k on `split_seed`: the accuracy table's for walker2d, else trained here."""
    if name == WALKER:
        d = Path(args.champions) / name / f"split-{split_seed}" / "champion"
        if not (d / "params.json").is_file():
            raise SystemExit(f"{d} is missing; run bench/accuracy_table.py --datasets {WALKER} first")
        return d
    from pipeline.data.sources import load_transitions

    d = work / "models" / name / "50000" / f"split-{split_seed}"
    train_one(
        load_transitions(data_spec(name, 50_000, work)),
        champion_config(split_seed, args.epochs, args.threads),
        d,
    )
    return d


def clip_groups(t) -> dict:
    """Row masks: no velocity at |v| >= 10 in s nor s', at it in exactly one, in both (facts' rule)."""
    from pipeline.data.facts import VELOCITY_CLIP, VELOCITY_DIMS

    nv = VELOCITY_DIMS["walker2d" if "walker2d" in t.name else "halfcheetah"]
    at = VELOCITY_CLIP - 1e-6
    in_s = (np.abs(t.obs[:, -nv:]) >= at).any(1)
    in_next = (np.abs(t.next_obs[:, -nv:]) >= at).any(1)
    return {"none": ~in_s & ~in_next, "one": in_s ^ in_next, "both": in_s & in_next}


def test_rows(t, model_dir: Path) -> np.ndarray:
    from pipeline.training.split import split_from_training

    params = json.loads((Path(model_dir) / "params.json").read_text())
    return split_from_training(t, params["training"])[2]


def scores(pred: np.ndarray, act: np.ndarray) -> dict:
    """Action MSE (raw units) and R² (mean over dims of 1 - MSE / variance of these rows' actions)."""
    err = ((pred - act) ** 2).mean(0)
    var = act.var(0)
    return {"mse": float(err.mean()), "r2": float(np.mean(1 - err / var)), "rows": int(len(act))}


def measure_clip(name: str, split_seed: int, args, work: Path) -> dict:
    """The champion's test MSE / R² per clip group, and each group's share of the test rows and error."""
    import invdyn
    from pipeline.data.sources import load_transitions

    t = load_transitions(data_spec(name, 50_000, work))
    d = champion_dir(name, split_seed, args, work)
    test = test_rows(t, d)
    pred = invdyn.read_model_dir(d).predict(t.obs[test], t.next_obs[test])
    out = {"dataset": name, "split_seed": split_seed, "all": scores(pred, t.act[test]), "params": summary(d)}
    sq = ((pred - t.act[test]) ** 2).mean(1)
    for g, mask in clip_groups(t).items():
        keep = mask[test]
        out[g] = {**scores(pred[keep], t.act[test][keep]), "share": float(keep.mean())}
        out[g]["error_share"] = float(sq[keep].sum() / sq.sum())
    return out


def measure_oracle(group: str, args, work: Path) -> dict:
    """bench/studies/idm_floor.py's identifiability on `--oracle-rows` test rows (split seed 0) of one clip
    group."""
    import idm_floor

    from invdyn.normalizer import GaussianNormalizer
    from pipeline.data.sources import load_transitions
    from pipeline.sim.physics import Replay, seeded_sample

    t = load_transitions(WALKER)
    test = np.zeros(len(t), bool)
    test[test_rows(t, champion_dir(WALKER, 0, args, work))] = True
    replay = Replay(t)
    try:
        std = GaussianNormalizer.from_data(t.obs).std[: replay.env_obs_dim]  # the trainer's normalizer
        rows = seeded_sample(
            np.flatnonzero(replay.successor & test & clip_groups(t)[group]), args.oracle_rows, 0, 0
        )
        started = time.perf_counter()
        res = idm_floor.identifiability(
            replay, idm_floor.Oracle(replay, std), rows, std, args.restarts, 0, False
        )
    finally:
        replay.close()
    return {"group": group, "summary": res["summary"]["all"], "wall_s": time.perf_counter() - started}


def with_delta(t):
    """(s, s' - s) -> (s', s' - s): the model sees s, s' - s, s', s' - s (the difference as an input)."""
    d = t.next_obs - t.obs
    return dataclasses.replace(
        t, name=t.name + "+delta", obs=np.hstack([t.obs, d]), next_obs=np.hstack([t.next_obs, d])
    )


def with_window(t):
    """(s_{t-1}, s) -> (s, s'): the model sees s_{t-1}, s, s, s'; s_{t-1} = s at an episode's first row."""
    from pipeline.sim.physics import successor_mask

    prev = t.obs.copy()
    has_prev = np.concatenate([[False], successor_mask(t)[:-1]])  # row i-1 led to row i
    prev[has_prev] = t.obs[np.flatnonzero(has_prev) - 1]
    return dataclasses.replace(
        t, name=t.name + "+window", obs=np.hstack([prev, t.obs]), next_obs=np.hstack([t.obs, t.next_obs])
    )


def measure_features(kind: str, split_seed: int, args, work: Path) -> dict:
    from pipeline.data.sources import load_transitions

    t = {"delta": with_delta, "window": with_window}[kind](load_transitions(WALKER))
    d = work / "models" / f"{WALKER}+{kind}" / f"split-{split_seed}"
    return {
        "kind": kind,
        "split_seed": split_seed,
        **train_one(t, champion_config(split_seed, args.epochs, args.threads), d),
    }


def measure_scale(size: int, split_seed: int, epochs: int, args, work: Path) -> dict:
    from pipeline.data.sources import load_transitions

    t = load_transitions(data_spec(WALKER, size, work))
    d = work / "models" / WALKER / str(size) / f"e{epochs}-split-{split_seed}"
    return {
        "size": size,
        "split_seed": split_seed,
        **train_one(t, champion_config(split_seed, epochs, args.threads), d),
    }


def measure_ensemble(split_seed: int, args, work: Path) -> dict:
    """Members: the champion (init seed 0), init seeds 1 and 2 on the same split; the ensemble: their mean."""
    import invdyn
    from pipeline.data.sources import load_transitions

    t = load_transitions(WALKER)
    dirs = [champion_dir(WALKER, split_seed, args, work)]
    for seed in (1, 2):
        d = work / "models" / f"{WALKER}-member{seed}" / f"split-{split_seed}"
        train_one(t, champion_config(split_seed, args.epochs, args.threads, seed=seed), d)
        dirs.append(d)
    test = test_rows(t, dirs[0])
    preds = [invdyn.read_model_dir(d).predict(t.obs[test], t.next_obs[test]) for d in dirs]
    members = [scores(p, t.act[test]) for p in preds]
    return {"split_seed": split_seed, "members": members, "ensemble": scores(np.mean(preds, 0), t.act[test])}


def measure_groups(key: str, row: dict, work: Path) -> dict:
    """A data or input lever's model (cached result `row`) scored per clip group on its test rows."""
    import invdyn
    from pipeline.data.sources import load_transitions

    t = load_transitions(data_spec(WALKER, row.get("size", 50_000), work))
    seen = {"delta": with_delta, "window": with_window}.get(row.get("kind"), lambda x: x)(t)
    test = test_rows(seen, Path(row["model_dir"]))
    pred = invdyn.read_model_dir(row["model_dir"]).predict(seen.obs[test], seen.next_obs[test])
    out = {"lever": key}
    for g, mask in clip_groups(t).items():
        keep = mask[test]
        out[g] = {**scores(pred[keep], t.act[test][keep]), "share": float(keep.mean())}
    return out


def units(args) -> list[tuple[str, object]]:
    """(cache key, thunk) of every measurement the chosen steps ask for, in the order they run."""
    from pipeline.training.repeats import parse_seeds

    seeds, work = parse_seeds(args.split_seeds), Path(args.work)
    out = []
    for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
        if step not in STEPS:
            raise SystemExit(f"--steps: unknown step {step!r}; known: {','.join(STEPS)}")
        if step == "clip":
            out += [
                (f"clip-{n}-s{s}", lambda n=n, s=s: measure_clip(n, s, args, work))
                for n in (WALKER, CHEETAH)
                for s in seeds
            ]
        elif step == "oracle":
            out += [(oracle_key(g, args), lambda g=g: measure_oracle(g, args, work)) for g in GROUPS]
        elif step == "scale200k":
            out += [
                (
                    f"scale-200000-e{args.epochs}-s{s}",
                    lambda s=s: measure_scale(200_000, s, args.epochs, args, work),
                )
                for s in seeds
            ]
        elif step == "scale1m":
            e = args.epochs_1m
            out += [
                (f"scale-1000000-e{e}-s{s}", lambda s=s, e=e: measure_scale(1_000_000, s, e, args, work))
                for s in parse_seeds(args.seeds_1m)
            ]
        elif step == "features":
            out += [
                (f"features-{k}-s{s}", lambda k=k, s=s: measure_features(k, s, args, work))
                for k in FEATURES
                for s in seeds
            ]
        elif step == "groups":  # after the levers it scores: their cached results
            done = load_results(work)
            out += [
                (f"groups-{k}", lambda k=k, r=r: measure_groups(k, r, work))
                for k, r in done.items()
                if k.startswith(("scale-", "features-"))
            ]
        else:
            out += [(f"ensemble-s{s}", lambda s=s: measure_ensemble(s, args, work)) for s in seeds]
    return out


def load_results(work: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json"))}


def cell(values, spec: str = ".4g") -> str:
    from pipeline.training.repeats import fmt_interval, interval

    return fmt_interval(interval(values), spec)


def clip_table(results: dict) -> list[str]:
    """Per dataset and clip group: share of the test rows, MSE, R², share of the squared error."""
    lines = [
        "| dataset | clip group | share of test rows | test MSE | R² (group's own action variance) | "
        "share of sq. error |",
        "|---|---|---|---|---|---|",
    ]
    for name in (WALKER, CHEETAH):
        rs = [r for k, r in results.items() if k.startswith(f"clip-{name}-")]
        if not rs:
            continue
        mse, r2 = cell(r["all"]["mse"] for r in rs), cell((r["all"]["r2"] for r in rs), ".3f")
        lines.append(f"| {name} | all | 1 | {mse} | {r2} | 1 |")
        for g in GROUPS:
            lines.append(
                f"| {name} | {GROUP_TEXT[g]} | {cell((r[g]['share'] for r in rs), '.3f')} | "
                f"{cell(r[g]['mse'] for r in rs)} | {cell((r[g]['r2'] for r in rs), '.3f')} | "
                f"{cell((r[g]['error_share'] for r in rs), '.3f')} |"
            )
    return lines


def oracle_key(group: str, args) -> str:
    return f"oracle-{group}-n{args.oracle_rows}-r{args.restarts}"


def oracle_table(results: dict, args) -> list[str]:
    lines = [
        "| clip group | rows | state | solved | ambiguous | oracle action MSE (best fit) | "
        "exact-solution MSE | gain median | gain p90 | gain inf |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in GROUPS:
        for r in [results[oracle_key(g, args)]] if oracle_key(g, args) in results else []:
            for kind in ("full", "observed"):
                x = r["summary"][kind]
                lines.append(
                    f"| {GROUP_TEXT[g]} | {r['summary']['rows']} | {kind} | {x['solved']:.3f} | "
                    f"{x['ambiguous']:.3f} | {x['oracle_mse']:.1e} | {x['exact_mse']:.0e} | "
                    f"{x['gain_median']:.3g} | {x['gain_p90']:.3g} | {x['not_identifiable']:.3f} |"
                )
    return lines


def lever_rows(results: dict) -> list[tuple[str, list[dict]]]:
    """(lever, per-seed rows with test_mse, test_r2, transitions, epochs, steps, split_seed)."""
    base = [
        {**r["params"], "split_seed": r["split_seed"]}
        for k, r in results.items()
        if k.startswith(f"clip-{WALKER}-")
    ]
    out = [("(s, s'), 50k (the shipped champion)", base)]
    for size in (200_000, 1_000_000):
        for e in sorted({int(k.split("-")[2][1:]) for k in results if k.startswith(f"scale-{size}-")}):
            rs = [r for k, r in results.items() if k.startswith(f"scale-{size}-e{e}-")]
            out.append((f"(s, s'), {size // 1000}k, {e} epochs", rs))
    for kind, text in FEATURE_TEXT.items():
        out.append((f"{text}, 50k", [r for k, r in results.items() if k.startswith(f"features-{kind}-")]))
    ens = [r for k, r in results.items() if k.startswith("ensemble-")]
    one = [
        {
            "test_mse": float(np.mean([m["mse"] for m in r["members"]])),
            "test_r2": float(np.mean([m["r2"] for m in r["members"]])),
            "split_seed": r["split_seed"],
        }
        for r in ens
    ]
    out.append(("one member (mean over the 3 members), 50k", one))
    out.append(
        (
            "ensemble of 3 (mean of init seeds 0, 1, 2), 50k",
            [
                {
                    "test_mse": r["ensemble"]["mse"],
                    "test_r2": r["ensemble"]["r2"],
                    "split_seed": r["split_seed"],
                }
                for r in ens
            ],
        )
    )
    return [(name, rs) for name, rs in out if rs]


def group_table(results: dict) -> list[str]:
    """Test MSE per clip group of the 50k champion and of each data / input lever's model."""
    from pipeline.training.repeats import interval

    base = {k.removeprefix("clip-"): r for k, r in results.items() if k.startswith(f"clip-{WALKER}-")}
    levers = {"(s, s'), 50k (the shipped champion)": list(base.values())}
    order = (
        "groups-scale-200000-",
        "groups-scale-1000000-",
        "groups-features-delta-",
        "groups-features-window-",
    )
    for prefix in order:
        for k, r in results.items():
            if k.startswith(prefix):
                what = k.split("-")  # groups-scale-SIZE-eEPOCHS-sSEED / groups-features-KIND-sSEED
                name = (
                    f"(s, s'), {int(what[2]) // 1000}k, {what[3][1:]} epochs"
                    if what[1] == "scale"
                    else f"{FEATURE_TEXT[what[2]]}, 50k"
                )
                levers.setdefault(name, []).append(r)
    lines = [
        "| model | split seeds | (a) MSE | (b) MSE | (c) MSE | (c) / (a) |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in levers.items():
        ratio = interval(r["both"]["mse"] / r["none"]["mse"] for r in rs)
        cells = " | ".join(cell(r[g]["mse"] for r in rs) for g in GROUPS)
        lines.append(f"| {name} | {len(rs)} | {cells} | {cell([ratio['mean']], '.3f')} |")
    return lines


def lever_table(results: dict) -> list[str]:
    """Every lever's test MSE / R² over its seeds, and per seed its MSE change vs the 50k champion."""
    levers = lever_rows(results)
    base = {r["split_seed"]: r["test_mse"] for r in levers[0][1]} if levers else {}
    lines = [
        "| lever | split seeds | gradient steps (epochs) | test MSE | R² | "
        "test MSE / the 50k champion's, per seed |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in levers:
        rs = sorted(rs, key=lambda r: r["split_seed"])
        steps = sorted({f"{r['steps']:,} ({r['epochs']})" for r in rs if "steps" in r})
        delta = ", ".join(
            f"s{r['split_seed']}: {r['test_mse'] / base[r['split_seed']]:.3f}x"
            for r in rs
            if r["split_seed"] in base
        )
        lines.append(
            f"| {name} | {','.join(str(r['split_seed']) for r in rs)} | {'; '.join(steps) or '-'} | "
            f"{cell(r['test_mse'] for r in rs)} | {cell((r['test_r2'] for r in rs), '.3f')} | {delta} |"
        )
    return lines


def write_section(results: dict, args) -> None:
    """Replace this bench's section of --out (from its heading to the hand-written reading, the next `## `
    section or the end) with the tables of `results`; the reading below the tables is kept as written."""
    lines = [
        SECTION + " (the clip, data, inputs, ensembles; test episodes, split seeds 0, 1, 2)",
        "",
        "Written by `bench/studies/walker_levers.py` (its docstring says what each lever is). Machine: "
        f"{measured_on(list(results.values()))}; every training `--threads 1`, under `nice -n 10`.",
        "",
        "```bash",
        *SIMULATE,
        f"nice -n 10 python bench/studies/walker_levers.py --threads 1 --epochs {args.epochs} "
        f"--epochs-1m {args.epochs_1m} --seeds-1m {args.seeds_1m} --oracle-rows {args.oracle_rows} "
        f"--restarts {args.restarts}",
        *[
            "nice -n 10 python bench/studies/walker_levers.py --threads 1 --steps scale1m,groups "
            f"--epochs-1m {e}"
            for e in sorted({int(k.split("-")[2][1:]) for k in results if k.startswith("scale-1000000-")})
            if e != args.epochs_1m
        ],
        "```",
        "",
        "Protocol: test = 15 % of the episodes of each split seed (the accuracy table's split, which no "
        f"choice read); champion = `TrainConfig()` as shipped (FancyMlp h512), capped at {args.epochs} "
        "epochs; the 50k walker2d champions are the accuracy table's (runs/accuracy_table/models/), reused. "
        'Cells: mean ± sample std over the split seeds. A velocity is "at the clip" when |v| >= 10 in the '
        "observation (the rule of `pipeline/data/facts.py`); Walker2d-v5 clips its observed qvel there, "
        "HalfCheetah-v5 does not (its rows at |v| >= 10 show the true velocity).",
        "",
        "**1. The clip.** The champion's test error split by where the velocities sit:",
        "",
        *clip_table(results),
        "",
        "The oracle on test rows of each group (split seed 0; `bench/studies/idm_floor.py`'s "
        "identifiability: "
        f"bounded least squares in MuJoCo from 0 and {args.restarts} random actions, float64 references "
        'from infos/qpos, infos/qvel). "full": the raw (qpos, qvel) is known; "observed": the velocities '
        "the observation of s clips are unknowns too (between the clip and the data's largest |v|), as for "
        "an IDM seeing only (s, s'); a clipped velocity of s' gives no residual, as the observation shows "
        "only the clip. Gain = action MSE per unit squared normalized state error (how sharply s' pins the "
        "action):",
        "",
        *oracle_table(results, args),
        "",
        "**2-4. Data, inputs, ensembles** (walker2d-mixed, same model and trainer; the 200k / 1M files are "
        "simulated with the same policy mix and split with the same fractions):",
        "",
        *lever_table(results),
        "",
        "Test MSE per clip group ((a) no velocity at the clip, (b) in s or s', (c) in both; as in 1.):",
        "",
        *group_table(results),
        "",
    ]
    path = Path(args.out)
    text = path.read_text()
    start = text.find(SECTION)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))
        return
    ends = [i for i in (text.find(READING, start), text.find("\n## ", start + 1)) if i >= 0]
    end = min(ends) if ends else len(text)
    path.write_text(
        text[:start] + "\n".join(lines) + ("\n" if end < len(text) else "") + text[end:].lstrip("\n")
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    where = machine("CPU only, " + load_note())  # recorded with every unit measured now
    (work / "results").mkdir(parents=True, exist_ok=True)
    for key, thunk in [] if args.no_run else units(args):
        path = work / "results" / f"{key}.json"
        if path.is_file():
            continue
        print(f"{key}: measuring ...", flush=True)
        started = time.perf_counter()
        row = thunk()
        row["machine"] = where
        row["wall_s"] = row.get("wall_s", time.perf_counter() - started)
        path.write_text(json.dumps(row, indent=1, default=float))
        print(f"{key}: done in {time.perf_counter() - started:.0f} s", flush=True)
        write_section(load_results(work), args)
    write_section(load_results(work), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
