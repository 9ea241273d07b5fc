"""Could a better one-step model rescue the feasibility score on halfcheetah? Three scores of the same
ensemble on the same test pairs, against s' + noise at 1 / 5 / 20 % of the state std:

    python bench/studies/feasibility_probe.py \
        --pairs sim-halfcheetah-medium-v0=runs/ens_agents/sim-halfcheetah-medium-v0

- shipped: `model.feasibility` (linear one-step model s'_n ~ [s_n, a, 1], Mahalanobis distance);
- leave-one-out linear: each s' dimension from [s_n, a, the other s' dimensions, 1] (positions follow from
  velocities), residuals divided by their validation variance;
- MLP one-step: a 2x256 SiLU net from [s_n, a] to s'_n - s_n (30 epochs, one-cycle Adam), same residual score.
Fitted on member 0's training pairs, scaled on its validation pairs, measured on the bench's test episodes
(15 %, seed 1234, as bench/ensembles.py). Prints a Markdown table; its recorded run and reading are in
bench/ensembles.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/: common
from common import load_note, machine, md_table, parser  # noqa: E402

LEVELS = (0.01, 0.05, 0.20)
HEADER = ["dataset", "score", "AUROC 1%", "AUROC 5%", "AUROC 20%"]


def leave_one_out(o, a, n):
    """Per s' dimension j, least squares from [o, a, n without j, 1]: a (features, obs_dim) weight matrix."""
    x = np.concatenate([o, a, n, np.ones((len(o), 1))], 1)
    k, dim = o.shape[1] + a.shape[1], o.shape[1]
    weights = np.zeros((x.shape[1], dim))
    for j in range(dim):
        cols = [c for c in range(x.shape[1]) if c != k + j]
        weights[cols, j] = np.linalg.lstsq(x[:, cols], n[:, j], rcond=None)[0]
    return lambda o, a, n: n - np.concatenate([o, a, n, np.ones((len(o), 1))], 1) @ weights


def mlp_one_step(o, a, n, epochs: int = 30):
    import torch

    torch.manual_seed(0)
    x, y = (
        torch.tensor(np.concatenate([o, a], 1), dtype=torch.float32),
        torch.tensor(n - o, dtype=torch.float32),
    )
    y_mean, y_std = y.mean(0), y.std(0) + 1e-6
    net = torch.nn.Sequential(
        torch.nn.Linear(x.shape[1], 256),
        torch.nn.SiLU(),
        torch.nn.Linear(256, 256),
        torch.nn.SiLU(),
        torch.nn.Linear(256, y.shape[1]),
    )
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * ((len(x) + 255) // 256))
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 256):
            b = perm[i : i + 256]
            loss = ((net(x[b]) - (y[b] - y_mean) / y_std) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def residual(o, a, n):
        with torch.no_grad():
            pred = net(torch.tensor(np.concatenate([o, a], 1), dtype=torch.float32)) * y_std + y_mean
        return n - o - pred.numpy()

    return residual


def probe(name: str, model_dir: str) -> list[str]:
    import invdyn
    from pipeline.data.sources import load_transitions
    from pipeline.quality.recipe import subset
    from pipeline.training.ensemble import auroc
    from pipeline.training.split import split_from_training, split_indices

    t = load_transitions(name)
    dev, test = split_indices(t, "episodes", 0.15, 1234)
    dev_set = subset(t, dev, "bench-dev-1234")
    model = invdyn.read_model_dir(model_dir)
    train, val, _ = split_from_training(dev_set, model.params["training"])
    nz = model.normalizer

    def pairs(data, rows, action=None):
        o, n = nz.normalize(data.obs[rows]), nz.normalize(data.next_obs[rows])
        a = data.act[rows] if action is None else action
        return o.astype(np.float64), np.asarray(a, np.float64), n.astype(np.float64)

    scores = {"shipped (linear)": None}
    for label, fit in (("leave-one-out linear", leave_one_out), ("MLP one-step", mlp_one_step)):
        residual = fit(*pairs(dev_set, train))
        o, _, n = pairs(dev_set, val)
        var = (residual(o, model.predict(dev_set.obs[val], dev_set.next_obs[val]), n) ** 2).mean(0)
        scores[label] = (residual, var)
    rng = np.random.default_rng(1234)
    obs, nxt = t.obs[test], t.next_obs[test]
    noisy = {lvl: nxt + lvl * nz.std * rng.standard_normal(nxt.shape) for lvl in LEVELS}
    rows = []
    for label, fitted in scores.items():

        def score(next_obs, fitted=fitted):
            next_obs = next_obs.astype(np.float32)
            if fitted is None:
                return model.feasibility(obs, next_obs)
            residual, var = fitted
            o, a, n = nz.normalize(obs), model.predict(obs, next_obs), nz.normalize(next_obs)
            return -(residual(o.astype(np.float64), a, n.astype(np.float64)) ** 2 / var).mean(-1)

        real = score(nxt)
        cells = " | ".join(f"{auroc(real, score(noisy[lvl])):.3f}" for lvl in LEVELS)
        rows.append(md_table(HEADER, [[name, label, cells]])[-1])
    return rows


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument(
        "--pairs", required=True, help="comma-separated DATASET=ENSEMBLE_DIR (bench/ensembles.py's)"
    )
    args = ap.parse_args(argv)
    print(f"Machine: {machine('CPU only, ' + load_note())}.\n")
    print("\n".join(md_table(HEADER, [])))
    for pair in args.pairs.split(","):
        name, model_dir = pair.split("=", 1)
        for row in probe(name, model_dir):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
