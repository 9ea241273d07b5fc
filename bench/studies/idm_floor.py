"""What could ANY inverse dynamics model I(s, s') reach? A simulator-in-the-loop oracle on the bench's test
set.

    python bench/studies/idm_floor.py --models runs/bench-quality/models   # sim suite; MODELS/<set>/<cand>/
    python bench/studies/idm_floor.py --datasets sim-halfcheetah-mixed-v0 --models runs/bench-quality/models \
        --noise '' --bias 1e-4,1e-3,1e-2 --shadow --samples 0          # how action errors turn into drift

Same test episodes (bench/quality_vs_recipe.py: 20% of episodes, --test-seed), normalizer (the dev set's
observations, as the trainer fits it), tracking starts, reference observations and metrics as
pipeline.sim.physics. Two measurements per dataset:

1. Greedy oracle tracking drift. The closed loop of pipeline.sim.physics (from a recorded state, H steps, each
   step an action toward the next recorded observation from the *simulated* state), but the action is found
   in the real simulator: least squares on the normalized distance between the observation reached and the
   recorded next one, over the action box, started from the recorded action and from 0 (the better is
   kept). No one-step IDM can land closer to each next observation; what drift remains comes from state the
   actions cannot reach in one step. Next to it: recorded actions (floor), the mean action, the models, and
   the oracle with action errors of a given MSE added (--noise: fresh each step; --bias: fixed per start).
   --shadow: the models' action MSE against the oracle's at the states of their own closed loop.
   Results and their reading: bench/studies/idm_floor.md.
2. Identifiability. From the recorded state of a held-out transition, least squares from 0 and --restarts
   random actions for the action that reproduces the recorded next observation. Reported (action MSE in
   raw units, as evaluate's heldout_mse): "solved", a start reached it (normalized RMSE <= TOL; the rest
   are solver misses on contact discontinuities, the recorded action always reaches it); "ambiguous", an
   exact solution differs from the recorded action by > SAME; "oracle MSE", best fit vs recorded action
   (misses included); "exact-solution MSE", exact solutions vs the recorded action (0 where only the
   recorded one is known): the error of an IDM that picks any action consistent with (s, s').
   "full state" knows the recorded (qpos, qvel); "observed" frees the velocities that the observation of s
   clips (Hopper / Walker2d show qvel clipped at +-10), as an IDM seeing only (s, s') must. The linearized
   `gain` = trace((J^T J)^-1) / act_dim (J: d normalized s' / d action, nuisance velocities eliminated) is
   the action MSE per unit of squared normalized state error: how sharply s' pins the action down.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
from common import load_note, machine, md_table, measured_on, parser  # noqa: E402

#: a solution "reaches" the recorded next observation when its normalized RMSE is at most this
TOL = 1e-6
#: two actions (raw units, max over dims) that both reach it are "the same" when this close
SAME = 1e-3
SIM_SUITE = "sim-halfcheetah-mixed-v0,sim-hopper-mixed-v0,sim-walker2d-mixed-v0"


class Oracle:
    """Actions found in the simulator: bounded least squares on (observation reached - target) / std."""

    def __init__(self, replay, std: np.ndarray):
        import mujoco

        self.replay, self.std, self.mujoco = replay, np.asarray(std, np.float64), mujoco
        space = replay.env.action_space
        self.low, self.high = space.low.astype(np.float64), space.high.astype(np.float64)
        self.spec = mujoco.mjtState.mjSTATE_INTEGRATION
        self.evals = 0

    def _from_state(self, state, action) -> np.ndarray:
        """Observation after one env step from MuJoCo integration state `state` with `action`."""
        self.mujoco.mj_setState(self.replay.model, self.replay.data, state, self.spec)
        self.evals += 1
        return self.replay._step(action)

    def _from_qpos_qvel(self, qpos, qvel, action) -> np.ndarray:
        self.replay._set(qpos, qvel)
        self.evals += 1
        return self.replay._step(action)

    def _residual(self, reach, target):
        d = len(self.std)
        return lambda x: (reach(x)[:d] - target[:d]) / self.std

    def fit(self, residual, x0, low, high):
        """(x, normalized RMSE of its residual) of one bounded least-squares run from x0."""
        from scipy.optimize import least_squares

        x0 = np.clip(x0, low, high)
        # dogbox: exact to ~1e-15 in a few steps where trf stalls at 1e-6 on actions at the box's edge
        sol = least_squares(
            residual,
            x0,
            bounds=(low, high),
            method="dogbox",
            xtol=1e-12,
            ftol=1e-12,
            gtol=1e-12,
            max_nfev=200,
        )
        return sol.x, float(np.sqrt(np.mean(sol.fun**2)))

    def greedy(self, state, target, starts) -> np.ndarray:
        """The action from `state` that lands closest to `target`: the best fit from each start in turn."""
        residual = self._residual(lambda a: self._from_state(state, a), target)
        best, best_cost = None, np.inf
        for x0 in starts:
            x, cost = self.fit(residual, x0, self.low, self.high)
            if cost < best_cost:
                best, best_cost = x, cost
            if best_cost <= TOL:  # reached: another start cannot do better
                break
        return best

    def solutions(self, qpos, qvel, target, free, vel_bounds, starts):
        """Every start's fit of (action, velocities qvel[free]) to `target`: [(action, cost)];
        x0 = (a0, v0)."""
        act_dim = len(self.low)

        def reach(x):
            v = np.array(qvel, np.float64)
            v[free] = x[act_dim:]
            return self._from_qpos_qvel(qpos, v, x[:act_dim])

        residual = self._residual(reach, target)
        low = np.concatenate([self.low, vel_bounds[0]])
        high = np.concatenate([self.high, vel_bounds[1]])
        out = []
        for x0 in starts:
            x, cost = self.fit(residual, x0, low, high)
            out.append((x[:act_dim], cost))
        return out

    def gain(self, qpos, qvel, action, target, free, step: float = 1e-6) -> float:
        """trace(Cov(action)) / act_dim per unit normalized state variance, linearized at the recorded action.

        Columns: one per action dim, one per free (unobserved) velocity; the velocity block is eliminated
        (Schur complement), so the gain is what (s, s') tell about the action alone. inf: not identifiable.
        """
        act_dim = len(self.low)
        x = np.concatenate([np.asarray(action, np.float64), np.asarray(qvel, np.float64)[free]])
        high = np.concatenate([self.high, np.full(len(free), np.inf)])

        def f(x):
            v = np.array(qvel, np.float64)
            v[free] = x[act_dim:]
            return self._from_qpos_qvel(qpos, v, x[:act_dim])[: len(self.std)] / self.std

        f0 = f(x)
        jac = np.empty((len(f0), len(x)))
        for j in range(len(x)):
            h = step if x[j] + step <= high[j] else -step  # stay inside the action box
            xj = x.copy()
            xj[j] += h
            jac[:, j] = (f(xj) - f0) / h
        s = np.linalg.svd(jac, compute_uv=False)
        if s.min() <= 1e-9 * s.max():
            return float("inf")
        cov = np.linalg.inv(jac.T @ jac)[:act_dim, :act_dim]
        return float(np.trace(cov) / act_dim)


def shown_velocities(replay, rows) -> np.ndarray:
    """The velocities the env's observation of the recorded states shows (these envs' obs end with qvel)."""
    nv, end = replay.transitions.qvel.shape[1], replay.env_obs_dim
    return replay.observe(rows)[:, end - nv : end]


def clipped(replay, rows) -> np.ndarray:
    """(rows, nv) bool: the qvel dims the observation of the recorded state clips (Hopper/Walker2d:
    |v| > 10)."""
    return shown_velocities(replay, rows) != replay.transitions.qvel[rows]


def tracking(
    replay, oracle, starts, horizon, std, mean_action, models, noise, seed, progress, *, bias=(), shadow=False
):
    """(drift per step, per-dim drift at H, models' action MSE vs the oracle per step) of each policy.

    Drift is the normalized RMSE vs the reference trajectory. `noise`: action-MSE levels; "oracle+noise=L"
    adds N(0, L) per action dim to the oracle's action (clipped to the box) at every step: an IDM that errs
    by L, independently each step, but corrects greedily like the oracle. "oracle+bias=L" (levels `bias`)
    adds one N(0, L) offset per start, the same at every step: errors that persist. `shadow`: also solve
    for the oracle's action at every state a model's closed loop visits, and report the model's action
    MSE against it, step by step (its error where the rollout takes it, not on recorded pairs).
    """
    from tqdm.auto import tqdm

    from pipeline.sim.physics import normalized_rmse

    tr = replay.transitions
    ref = replay.reference_trajectory(starts, horizon, std)
    bar = tqdm(
        total=len(starts) * horizon * (1 + len(noise) + len(bias) + (len(models) if shadow else 0)),
        desc=f"oracle tracking {tr.name}",
        unit="step",
        disable=not progress,
    )

    def greedy(k, obs, target):
        out = np.empty((len(obs), tr.act_dim))
        for s in range(len(obs)):
            state = replay.states[s].copy()
            out[s] = oracle.greedy(state, target[s], (tr.act[starts[s] + k], np.zeros(tr.act_dim)))
            bar.update()
        return out

    def oracle_act(level, persistent=False):
        rng = np.random.default_rng([seed, 3])
        offset = rng.normal(0, np.sqrt(level), (len(starts), tr.act_dim))

        def act(k, obs, target):
            out = greedy(k, obs, target)
            if level:
                err = offset if persistent else rng.normal(0, np.sqrt(level), out.shape)
                out = np.clip(out + err, oracle.low, oracle.high)
            return out

        return act

    vs_oracle = {}

    def model_act(name, model):
        def act(k, obs, target):
            out = model.predict(obs.astype(np.float32), target).astype(np.float64)
            if shadow:
                vs_oracle.setdefault(name, []).append(float(np.mean((out - greedy(k, obs, target)) ** 2)))
            return out

        return act

    policies = {
        "oracle": oracle_act(0.0),
        **{f"oracle+noise={level:g}": oracle_act(level) for level in noise},
        **{f"oracle+bias={level:g}": oracle_act(level, persistent=True) for level in bias},
        "recorded": lambda k, o, target: tr.act[starts + k],
        "mean_action": lambda k, o, target: np.broadcast_to(mean_action, (len(o), len(mean_action))),
    }
    policies.update({name: model_act(name, model) for name, model in models.items()})
    drift, at_h = {}, {}
    for name, act_fn in policies.items():
        sim = replay.rollout(starts, horizon, act_fn)
        drift[name] = normalized_rmse(sim, ref, std, axis=(0, 2)).tolist()
        at_h[name] = normalized_rmse(sim[:, -1], ref[:, -1], std, axis=0).tolist()
    bar.close()
    return drift, at_h, vs_oracle


def actuated_obs_dims(replay) -> np.ndarray | None:
    """Bool per observation dim: position or velocity of an actuated joint (obs = qpos[1:], qvel), else
    None."""
    m = replay.model
    if replay.env_obs_dim != m.nq - 1 + m.nv:
        return None
    joints = m.actuator_trnid[:, 0]
    mask = np.zeros(replay.env_obs_dim, bool)
    mask[m.jnt_qposadr[joints] - 1] = True  # qpos[0], the x position, is not observed
    mask[m.nq - 1 + m.jnt_dofadr[joints]] = True
    return mask


def identifiability(replay, oracle, rows, std, restarts, seed, progress) -> dict:
    """Multi-start fits of the action to each recorded transition, full state and observed state."""
    from tqdm.auto import tqdm

    tr = replay.transitions
    rng = np.random.default_rng([seed, 2])
    ref, _ = replay.references(rows, std)
    shown = shown_velocities(replay, rows)
    clip_s, clip_next = shown != tr.qvel[rows], clipped(replay, rows + 1)
    vmax = np.abs(tr.qvel).max(0)
    per_row = []
    for k, i in enumerate(tqdm(rows, desc=f"identifiability {tr.name}", unit="row", disable=not progress)):
        a0 = [np.zeros(tr.act_dim)] + [rng.uniform(oracle.low, oracle.high) for _ in range(restarts)]
        row = {"row": int(i), "clipped_s": bool(clip_s[k].any()), "clipped_next": bool(clip_next[k].any())}
        # a velocity shown at the clip value c may be anything from c to the data's largest |v| (same sign)
        free = np.flatnonzero(clip_s[k])
        edge, up = shown[k, free], tr.qvel[i, free] > 0
        bounds = (np.where(up, edge, -vmax[free]), np.where(up, vmax[free], edge))
        for kind, dims, vb in (
            ("full", np.array([], int), (np.empty(0), np.empty(0))),
            ("observed", free, bounds),
        ):
            if kind == "observed" and len(free) == 0:
                row["observed"] = row["full"]
                continue
            x0 = [np.concatenate([a, rng.uniform(vb[0], vb[1])]) for a in a0]
            sols = oracle.solutions(tr.qpos[i], tr.qvel[i], ref[k], dims, vb, x0)
            acts = np.array([a for a, _ in sols])
            costs = np.array([c for _, c in sols])
            exact = acts[costs <= TOL]
            known = np.concatenate([exact, tr.act[i][None]])  # the recorded action is a solution too
            row[kind] = {
                "reached": int(len(exact)),
                "spread": float(np.abs(known - tr.act[i]).max()),
                "best_cost": float(costs.min()),
                # the best fit vs the recorded action: the oracle's action MSE (a solver miss counts)
                "sq_err": float(((acts[costs.argmin()] - tr.act[i]) ** 2).mean()),
                # exact solutions vs the recorded action: what picking any consistent action costs
                "exact_sq_err": float(((exact - tr.act[i]) ** 2).mean()) if len(exact) else 0.0,
                "gain": oracle.gain(tr.qpos[i], tr.qvel[i], tr.act[i], ref[k], dims),
            }
        per_row.append(row)
    return {"rows": per_row, "summary": summarize(per_row)}


def summarize(per_row: list[dict]) -> dict:
    """Per subset (all / s' clipped / s' unclipped / s clipped) and kind (full / observed): the headline
    numbers."""
    subsets = {
        "all": lambda r: True,
        "next_clipped": lambda r: r["clipped_next"],
        "next_unclipped": lambda r: not r["clipped_next"],
        "s_clipped": lambda r: r["clipped_s"],
    }
    out = {}
    for sub, keep in subsets.items():
        rows = [r for r in per_row if keep(r)]
        if not rows:
            continue
        out[sub] = {"rows": len(rows)}
        for kind in ("full", "observed"):
            res = [r[kind] for r in rows]
            reached = np.array([x["reached"] for x in res])
            spread = np.array([x["spread"] for x in res])
            gain = np.array([x["gain"] for x in res])
            out[sub][kind] = {
                "solved": float((reached > 0).mean()),
                "determined": float(((reached > 0) & (spread <= SAME)).mean()),
                "ambiguous": float((spread > SAME).mean()),
                "oracle_mse": float(np.mean([x["sq_err"] for x in res])),
                "exact_mse": float(np.mean([x["exact_sq_err"] for x in res])),
                "gain_median": float(np.median(gain)),
                "gain_p90": float(np.quantile(gain, 0.9)),
                "not_identifiable": float(np.isinf(gain).mean()),
            }
    return out


def run_dataset(name: str, args, progress: bool) -> dict:
    import invdyn
    from invdyn.normalizer import GaussianNormalizer
    from pipeline.data.sources import load_transitions
    from pipeline.sim.physics import Replay, seeded_sample, window_starts
    from pipeline.training.split import split_indices

    t = load_transitions(name)
    dev, test = split_indices(t, "episodes", 0.2, args.test_seed)
    allowed = np.zeros(len(t), bool)
    allowed[test] = True
    replay = Replay(t)
    std = GaussianNormalizer.from_data(t.obs[dev]).std[: replay.env_obs_dim]  # what the trainer fits
    mean_action = t.act[dev].astype(np.float64).mean(0)
    models = {}
    if args.models:
        for d in sorted((Path(args.models) / name).glob("*/params.json")):
            model = invdyn.read_model_dir(d.parent)
            np.testing.assert_allclose(
                model.normalizer.std[: len(std)], std, rtol=1e-6, err_msg=str(d.parent)
            )
            models[d.parent.name] = model
    oracle = Oracle(replay, std)
    started = time.perf_counter()
    try:
        starts = seeded_sample(
            window_starts(replay.successor, allowed, args.horizon), args.starts, args.seed, 1
        )
        drift, at_h, vs_oracle = tracking(
            replay,
            oracle,
            starts,
            args.horizon,
            std,
            mean_action,
            models,
            args.noise,
            args.seed,
            progress,
            bias=args.bias,
            shadow=args.shadow,
        )
        actuated = actuated_obs_dims(replay)
        tracking_s = time.perf_counter() - started
        rows = seeded_sample(np.flatnonzero(replay.successor & allowed), args.samples, args.seed, 0)
        ident = identifiability(replay, oracle, rows, std, args.restarts, args.seed, progress)
    finally:
        replay.close()
    return {
        "dataset": name,
        "env_id": replay.env_id,
        "tracking_starts": int(len(starts)),
        "horizon": args.horizon,
        "drift_per_step": drift,
        "drift_per_dim_at_h": at_h,
        "model_vs_oracle_mse_per_step": vs_oracle,
        "actuated_obs_dims": None if actuated is None else actuated.tolist(),
        # how much of the squared drift at H sits in the root's (unactuated) position and velocity dims
        "unactuated_share_at_h": None
        if actuated is None
        else {k: float(np.sum(np.square(v)[~actuated]) / np.sum(np.square(v))) for k, v in at_h.items()},
        "identifiability": ident["summary"],
        "identifiability_rows": ident["rows"],
        "mean_action_mse": float(((t.act[test] - mean_action) ** 2).mean()),
        "tracking_s": tracking_s,
        "wall_s": time.perf_counter() - started,
        "sim_evals": oracle.evals,
    }


def table(results: list[dict], horizon: int) -> str:
    """Markdown: drift at H per policy, identifiability per subset."""
    names = list(dict.fromkeys(k for r in results for k in r["drift_per_step"]))
    drift = [
        [r["dataset"], r["tracking_starts"]]
        + [f"{r['drift_per_step'][n][-1]:.4f}" if n in r["drift_per_step"] else "n/a" for n in names]
        for r in results
    ]
    lines = md_table(["dataset", "starts", *(f"{n} drift@{horizon}" for n in names)], drift)
    shadowed = [
        (r["dataset"], n, v)
        for r in results
        for n, v in (r.get("model_vs_oracle_mse_per_step") or {}).items()
    ]
    if shadowed:
        lines += ["", "Models' action MSE vs the oracle's action at the states of their own closed loop:", ""]
        lines += md_table(
            ["dataset", "model", "step 1", "step 8", "step H", "mean over steps"],
            [
                [d, n, f"{v[0]:.4f}", f"{v[min(7, len(v) - 1)]:.4f}", f"{v[-1]:.4f}", f"{np.mean(v):.4f}"]
                for d, n, v in shadowed
            ],
        )
    shares = [r for r in results if r.get("unactuated_share_at_h")]
    if shares:
        lines += ["", f"Share of the squared drift at {horizon} in unactuated (root) dims:", ""]
        lines += md_table(
            ["dataset", *names],
            [
                [r["dataset"], *(f"{r['unactuated_share_at_h'][n]:.2f}" if n in r["unactuated_share_at_h"]
                                 else "n/a" for n in names)]
                for r in shares
            ],
        )  # fmt: skip
    head = ["dataset", "rows", "subset", "state", "solved", "determined", "ambiguous", "oracle action MSE"]
    head += ["exact-solution MSE", "gain median", "gain p90", "gain inf"]
    ident = []
    for r in results:
        for sub, s in r["identifiability"].items():
            for kind in ("full", "observed"):
                k = s[kind]
                ident.append(
                    [r["dataset"], s["rows"], sub, kind]
                    + [f"{k[key]:.2f}" for key in ("solved", "determined", "ambiguous")]
                    + [f"{k['oracle_mse']:.2e}", f"{k['exact_mse']:.2e}"]
                    + [f"{k['gain_median']:.3g}", f"{k['gain_p90']:.3g}", f"{k['not_identifiable']:.2f}"]
                )
    lines += ["", *md_table(head, ident)]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for name, curve in r["drift_per_step"].items():
            if name != "recorded":
                ax.plot(np.arange(1, len(curve) + 1), curve, label=name)
        ax.set(title=r["dataset"], xlabel="step", ylabel="drift (normalized RMSE)", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--datasets", default=SIM_SUITE)
    ap.add_argument("--models", default=None, help="folder of <dataset>/<candidate>/ model dirs to track too")
    ap.add_argument("--out", default="runs/idm-floor")
    ap.add_argument("--horizon", type=int, default=32)
    ap.add_argument("--starts", type=int, default=100, help="tracking starts per dataset")
    ap.add_argument("--samples", type=int, default=200, help="held-out transitions for identifiability")
    ap.add_argument("--restarts", type=int, default=6, help="random starts per transition (besides 0)")
    ap.add_argument(
        "--noise",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[1e-3, 1e-2],
        help="action-MSE levels of noise added to the oracle's tracking actions (comma list; '' for none)",
    )
    ap.add_argument(
        "--bias",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[],
        help="action-MSE levels of a per-start constant offset added to the oracle's actions (comma list)",
    )
    ap.add_argument(
        "--shadow", action="store_true", help="models' action MSE vs the oracle in their own loop"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-seed", type=int, default=1234, help="as bench/quality_vs_recipe.py")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = machine("CPU only, 1 torch thread, " + load_note())
    results = []
    for name in args.datasets.split(","):
        results.append({**run_dataset(name, args, progress=True), "machine": where})
        (out / "results.json").write_text(json.dumps(results, indent=1))
        r = results[-1]
        print(
            f"{name}: "
            + ", ".join(f"{k} {v[-1]:.4f}" for k, v in r["drift_per_step"].items())
            + f"  ({r['wall_s']:.0f}s, {r['sim_evals']} sim steps)",
            flush=True,
        )
    text = f"Machine: {measured_on(results)}.\n\n" + table(results, args.horizon)
    (out / "table.md").write_text(text)
    plot(results, out / "drift.png")
    print()
    print(text)
    print(f"written: {out}/results.json, {out}/table.md, {out}/drift.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
