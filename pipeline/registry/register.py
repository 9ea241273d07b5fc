"""Register a dataset's model as a version of `invdyn-<dataset>` and settle the `champion` alias; the CLI:
`python -m pipeline.register --from-storage DIR` / `--promote NAME VERSION [--reason TEXT]`.

`--from-storage` registers each record of a job's DIR/summary.json exactly as the job would have (after
MLflow was down); it is idempotent: a version is identified by its weights sha256. `--promote` moves the
alias by hand (see pipeline.registry.champion for what a later registration may undo).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from invdyn._download import redact_url
from invdyn.model_dir import PARAMS_FILE, read_params
from invdyn.settings import mlflow_tracking_uri
from pipeline.quality.metrics import SELECT_METRICS, evaluation_tags, evaluation_text_tags, finite
from pipeline.registry import champion, store
from pipeline.registry.artifacts import TEST_METRICS, source_for
from pipeline.registry.export import DEFAULT_OUT_DIR
from pipeline.registry.store import CHAMPION, CHAMPION_METRIC_TAG, TrackingError

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
_gave_up: dict[str, float] = {}  # uri -> when a registration last failed after all retries


def register_dataset(uri: str, record: dict, *, alias: str = CHAMPION, attempts: int | None = None) -> dict:
    """Register a dataset's chosen model directory as a new version of `invdyn-<dataset>` and settle
    `alias` (pipeline.registry.champion). Idempotent: the same weights are registered once.

    `record` holds at least dataset, heldout_mse, model_dir (+ sha256, baseline_mse, config, trial_id,
    mlflow_run_id, job when known); `evaluation` becomes the version's `eval.*` tags, `champion_metric`
    the registered model's rule. Returns {"model_name", "version", "champion", "reason", ...}.
    Transient failures (server restarting, SQLite locked) are retried with backoff.
    """
    _check_record(record)
    model_dir = Path(record["model_dir"])
    sha = store.weights_sha256(model_dir)
    if attempts is None and time.monotonic() - _gave_up.get(uri, -1e9) < 120:
        attempts = 1  # it just failed after every retry: the next datasets of this job fail fast
    shown = redact_url(uri)
    try:
        result = store.retry(
            f"registering {record['dataset']} in {shown}",
            lambda: _register(uri, record, model_dir, sha, alias),
            attempts=attempts,
        )
        _gave_up.pop(uri, None)
        return result
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow / HTTP / SQL errors all become one actionable error
        _gave_up[uri] = time.monotonic()
        raise TrackingError(
            f"could not register {record['dataset']} in MLflow at {shown} ({type(e).__name__}: {e}). "
            f"The model stays at {model_dir}; once MLflow is reachable run "
            f"`python -m pipeline.register --from-storage <job output dir> --mlflow-uri {shown}`"
        ) from None


def _check_record(record: dict) -> None:
    missing = [k for k in ("dataset", "heldout_mse", "model_dir") if record.get(k) in (None, "")]
    if missing:
        raise TrackingError(f"registration record {record.get('dataset', '?')!r} lacks {missing}")
    if finite(record["heldout_mse"]) is None:
        raise TrackingError(
            f"{record['dataset']}: heldout_mse {record['heldout_mse']!r} is not a finite number"
        )
    if record.get("champion_metric") not in (None, *SELECT_METRICS):
        raise TrackingError(
            f"{record['dataset']}: champion_metric {record['champion_metric']!r} is not one of "
            f"{list(SELECT_METRICS)}"
        )
    if not Path(record["model_dir"]).is_dir():
        raise TrackingError(f"{record['dataset']}: model directory {record['model_dir']} does not exist")


def _register(uri: str, record: dict, model_dir: Path, sha: str, alias: str) -> dict:
    client = store.client(uri)
    name = store.model_name(record["dataset"])
    _ensure_registered_model(client, name, record["dataset"])
    rule_change = None
    if record.get("champion_metric"):
        by = f"job {record['job']}" if record.get("job") else champion.whoami()
        rule_change = champion.change_rule(client, name, record["champion_metric"], by)
    before = store.alias_version(client, name, alias)
    version, created = _find_or_create(client, uri, name, record, model_dir, sha)
    me = str(version.version)
    after = champion.settle_champion(client, name, alias)
    decision = champion.current(client, name, alias)
    reason = champion.explain(decision, me, before, alias)
    if rule_change:
        reason = f"{rule_change}; {reason}"
        if after not in (None, me, before):  # an older version gains the alias under the new rule
            gained = champion.explain(decision, after, before, alias)
            client.set_model_version_tag(name, after, "champion_decision", f"{rule_change}; {gained}")
    if not created:
        reason = f"already registered as version {me} (same weights); {reason}"
    mine = decision.versions[me]
    if created:  # the decision made when the version was registered, shown in the registry UI
        client.set_model_version_tag(name, me, "champion_decision", reason)
        _summarize_in_parent(client, mine.run_id, name, mine, after == me)
    return {
        "model_name": name,
        "version": me,
        "champion": after == me,
        "reason": reason,
        "previous_champion": before,
        "champion_version": after,
        "registered": created,
        "run_id": mine.run_id,
        "source": mine.source,
        "heldout_mse": champion.score(mine, "heldout_mse"),
        "champion_metric": decision.metric,
        "eval_tags": {k: v for k, v in mine.tags.items() if k.startswith("eval.")},
    }


def _find_or_create(client: MlflowClient, uri: str, name: str, record: dict, model_dir: Path, sha: str):
    """(the version holding these weights, whether it was created now)."""
    evaluation = record.get("evaluation")
    eval_tags = {k: repr(v) for k, v in evaluation_tags(evaluation).items()} if evaluation else {}
    eval_tags.update(evaluation_text_tags(evaluation) if evaluation else {})
    same = [v for v in store.all_versions(client, name) if v.tags.get("weights_sha256") == sha]
    if same:
        version = min(same, key=lambda v: int(v.version))
        if eval_tags and not any(k.startswith("eval.") for k in version.tags):  # registered before evaluation
            for key, value in sorted(eval_tags.items()):
                client.set_model_version_tag(name, str(version.version), key, value)
        return version, False
    params = read_params(model_dir / PARAMS_FILE)
    training = params.get("training")
    digest, desc = champion.protocol(training if (training or {}).get("split") else record.get("config"))
    source, run_id = source_for(client, uri, record, model_dir, sha)
    baseline = finite(record.get("baseline_mse"))
    tags = {
        **test_tags(params.get("metrics") or {}),  # first: the figures no choice read
        "dataset": record["dataset"],
        "dataset_sha256": str(record.get("sha256") or record.get("dataset_sha256") or ""),
        "heldout_mse": repr(float(record["heldout_mse"])),
        "baseline_mse": repr(baseline) if baseline is not None else "",
        "protocol": digest,
        "protocol_desc": desc,
        "code_version": str(record.get("code_version") or store.code_version()),
        "ray_trial_id": str(record.get("trial_id") or ""),
        "config": json.dumps(record.get("config") or {}, sort_keys=True, default=str)[:5000],
        "weights_sha256": sha,
        "model_dir": str(model_dir.resolve()),
        "job": str(record.get("job") or ""),
        **eval_tags,
    }
    version = client.create_model_version(
        name, source=source, run_id=run_id, tags=tags, await_creation_for=60
    )
    return version, True


#: the test-episode metrics a version carries as tags (from its params.json), before anything else
TEST_TAGS = TEST_METRICS


def test_tags(metrics: dict) -> dict:
    """{tag: repr(value)} of the finite test metrics in params.json "metrics" (none: a two-part model)."""
    return {k: repr(finite(metrics.get(k))) for k in TEST_TAGS if finite(metrics.get(k)) is not None}


def _summarize_in_parent(client: MlflowClient, run_id: str, name: str, version, is_champion: bool) -> None:
    """Show the dataset's outcome on its parent run (the row a user sees first in the experiment)."""
    try:
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if not parent:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(version.tags[k]), now, 0)
            for k in sorted(version.tags)
            if (k in ("heldout_mse", "baseline_mse", *TEST_TAGS) or k.startswith("eval."))
            and version.tags.get(k)
        ]
        tags = [
            RunTag("registered_model", name),
            RunTag("registered_version", str(version.version)),
            RunTag("champion", "yes" if is_champion else "no"),
            RunTag("best_trial_run", run_id),
        ]
        store.log_batch(client, parent, metrics=metrics, tags=tags)
    except MlflowException as e:  # cosmetic: the registration itself is done
        log.warning("could not summarize %s v%s on its dataset run: %s", name, version.version, e)


def _ensure_registered_model(client: MlflowClient, name: str, dataset: str) -> None:
    try:
        client.create_registered_model(
            name,
            tags={"dataset": dataset},
            description=f"invdyn inverse dynamics model for dataset {dataset}; alias `{CHAMPION}` = best "
            f"version by the metric in tag `{CHAMPION_METRIC_TAG}` (default: held-out MSE)",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


# ------------------------------------------------------------------------ tags on an existing version


def tag_model_version(uri: str, model_uri: str, tags: dict) -> dict:
    """Set `tags` on the version `model_uri` (`models:/<name>/<version>` or `models:/<name>@<alias>`)
    points at. Returns {"model_name", "version"}."""
    if not model_uri.startswith("models:/"):
        raise TrackingError(
            f"{model_uri!r} is not a registry URI: use models:/<name>@<alias> or models:/<name>/<version>"
        )
    ref = model_uri[len("models:/") :]
    try:
        client = store.client(uri)
        if "@" in ref:
            name, alias = ref.split("@", 1)
            get = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
            version = str(store.retry(f"reading alias {alias} of {name}", get).version)
        elif "/" in ref:
            name, version = ref.rsplit("/", 1)
        else:
            raise TrackingError(f"{model_uri} names no version or alias: use models:/<name>@<alias>")
        for key, value in sorted(tags.items()):
            set_tag = lambda k=key, v=value: client.set_model_version_tag(name, version, k, str(v))  # noqa: E731
            store.retry(f"tagging {name} v{version}", set_tag)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow / HTTP / SQL errors become one actionable error
        raise TrackingError(
            f"could not tag {model_uri} in MLflow at {redact_url(uri)} ({type(e).__name__}: {e})"
        ) from None
    return {"model_name": name, "version": version}


def log_evaluation(model_uri: str, result: dict, mlflow_uri: str | None = None) -> dict:
    """Attach an evaluation's headline metrics as `eval.*` tags to the registered version `model_uri`."""
    uri = mlflow_uri or mlflow_tracking_uri()
    if not uri:
        raise TrackingError("--log-to-registry needs --mlflow-uri or MLFLOW_TRACKING_URI")
    return tag_model_version(uri, model_uri, {**evaluation_tags(result), **evaluation_text_tags(result)})


# ------------------------------------------------------------------------------------------- the CLI


def read_summary(storage) -> tuple[Path, list[dict]]:
    """The records of `storage` (a job output dir holding summary.json, or the summary file itself)."""
    path = Path(storage)
    summary = path / SUMMARY if path.is_dir() else path
    try:
        data = json.loads(summary.read_text())
    except FileNotFoundError:
        raise TrackingError(
            f"{summary} does not exist: --from-storage takes the output directory of a "
            "pipeline.pretrain_all job"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrackingError(f"{summary} is not valid JSON ({e})") from None
    records = data.get("records", data.get("datasets")) if isinstance(data, dict) else data
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TrackingError(f"{summary}: expected a list of dataset records (with dataset, model_dir, ...)")
    return summary, records


def register_from_storage(storage, uri: str | None = None, *, alias: str = CHAMPION) -> list[dict]:
    """Register every trained record of a job's summary.json; returns one result dict per record."""
    summary, records = read_summary(storage)
    uri = store.resolve_uri(uri, summary.parent)
    store.check_server(uri)
    results = []
    for record in records:
        dataset = record.get("dataset", "?")
        if record.get("error") or not record.get("model_dir"):
            reason = record.get("error") or "no model_dir"
            results.append({"dataset": dataset, "status": "skipped", "reason": reason})
            continue
        record = dict(record)
        if not Path(record["model_dir"]).is_absolute():  # summaries may store paths relative to the job's dir
            record["model_dir"] = str(summary.parent / record["model_dir"])
        try:
            result = register_dataset(uri, record, alias=alias)
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
        champ = "yes" if r.get("champion") else ""
        rows.append(
            (
                r["dataset"],
                r["status"],
                r.get("model_name", ""),
                str(r.get("version", "")),
                champ,
                r.get("reason", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5] for row in rows
    )


def _promote(args) -> int:
    name, version = args.promote
    if not version.isdigit() or int(version) < 1:
        raise TrackingError(
            f"--promote {name} {version}: the version is a number such as 1 (see the registry)"
        )
    uri = store.resolve_uri(args.mlflow_uri, DEFAULT_OUT_DIR)
    db = store.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise TrackingError(f"no MLflow store at {db}: pass the --mlflow-uri the job registered in")
    store.check_server(uri)
    name = name if name.startswith(store.MODEL_PREFIX) else store.model_name(name)
    result = champion.promote(uri, name, version, args.reason or "", alias=args.alias)
    print(f"{name}: {args.alias} -> v{result['champion_version']} ({result['reason']})")
    return 0 if result["champion_version"] == result["version"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.register",
        description="Register a job's models in MLflow later (--from-storage), or move the champion alias by "
        "hand (--promote).",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--from-storage", metavar="DIR", help="job output dir (holds summary.json)")
    what.add_argument(
        "--promote", nargs=2, metavar=("NAME", "VERSION"), help="move the alias to this version by hand"
    )
    parser.add_argument("--reason", help="why (recorded with --promote, with who and when)")
    parser.add_argument(
        "--mlflow-uri",
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///DIR/mlflow.db; with --promote "
        f"sqlite:///{DEFAULT_OUT_DIR}/mlflow.db)",
    )
    parser.add_argument("--alias", default=CHAMPION, help="alias of the best version (default: champion)")
    args = parser.parse_args(argv)
    try:
        store.check_alias(args.alias)
        if args.promote:
            return _promote(args)
        results = register_from_storage(args.from_storage, args.mlflow_uri, alias=args.alias)
    except TrackingError as e:
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
