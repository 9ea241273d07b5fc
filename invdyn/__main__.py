"""The library's command line, `python -m invdyn list | info NAME | fetch URL_OR_PATH | verify BUNDLE |
export-onnx NAME`: an expected failure (unknown model, bad bundle, no network) prints one line on stderr and
exits 1."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import InvdynError

#: `list`'s columns, led by the test figures as the model cards are (test episodes no choice read), then the
#: validation MSE the early stop, search and champion chose on; "-" where a model has no such figure
_METRICS = ("test_mse", "test_r2", "heldout_mse")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def cmd_list(args) -> int:
    from .hub import list_models
    from .settings import cleandiffuser_dir, model_cache_dir

    records = list_models()
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
        return 0
    if not records:
        print(
            f"no models in {model_cache_dir()} or {cleandiffuser_dir('x').parent}; "
            "install a bundle with: python -m invdyn fetch URL_OR_ZIP"
        )
        return 0
    rows = [
        [r["name"], r["location"], *(_num(r["metrics"].get(k)) for k in _METRICS), r["error"] or r["source"]]
        for r in records
    ]
    print(_table(rows, ["name", "location", *_METRICS, "source"]))
    return 0


def cmd_info(args) -> int:
    from .hub import load

    model = load(args.name, source=args.source)
    p = model.params
    info = {
        "name": args.name,
        "source": model.source,
        "path": str(model.path) if model.path else None,
        "obs_dim": model.obs_dim,
        "act_dim": model.act_dim,
        "architecture": p.get("architecture") or {"name": "fancy_mlp"},
        "config": p.get("config"),
        "dataset": p.get("dataset") or {},
        "metrics": p.get("metrics") or {},
        "training": p.get("training") or {},
        "format_version": p.get("format_version"),
        "invdyn_version": p.get("invdyn_version"),
    }
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    for key in ("name", "source", "path", "obs_dim", "act_dim"):
        print(f"{key:>13}: {info[key]}")
    tables = card_tables(model.card)
    for key in ("architecture", "config", "dataset", "metrics", "training"):
        if key == "metrics" and tables:
            continue  # shown below as the card shows it
        flat = {k: v for k, v in info[key].items() if not isinstance(v, (dict, list))} if info[key] else {}
        print(f"{key:>13}: " + (", ".join(f"{k}={_short(v)}" for k, v in sorted(flat.items())) or "-"))
    for section, header, rows in tables:
        print(f"\n{section} (model card):")
        print(_table(rows, header))
    return 0


#: the model card's sections `info` prints the tables of (the pipeline's evaluation writes the last two)
CARD_SECTIONS = ("Metrics", "Evaluation", "Closed loop: executing a planner's plans")


def card_tables(card: str, sections=CARD_SECTIONS) -> list[tuple[str, list[str], list]]:
    """The Markdown tables under a model card's `sections` headings: (heading, header, rows), in order."""
    tables, heading, rows = [], "", []
    for line in [*card.splitlines(), ""]:
        if line.startswith("|") and heading in sections:
            cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # not the |---| line
                rows.append(cells)
            continue
        if rows:
            tables.append((heading, rows[0], rows[1:]))
            rows = []
        if line.startswith(("## ", "### ")):
            heading = line.lstrip("#").strip()
    return tables


def _short(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def cmd_fetch(args) -> int:
    from .hub import fetch

    names = fetch(args.source, force=args.force, progress=not args.quiet)
    print(f"installed {len(names)} model(s): {', '.join(names)}")
    return 0


def cmd_verify(args) -> int:
    from .bundle import verify_bundle

    manifest = verify_bundle(args.bundle)
    models = manifest["models"]
    rows = [
        [
            m["name"],
            len(m["files"]),
            sum(f["size"] for f in m["files"].values()),
            _num(m["metrics"].get(_METRICS[0])),
        ]
        for m in models
    ]
    print(_table(rows, ["model", "files", "bytes", _METRICS[0]]))
    print(f"OK: {args.bundle} holds {len(models)} model(s); every checksum matches its manifest")
    return 0


def cmd_export_onnx(args) -> int:
    from .hub import load
    from .onnx_export import card_path, export_onnx

    card = export_onnx(load(args.name, source=args.source), args.out, normalized_io=args.normalized_io)
    names = ", ".join(i["name"] for i in card["inputs"])
    print(
        f"wrote {args.out}: opset {card['opset']}, ({names}) -> {card['outputs'][0]['name']}, batch dynamic"
    )
    if card["check"]:
        print(f"max |onnxruntime - predict| = {card['check']['max_abs_error']:.3g} on a batch of 64")
    print(f"card: {card_path(args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m invdyn", description="Pretrained inverse dynamics models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "list", help="installed models (invdyn cache and CleanDiffuser's) with their test MSE and R²"
    )
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", help="load a model and describe it")
    p.add_argument("name")
    p.add_argument("--source", help="model directory, bundle .zip, http(s) URL or MLflow models:/ URI")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("fetch", help="install a bundle (http(s) URL or .zip path) into the invdyn cache")
    p.add_argument("source", metavar="URL_OR_PATH")
    p.add_argument("--force", action="store_true", help="download and reinstall even if already installed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("verify", help="check a bundle's layout and checksums (exit 0 when sound)")
    p.add_argument("bundle", metavar="BUNDLE")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "export-onnx",
        help="write a model as an ONNX graph, raw (obs, next_obs) -> action (normalizer inside)",
    )
    p.add_argument("name")
    p.add_argument("--source", help="model directory, bundle .zip, http(s) URL or MLflow models:/ URI")
    p.add_argument("--out", required=True, metavar="F.onnx", help="the graph; its card goes to F.onnx.json")
    p.add_argument(
        "--normalized-io",
        action="store_true",
        help="export the network alone, on observations normalized with the card's mean / std",
    )
    p.set_defaults(func=cmd_export_onnx)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvdynError, OSError) as e:
        print(f"invdyn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"invdyn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
