"""Does the ONNX export match `predict`, and is onnxruntime as fast as eager torch on the CPU?

    python bench/onnx_export.py                                  # sim-hopper-mixed-v0, a model trained here
    python bench/onnx_export.py --model-dir DIR --dataset NAME   # an existing model on its dataset

Test episodes: 20% of the dataset's episodes (seeded, as bench/quality_vs_recipe.py), which the model
trained here never sees. Parity: onnxruntime on every test transition (chunks of --batch) against
`model.predict`, max absolute error. Speed: one (--batch, obs_dim) batch of test transitions, in one
process, for each thread count: `model.predict` (numpy in and out), the same graph eagerly in torch on
tensors (normalizer + network, inference mode) and onnxruntime's `run`; each timed --repeats times after a
warm-up, interleaved, median reported. Writes --out (Markdown) with the command and the machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, add_out, command, load_note, machine, md_table, parser  # noqa: E402


def _model(args, transitions, dev, workdir: Path):
    import invdyn
    from pipeline.quality.recipe import subset
    from pipeline.training.config import TrainConfig
    from pipeline.training.trainer import train

    if args.model_dir:
        return invdyn.read_model_dir(args.model_dir)
    config = TrainConfig(max_epochs=args.max_epochs, seed=0, threads=os.cpu_count())
    dev_set = subset(transitions, dev, f"bench-dev-{args.test_seed}")
    result = train(dev_set, config, workdir / "model", dataset_name=args.dataset, figures=False)
    return invdyn.read_model_dir(result.model_dir)


def _parity(model, session, obs, nxt, batch: int) -> float:
    worst = 0.0
    for start in range(0, len(obs), batch):
        o, n = obs[start : start + batch], nxt[start : start + batch]
        got = session.run(None, {"obs": o, "next_obs": n})[0]
        worst = max(worst, float(np.abs(got - model.predict(o, n)).max()))
    return worst


def _timings(model, graph: Path, obs, nxt, threads: int, repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) milliseconds per call of each way, interleaved so that drift on the machine hits all
    alike; the min is what a quiet machine gives, the median what this one gave."""
    import onnxruntime
    import torch

    from invdyn.onnx_export import RawIO

    torch.set_num_threads(threads)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    eager = RawIO(model.net, model.normalizer)
    obs_t, nxt_t = torch.from_numpy(obs), torch.from_numpy(nxt)

    def run_eager():
        with torch.inference_mode():
            eager(obs_t, nxt_t)

    ways = {
        "predict (numpy)": lambda: model.predict(obs, nxt),
        "torch eager (tensors)": run_eager,
        "onnxruntime": lambda: session.run(None, {"obs": obs, "next_obs": nxt}),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for i in range(repeats + 5):
        for key, call in ways.items():
            t0 = time.perf_counter()
            call()
            if i >= 5:  # the first calls warm caches and allocators
                times[key].append((time.perf_counter() - t0) * 1e3)
    return {k: (float(np.median(v)), float(np.min(v))) for k, v in times.items()}


def run(args) -> str:
    where = machine("CPU only, " + load_note())
    import onnxruntime

    import invdyn
    from invdyn.onnx_export import export_onnx
    from pipeline.data.sources import load_transitions
    from pipeline.training.split import split_indices

    t = load_transitions(args.dataset)
    dev, test = split_indices(t, "episodes", 0.2, args.test_seed)
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        model = _model(args, t, dev, Path(tmp))
        graph = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        card = export_onnx(model, graph)
        export_s = time.perf_counter() - started
        obs, nxt = t.obs[test], t.next_obs[test]
        session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        parity = _parity(model, session, obs, nxt, args.batch)
        rows = []
        for threads in sorted({1, os.cpu_count() or 1}):
            ms = _timings(model, graph, obs[: args.batch], nxt[: args.batch], threads, args.repeats)
            rows.append((threads, ms))
            print(f"threads {threads}: " + ", ".join(f"{k} {v[0]:.3f} ms" for k, v in ms.items()), flush=True)
    arch = model.params.get("architecture", {})
    lines = [
        "# ONNX export: parity with `predict` and CPU speed",
        "",
        f"Command: `{command('bench/onnx_export.py')}`",
        "",
        f"Machine: {where}; onnxruntime {onnxruntime.__version__}, "
        f"invdyn {invdyn.__version__}, opset {card['opset']}.",
        "",
        f"Model: {arch.get('name')} (hidden_dim {model.net.hidden_dim}), obs_dim {model.obs_dim}, act_dim "
        f"{model.act_dim}, "
        + ("given by --model-dir" if args.model_dir else f"trained {args.max_epochs} epochs here")
        + f" on the other episodes of {args.dataset}. Export took {export_s:.1f} s.",
        "",
        f"Parity on the {len(test)} test transitions ({args.dataset}, episodes split seed {args.test_seed}): "
        f"max |onnxruntime - predict| = {parity:.3g} (target 1e-5: {'met' if parity <= 1e-5 else 'MISSED'}).",
        "",
        f"Speed, one ({args.batch}, {model.obs_dim}) batch, ms per call: median of {args.repeats} calls "
        "(fastest call):",
        "",
    ]
    cells = []
    for threads, ms in rows:
        ratio = [ms["onnxruntime"][i] / ms["torch eager (tensors)"][i] for i in (0, 1)]
        cells.append(
            [threads, *(f"{ms[k][0]:.2f} ({ms[k][1]:.2f})" for k in ms), f"{ratio[0]:.2f} ({ratio[1]:.2f})"]
        )
    head = ["threads", "predict (numpy)", "torch eager (tensors)", "onnxruntime"]
    lines += [*md_table([*head, "onnxruntime / eager: median (fastest)"], cells), ""]
    for i, what in enumerate(("median", "fastest call")):
        slower = [str(th) for th, ms in rows if ms["onnxruntime"][i] > ms["torch eager (tensors)"][i]]
        verdict = (
            f"slower at {', '.join(slower)} thread(s)" if slower else "at least as fast at every thread count"
        )
        lines.append(f"- By the {what}: onnxruntime is {verdict} (target: at least as fast as eager torch).")
    lines += [
        "- The machine is shared (load average above): other processes take CPUs during the timing, so the",
        "  medians carry their noise, most with as many threads as CPUs; the fastest call shows the speed",
        "  of a quiet moment.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--dataset", default="sim-hopper-mixed-v0", help="dataset name or file the model is for")
    ap.add_argument(
        "--model-dir", help="a model directory to export (default: train one on the dev episodes)"
    )
    ap.add_argument("--max-epochs", type=int, default=3, help="epochs of the model trained here")
    ap.add_argument("--test-seed", type=int, default=1234, help="seed of the test-episode split")
    ap.add_argument("--batch", type=int, default=4096, help="rows per timed call")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls per way and thread count")
    add_out(ap, ROOT / "bench" / "onnx_export.md")
    args = ap.parse_args(argv)
    report = run(args)
    if args.out != "-":
        Path(args.out).write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
