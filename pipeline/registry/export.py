"""Export the registered champions as one invdyn bundle:
`python -m pipeline.export --out invdyn-bundle.zip [--datasets A,B] [--alias champion] [--mlflow-uri URI]`.

Each `invdyn-<dataset>@champion` version is downloaded from MLflow, checked against the weights
sha256 it was registered with, and written with `invdyn.write_bundle`; the manifest records the
registry lineage (model name, version, run id, source). The same registry state gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import invdyn
from invdyn.settings import is_valid_name
from pipeline.registry import store as tracking

DEFAULT_OUT_DIR = "invdyn-out"  # pretrain_all's default output dir, home of the default SQLite store
LINEAGE_TAGS = (
    "dataset_sha256",
    "heldout_mse",
    "baseline_mse",
    "code_version",
    "ray_trial_id",
    "weights_sha256",
)


def select(champions: list[dict], datasets, uri: str, alias: str) -> list[dict]:
    """The champions of `datasets` (all when None); a dataset without one is an error that lists the others."""
    if not champions:
        raise tracking.TrackingError(
            f"no registered invdyn-* model has alias {alias!r} in MLflow at {tracking.redact(uri)}; "
            "run `python -m pipeline.pretrain_all` first (or pass the --mlflow-uri it used)"
        )
    if not datasets:
        return champions
    by_name = {c["model_name"]: c for c in champions}
    wanted = [tracking.model_name(d) for d in datasets]
    missing = [d for d, name in zip(datasets, wanted, strict=True) if name not in by_name]
    if missing:
        have = ", ".join(c["tags"].get("dataset") or c["model_name"] for c in champions)
        raise tracking.TrackingError(
            f"no {alias!r} version registered for {', '.join(missing)} in {tracking.redact(uri)}; registered: {have}"
        )
    return [by_name[name] for name in sorted(set(wanted))]


def export_bundle(uri: str, out_path, datasets=None, alias: str = tracking.CHAMPION) -> Path:
    """Write the `alias` versions of `datasets` (default: every invdyn-* model) as one bundle zip."""
    chosen = select(tracking.champions(uri, alias), datasets, uri, alias)
    with tempfile.TemporaryDirectory(prefix="invdyn-export-") as tmp:
        model_dirs, lineage = {}, []
        for i, champ in enumerate(chosen):
            name = champ["tags"].get("dataset") or champ["model_name"].removeprefix(tracking.MODEL_PREFIX)
            if not is_valid_name(name) or name in model_dirs:
                name = champ["model_name"]
            local = tracking.download_version(uri, champ["model_name"], champ["version"], Path(tmp) / str(i))
            sha = tracking.weights_sha256(local)
            registered = champ["tags"].get("weights_sha256")
            if registered and registered != sha:
                raise tracking.TrackingError(
                    f"{champ['model_name']} v{champ['version']}: downloaded weights sha256 {sha} differ from the "
                    f"registered {registered}; the artifact store was changed after registration"
                )
            model_dirs[name] = local
            lineage.append(
                {
                    "name": name,
                    "model_name": champ["model_name"],
                    "version": champ["version"],
                    "run_id": champ["run_id"],
                    "source": champ["source"],
                    **{k: champ["tags"].get(k, "") for k in LINEAGE_TAGS},
                }
            )
        extra = {"registry": {"tracking_uri": tracking.redact(uri), "alias": alias, "models": lineage}}
        return invdyn.write_bundle(out_path, model_dirs, extra_manifest=extra)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="bundle zip to write (e.g. invdyn-bundle.zip)")
    parser.add_argument(
        "--datasets", help="comma-separated dataset names (default: every registered dataset)"
    )
    parser.add_argument(
        "--alias", default=tracking.CHAMPION, help="which version of each model (default: champion)"
    )
    parser.add_argument(
        "--mlflow-uri",
        help=f"tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///{DEFAULT_OUT_DIR}/mlflow.db)",
    )
    args = parser.parse_args(argv)
    uri = tracking.resolve_uri(args.mlflow_uri, DEFAULT_OUT_DIR)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    try:
        db = tracking.sqlite_path(uri)
        if db is not None and not db.is_file():
            raise tracking.TrackingError(
                f"no MLflow store at {db}: run `python -m pipeline.pretrain_all` first, or pass --mlflow-uri"
            )
        tracking.check_server(uri)
        path = export_bundle(uri, args.out, datasets, alias=args.alias)
    except (tracking.TrackingError, invdyn.InvdynError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = invdyn.verify_bundle(path)
    print(f"wrote {path} with {len(manifest['models'])} model(s):")
    for m in manifest["registry"]["models"]:
        print(f"  {m['name']:<40} {m['model_name']} v{m['version']}  heldout_mse={m['heldout_mse']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
