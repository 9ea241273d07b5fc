"""Register a finished job's models later: `python -m pipeline.register --from-storage DIR [--mlflow-uri URI]`.

When MLflow was down at the end of `pipeline.job.pretrain_all`, the trained model directories stay in the
job's output (DIR/summary.json lists them). This registers each record exactly as the job would have;
it is idempotent (a version is identified by its weights sha256), so running it twice is harmless.
Records keep what the job measured: `evaluation` becomes the version's `eval.*` tags and `champion_metric`
the registered model's champion rule, so the champion is chosen as the job would have chosen it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.registry import store as tracking

SUMMARY = "summary.json"


def read_summary(storage) -> tuple[Path, list[dict]]:
    """The records of `storage` (a job output dir holding summary.json, or the summary file itself)."""
    path = Path(storage)
    summary = path / SUMMARY if path.is_dir() else path
    try:
        data = json.loads(summary.read_text())
    except FileNotFoundError:
        raise tracking.TrackingError(
            f"{summary} does not exist: --from-storage takes the output directory of a pipeline.job.pretrain_all job"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise tracking.TrackingError(f"{summary} is not valid JSON ({e})") from None
    records = data.get("records", data.get("datasets")) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise tracking.TrackingError(
            f"{summary}: expected a list of dataset records (with dataset, model_dir, ...)"
        )
    return summary, records


def register_from_storage(storage, uri: str | None = None, *, alias: str = tracking.CHAMPION) -> list[dict]:
    """Register every trained record of a job's summary.json; returns one result dict per record."""
    summary, records = read_summary(storage)
    uri = tracking.resolve_uri(uri, summary.parent)
    tracking.check_server(uri)
    results = []
    for record in records:
        dataset = record.get("dataset", "?")
        if record.get("error") or not record.get("model_dir"):
            results.append(
                {"dataset": dataset, "status": "skipped", "reason": record.get("error") or "no model_dir"}
            )
            continue
        record = dict(record)
        model_dir = Path(record["model_dir"])
        if not model_dir.is_absolute():  # summaries may store paths relative to the job's output dir
            record["model_dir"] = str(summary.parent / model_dir)
        try:
            result = tracking.register_dataset(uri, record, alias=alias)
        except Exception as e:  # noqa: BLE001 - report every dataset, then fail the command
            results.append({"dataset": dataset, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
            continue
        results.append(
            {"dataset": dataset, "status": "registered" if result["registered"] else "present", **result}
        )
    return results


def format_table(results: list[dict]) -> str:
    rows = [("dataset", "status", "model", "version", "champion", "reason")]
    for r in results:
        rows.append(
            (
                r["dataset"],
                r["status"],
                r.get("model_name", ""),
                str(r.get("version", "")),
                "yes" if r.get("champion") else "",
                r.get("reason", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5] for row in rows
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.register", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from-storage", required=True, metavar="DIR", help="job output dir (holds summary.json)"
    )
    parser.add_argument(
        "--mlflow-uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///DIR/mlflow.db)"
    )
    parser.add_argument(
        "--alias", default=tracking.CHAMPION, help="alias of the best version (default: champion)"
    )
    args = parser.parse_args(argv)
    try:
        results = register_from_storage(args.from_storage, args.mlflow_uri, alias=args.alias)
    except tracking.TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(results))
    failed = [r["dataset"] for r in results if r["status"] == "failed"]
    if failed:
        print(
            f"error: {len(failed)} dataset(s) not registered: {', '.join(failed)}; run this again",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
