"""Our training loop vs CleanDiffuser's recipe re-created with pytorch-lightning, on the same data and
machine.

    python bench/train_throughput.py                       # sim-halfcheetah-mixed-v0, ~3-5 min on 2 cores
    python bench/train_throughput.py --dataset PATH_OR_NAME --epochs 3 --rounds 3 --max-epochs 300

Table 1 (equal epochs, the recipe's random 80/20 transition split, last weights): train samples/s
(time inside training batches, validation excluded) and validation MSE after --epochs epochs, for
the recipe (LightningModule, DataLoader of per-item dicts, batch 512, Adam 3e-4) and our loop in
fp32, in bf16, and with the recipe's model and optimizer settings (the loop alone); on CUDA also with
the eager step instead of the CUDA graph (what the graph adds). The "step" column says how each ran
(a graph step that could not be captured shows as such). The speed ratio, and our GFLOP/s against the
matmul peak of the precision trained in, measured in this run. Runs are interleaved over --rounds and the
median is reported, because a shared machine's load changes from minute to minute.

Table 2 (time to early-stop): 20% of the episodes are set aside as a test set; each contender trains
on the rest with its own stopping rule (recipe: random 80/20 transitions, patience 3, last weights,
checkpoint written each epoch; ours: defaults) and is scored on the test episodes.

Prints as it goes and writes both tables, the command and the machine to bench/train_throughput.md (--out).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import ROOT, add_out, add_threads, device_note, header, load_note, md_table, parser  # noqa: E402

from pipeline.data.transitions import Transitions  # noqa: E402
from pipeline.quality.recipe import RECIPE  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.machine import available_cpus, resolve_precision  # noqa: E402
from pipeline.training.split import split_indices  # noqa: E402
from pipeline.training.trainer import train  # noqa: E402

#: our loop with the recipe's model and optimizer settings: separates the loop's speed from the defaults
RECIPE_SETTINGS = {k: RECIPE[k] for k in ("dropout", "optimizer", "lr", "weight_decay", "schedule")}


def flops_per_sample(obs_dim: int, act_dim: int, hidden: int) -> float:
    """Training FLOPs per sample of FancyMlp: 2 per multiply-add, forward + backward (2x forward)."""
    macs = 2 * obs_dim * hidden + hidden * hidden + hidden * act_dim
    return 3 * 2 * macs


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10, device: str = "cpu") -> float:
    """Best-of-3 GFLOP/s of an n x n matmul at this process's thread count (on a GPU: n = 8192)."""
    n = 8192 if device == "cuda" else n
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(3):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def step_label(model_dir) -> str:
    """How our steps ran, from the model's params.json: eager, a captured CUDA graph, or the graph step
    uncaptured."""
    resolved = json.loads((Path(model_dir) / "params.json").read_text())["training"]["resolved"]
    if resolved["step"] == "graph":
        return "CUDA graph" if resolved["cuda_graph"] else "graph, NOT captured"
    return resolved["step"]


def subset(t: Transitions, idx: np.ndarray, name: str) -> Transitions:
    return Transitions(name, t.obs[idx], t.act[idx], t.next_obs[idx], t.episode[idx], stats=dict(t.stats))


# ---------------------------------------------------------------- the recipe (pytorch-lightning)


def recipe_fit(
    data: Transitions, train_idx, val_idx, *, max_epochs, patience, seed, workers, ckpt_dir=None, device="cpu"
):
    """CleanDiffuser's pretrain script: per-item dict Dataset, DataLoader(batch 512, shuffle), Adam 3e-4,
    EarlyStopping(val_loss, patience) and ModelCheckpoint (the last epoch's weights are what it ships)."""
    import pytorch_lightning as pl
    import torch.nn.functional as F
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from torch.utils.data import DataLoader, Dataset

    from invdyn.models import FancyMlpInvDynamic
    from invdyn.normalizer import GaussianNormalizer

    norm = GaussianNormalizer.from_data(data.obs)
    obs = norm.normalize(data.obs.astype(np.float64)).astype(np.float32)
    nxt = norm.normalize(data.next_obs.astype(np.float64)).astype(np.float32)
    act = np.asarray(data.act, dtype=np.float32)

    class PerItem(Dataset):
        def __init__(self, idx):
            self.idx = idx

        def __len__(self):
            return len(self.idx)

        def __getitem__(self, i):
            j = self.idx[i]
            return {"obs": obs[j], "act": act[j], "next_obs": nxt[j]}

    class Recipe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = FancyMlpInvDynamic(data.obs_dim, data.act_dim, 512)

        def forward(self, o, o2):
            return self.net(o, o2)

        def training_step(self, batch, _):
            loss = F.mse_loss(self(batch["obs"], batch["next_obs"]), batch["act"])
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", F.mse_loss(self(batch["obs"], batch["next_obs"]), batch["act"]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=3e-4)

    class Timer(pl.Callback):
        train_time, samples, last = 0.0, 0, 0.0

        def on_train_epoch_start(self, *_):
            self.t0 = self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.last = time.perf_counter()
            self.samples += batch["obs"].shape[0]

        def on_train_epoch_end(self, *_):
            self.train_time += self.last - self.t0

    for logger in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)  # no tips / device banners between table rows
    warnings.filterwarnings("ignore", module="pytorch_lightning|torch.utils.data")
    pl.seed_everything(seed, verbose=False)
    kw = {"num_workers": workers, "persistent_workers": workers > 0}
    train_loader = DataLoader(PerItem(train_idx), batch_size=512, shuffle=True, **kw)
    val_loader = DataLoader(PerItem(val_idx), batch_size=512, shuffle=False, **kw)
    module, timer = Recipe(), Timer()
    callbacks = [timer, EarlyStopping(monitor="val_loss", mode="min", patience=patience)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir))
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
    )
    t = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - t
    return (
        module.net.eval(),
        norm,
        {
            "train_time_s": timer.train_time,
            "samples": timer.samples,
            "wall_s": wall,
            "epochs": trainer.current_epoch,
        },
    )


def mse_on(net, norm, data: Transitions, idx) -> float:
    net = net.cpu()
    with torch.no_grad():
        o = torch.as_tensor(norm.normalize(data.obs[idx].astype(np.float64)), dtype=torch.float32)
        o2 = torch.as_tensor(norm.normalize(data.next_obs[idx].astype(np.float64)), dtype=torch.float32)
        return float(((net.eval()(o, o2) - torch.as_tensor(data.act[idx])) ** 2).mean())


# ---------------------------------------------------------------- tables


def table(headers, rows) -> str:
    return "\n".join(md_table(headers, rows))


class Record:
    """What the bench prints, kept for --out (the Markdown record)."""

    def __init__(self, lines: list[str]):
        self.lines = lines

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines += [*text.split("\n"), ""]


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--dataset", default="sim-halfcheetah-mixed-v0")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run in table 1")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved repetitions in table 1 (median reported)"
    )
    p.add_argument("--max-epochs", type=int, default=300, help="cap for table 2's early-stopping runs")
    add_threads(p)
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="recipe DataLoader workers (CleanDiffuser uses 8; 0 is fastest on a 2-core machine)",
    )
    p.add_argument("--skip-early-stop", action="store_true", help="table 1 only")
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="run every contender on this device"
    )
    add_out(p, ROOT / "bench" / "train_throughput.md")
    args = p.parse_args(argv)

    from pipeline.data.sources import load_transitions

    threads = args.threads or available_cpus()
    torch.set_num_threads(threads)
    data = load_transitions(args.dataset)
    auto = resolve_precision("auto", torch.device(args.device))
    note = f"{device_note(args.device)}, {threads} torch threads, {load_note()}"
    rec = Record(header("Our training loop vs CleanDiffuser's recipe", "bench/train_throughput.py", note))
    print(rec.lines[-2])
    rec.say(
        f"data: {data.name}: {len(data):,} transitions, {len(np.unique(data.episode))} episodes, "
        f"obs_dim {data.obs_dim}, act_dim {data.act_dim}"
    )
    flop = flops_per_sample(data.obs_dim, data.act_dim, 512)
    peaks = {
        "fp32": matmul_peak(torch.float32, device=args.device),
        "bf16": matmul_peak(torch.bfloat16, device=args.device),
    }
    print(
        f"{flop / 1e6:.2f} MFLOP per training sample; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s; precision 'auto' here = {auto}\n"
    )
    rec.lines += [f"{flop / 1e6:.2f} MFLOP per training sample; precision 'auto' here = {auto}.", ""]

    # ---- table 1: equal epochs, recipe's split
    train_idx, val_idx = split_indices(data, "transitions", 0.2, 0)
    contenders = {  # name -> TrainConfig changes; "recipe" is the Lightning re-creation
        "recipe": None,
        "ours fp32": {"precision": "fp32"},
        "ours bf16": {"precision": "bf16"},
        f"ours {auto}, recipe settings": {"precision": auto, **RECIPE_SETTINGS},  # the loop alone
    }
    if args.device == "cuda":  # what the CUDA graph adds: the same loop with the eager step
        contenders[f"ours {auto}, eager step"] = {"precision": auto, "step": "eager"}
    results = {name: [] for name in contenders}
    val, steps = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            if r:  # re-measure the peak between rounds: a busy moment must not lower the reference
                peaks = {
                    k: max(
                        v, matmul_peak(torch.float32 if k == "fp32" else torch.bfloat16, device=args.device)
                    )
                    for k, v in peaks.items()
                }
            for i, (name, change) in enumerate(contenders.items()):
                if change is None:
                    net, norm, info = recipe_fit(
                        data,
                        train_idx,
                        val_idx,
                        max_epochs=args.epochs,
                        patience=10**6,
                        seed=r,
                        workers=args.workers,
                        device=args.device,
                    )
                    results[name].append(info["samples"] / info["train_time_s"])
                    val.setdefault(name, []).append(mse_on(net, norm, data, val_idx))
                    steps[name] = "Lightning"
                else:
                    cfg = TrainConfig(
                        split="transitions",
                        keep="last",
                        max_epochs=args.epochs,
                        patience=10**6,
                        threads=threads,
                        seed=r,
                        device=args.device,
                        **change,
                    )
                    res = train(data, cfg, Path(tmp) / f"{r}-{i}")
                    results[name].append(res.metrics["samples_per_s"])
                    val.setdefault(name, []).append(res.metrics["heldout_mse"])
                    steps[name] = step_label(res.model_dir)
                print(
                    f"  round {r + 1}/{args.rounds} {name:>24}: {results[name][-1]:>9,.0f} samples/s, "
                    f"val MSE {val[name][-1]:.5f}",
                    flush=True,
                )
    rec.say(
        f"matmul peak, best of every measurement (the load changes): fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s"
    )
    base = statistics.median(results["recipe"])
    rows = []
    for name, speeds in results.items():
        sps = statistics.median(speeds)
        prec = (contenders[name] or {}).get("precision", "fp32")
        gflops = sps * flop / 1e9
        rows.append(
            [
                name,
                prec,
                steps[name],
                f"{sps:,.0f}",
                f"{sps / base:.2f}x",
                f"{statistics.mean(val[name]):.5f}",
                f"{gflops:.0f}",
                f"{gflops / peaks[prec]:.1%} of {peaks[prec]:.0f}",
            ]
        )
    print()
    rec.say(
        f"Table 1: {args.epochs} epochs, random 80/20 transition split, batch 512, hidden 512, median of "
        f"{args.rounds} interleaved rounds (val MSE: mean over rounds). recipe: dropout 0.1, Adam 3e-4; "
        f"ours: our defaults (no dropout, AdamW + cosine) unless 'recipe settings'"
    )
    rec.say(
        table(
            [
                "contender",
                "precision",
                "step",
                "train samples/s",
                "vs recipe",
                f"val MSE after {args.epochs} ep",
                "GFLOP/s",
                "of matmul peak",
            ],
            rows,
        )
    )
    if args.skip_early_stop:
        return _write(rec, args.out)

    # ---- table 2: time to early-stop, scored on held-out episodes
    pool_idx, test_idx = split_indices(data, "episodes", 0.2, 0)
    pool = subset(data, pool_idx, data.name)
    test = subset(data, test_idx, data.name + "-test")
    baseline = float(((test.act - pool.act.mean(0)) ** 2).mean())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        r_train, r_val = split_indices(pool, "transitions", 0.2, 0)
        net, norm, info = recipe_fit(
            pool,
            r_train,
            r_val,
            max_epochs=args.max_epochs,
            patience=3,
            seed=0,
            workers=args.workers,
            ckpt_dir=Path(tmp) / "recipe",
        )
        rows.append(
            [
                "recipe (transitions split, patience 3, last weights)",
                f"{info['wall_s']:.1f}",
                info["epochs"],
                f"{mse_on(net, norm, test, np.arange(len(test))):.5f}",
            ]
        )
        print(f"  recipe done: {rows[-1]}", flush=True)
        for label, precision in ((f"ours defaults ({auto})", "auto"), ("ours defaults, fp32", "fp32")):
            if precision == "fp32" and auto == "fp32":
                continue
            t = time.perf_counter()
            epochs = min(args.max_epochs, TrainConfig().max_epochs)  # our defaults: cosine over 60 epochs
            res = train(
                pool,
                TrainConfig(max_epochs=epochs, precision=precision, threads=threads),
                Path(tmp) / precision,
            )
            wall = time.perf_counter() - t
            import invdyn

            model = invdyn.read_model_dir(res.model_dir)
            mse = float(((model.predict(test.obs, test.next_obs) - test.act) ** 2).mean())
            rows.append(
                [
                    label + " (episode split, best weights)",
                    f"{wall:.1f}",
                    f"{res.metrics['epochs']} (best {res.metrics['best_epoch']})",
                    f"{mse:.5f}",
                ]
            )
            print(f"  {label} done: {rows[-1]}", flush=True)
    print()
    rec.say(
        f"Table 2: train until early stop on the 80% training episodes ({len(pool):,} transitions), "
        f"score on the 20% test episodes ({len(test):,}); mean-action baseline MSE {baseline:.5f}"
    )
    rec.say(table(["contender", "time to stop (s)", "epochs", "test-episode MSE"], rows))
    print()
    rec.say(f"load average {os.getloadavg()[0]:.1f} at end")
    return _write(rec, args.out)


def _write(rec: Record, out: str) -> int:
    """The record to --out (printed already, line by line, so not again: run.sh's report reads the log)."""
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(rec.lines).rstrip("\n") + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
