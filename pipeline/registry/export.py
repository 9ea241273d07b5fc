"""Registry reads (the champions, a version's files) and the bundle export:
`python -m pipeline.export --out invdyn-bundle.zip [--datasets A,B] [--alias champion] [--mlflow-uri URI]`.

Each `invdyn-<dataset>@champion` version is downloaded from MLflow, checked against the weights sha256 it
was registered with, and written with `invdyn.write_bundle`; the manifest records the registry lineage
(model name, version, run id, source). The same registry state gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import mlflow.artifacts

import invdyn
from invdyn._download import redact_url
from invdyn.model_dir import PARAMS_FILE
from invdyn.settings import is_valid_name
from pipeline.registry import store
from pipeline.registry.store import CHAMPION, TrackingError

DEFAULT_OUT_DIR = "invdyn-out"  # pretrain_all's default output dir, home of the default SQLite store
LINEAGE_TAGS = (
    "dataset_sha256",
    "heldout_mse",
    "baseline_mse",
    "code_version",
    "ray_trial_id",
    "weights_sha256",
)


def find_model_dir(root) -> Path | None:
    """`root` itself when it holds params.json, else the one model directory below it (or None)."""
    root = Path(root)
    if (root / PARAMS_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(PARAMS_FILE) if any(p.parent.glob("*.ckpt")))
    return found[0] if len(found) == 1 else None


def champions(uri: str, alias: str = CHAMPION) -> list[dict]:
    """Every `invdyn-*` registered model's `alias` version: name, version, run id, source, tags (sorted)."""
    client = store.client(uri)
    out = []
    for model in client.search_registered_models(f"name LIKE '{store.MODEL_PREFIX}%'", max_results=1000):
        version = store.alias_version(client, model.name, alias)
        if version is None:
            continue
        mv = client.get_model_version(model.name, version)
        out.append(
            {
                "model_name": model.name,
                "version": str(mv.version),
                "run_id": mv.run_id,
                "source": mv.source,
                "tags": dict(mv.tags),
            }
        )
    return sorted(out, key=lambda c: c["model_name"])


def download_version(uri: str, name: str, version: str, dst) -> Path:
    """Download a model version's artifacts into `dst` and return the model directory inside."""
    client = store.client(uri)
    artifact_uri = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=uri
    )
    found = find_model_dir(local)
    if found is None:
        raise TrackingError(
            f"{name} v{version} ({artifact_uri}) holds no model directory (params.json + *.ckpt)"
        )
    return found


def select(found: list[dict], datasets, uri: str, alias: str) -> list[dict]:
    """The champions of `datasets` (all when None); a dataset without one is an error listing the others."""
    if not found:
        raise TrackingError(
            f"no registered invdyn-* model has alias {alias!r} in MLflow at {redact_url(uri)}; "
            "run `python -m pipeline.pretrain_all` first (or pass the --mlflow-uri it used)"
        )
    if not datasets:
        return found
    by_name = {c["model_name"]: c for c in found}
    wanted = [store.model_name(d) for d in datasets]
    missing = [d for d, name in zip(datasets, wanted, strict=True) if name not in by_name]
    if missing:
        have = ", ".join(c["tags"].get("dataset") or c["model_name"] for c in found)
        raise TrackingError(
            f"no {alias!r} version registered for {', '.join(missing)} in {redact_url(uri)}; "
            f"registered: {have}"
        )
    return [by_name[name] for name in sorted(set(wanted))]


def export_bundle(uri: str, out_path, datasets=None, alias: str = CHAMPION) -> Path:
    """Write the `alias` versions of `datasets` (default: every invdyn-* model) as one bundle zip."""
    chosen = select(champions(uri, alias), datasets, uri, alias)
    with tempfile.TemporaryDirectory(prefix="invdyn-export-") as tmp:
        model_dirs, lineage = {}, []
        for i, champ in enumerate(chosen):
            name = champ["tags"].get("dataset") or champ["model_name"].removeprefix(store.MODEL_PREFIX)
            if not is_valid_name(name) or name in model_dirs:
                name = champ["model_name"]
            local = download_version(uri, champ["model_name"], champ["version"], Path(tmp) / str(i))
            sha = store.weights_sha256(local)
            registered = champ["tags"].get("weights_sha256")
            if registered and registered != sha:
                raise TrackingError(
                    f"{champ['model_name']} v{champ['version']}: downloaded weights sha256 {sha} differ from "
                    f"the registered {registered}; the artifact store was changed after registration"
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
        extra = {"registry": {"tracking_uri": redact_url(uri), "alias": alias, "models": lineage}}
        return invdyn.write_bundle(out_path, model_dirs, extra_manifest=extra)


def _check_args(uri: str, out: Path, alias: str) -> None:
    """What can be checked before any download: the alias, the bundle's folder, the store."""
    store.check_alias(alias)
    if out.is_dir():
        raise TrackingError(
            f"--out {out} is a folder: name the bundle file, e.g. {out / 'invdyn-bundle.zip'}"
        )
    if not out.parent.is_dir():
        raise TrackingError(f"--out {out}: folder {out.parent} does not exist; create it or choose another")
    if not os.access(out.parent, os.W_OK):
        raise TrackingError(f"--out {out}: folder {out.parent} is not writable; choose another")
    db = store.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(
            f"no MLflow store at {db}: run `python -m pipeline.pretrain_all` first, or pass --mlflow-uri"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="bundle zip to write (e.g. invdyn-bundle.zip)")
    parser.add_argument(
        "--datasets", help="comma-separated dataset names (default: every registered dataset)"
    )
    parser.add_argument("--alias", default=CHAMPION, help="which version of each model (default: champion)")
    parser.add_argument(
        "--mlflow-uri",
        help=f"tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///{DEFAULT_OUT_DIR}/mlflow.db)",
    )
    args = parser.parse_args(argv)
    uri = store.resolve_uri(args.mlflow_uri, DEFAULT_OUT_DIR)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    try:
        _check_args(uri, Path(args.out).expanduser(), args.alias)
        store.check_server(uri)
        path = export_bundle(uri, args.out, datasets, alias=args.alias)
    except (TrackingError, invdyn.InvdynError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    manifest = invdyn.verify_bundle(path)
    print(f"wrote {path} with {len(manifest['models'])} model(s):")
    for m in manifest["registry"]["models"]:
        print(f"  {m['name']:<40} {m['model_name']} v{m['version']}  heldout_mse={m['heldout_mse']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
