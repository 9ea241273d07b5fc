"""MLflow for the pipeline: the one module that talks to MLflow (tracking, registry, downloads).

- `check_server` fails fast (before any training) when the tracking store cannot be reached.
- `tune_callback` logs one MLflow run per Ray Tune trial *from the driver* (Tune callbacks run there),
  nested under one parent run per dataset, so trial processes never write to MLflow.
- `register_dataset` registers the best model directory of a dataset as a version of
  `invdyn-<dataset>` and moves the `champion` alias only to a better model (see `choose_champion`).

Default store: `sqlite:///<out>/mlflow.db` with artifacts in `<out>/mlartifacts` (the registry needs a
database store). In a cluster: `mlflow server ... --serve-artifacts` on the head, so that artifacts go
through the server and never land in one worker's local folder.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import mlflow.artifacts
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray.tune import Callback

import invdyn
from invdyn._files import sha256_file
from invdyn.errors import InvdynError
from invdyn.model_dir import PARAMS_FILE, read_model_dir

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC_TAG = "champion_metric"  # registered-model tag: the metric that picks the champion
MODEL_ARTIFACT = "model"  # artifact path of a model directory inside a run
MODEL_PREFIX = "invdyn-"
REGISTRY_EXPERIMENT = "invdyn-registry"  # runs made for registrations whose trial was never tracked
# Result keys Ray Tune adds by itself: bookkeeping, not metrics of the model.
_TUNE_KEYS = {
    "training_iteration",
    "time_this_iter_s",
    "timestamp",
    "pid",
    "iterations_since_restore",
    "time_since_restore",
    "timesteps_total",
    "episodes_total",
    "timesteps_since_restore",
    "done",
    "trial_id",
    "date",
    "hostname",
    "node_ip",
    "config",
    "checkpoint_dir_name",
    "should_checkpoint",
    "experiment_tag",
    "episode_reward_mean",
    "warmup_time",
    "experiment_id",
}
_CURVE_INDEX_KEYS = {"epoch", "step"}


class TrackingError(InvdynError, RuntimeError):
    """MLflow is unreachable or refused a write; the message names the URI and what to do."""


# ----------------------------------------------------------------------------------------------
# Where MLflow lives


def default_uri(out_dir) -> str:
    """The job's own SQLite store `<out_dir>/mlflow.db` (artifacts go to `<out_dir>/mlartifacts`)."""
    return f"sqlite:///{Path(out_dir).expanduser().resolve() / 'mlflow.db'}"


def resolve_uri(uri: str | None, out_dir) -> str:
    """`--mlflow-uri`, else `$MLFLOW_TRACKING_URI`, else the default SQLite store in `out_dir`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(out_dir)


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: beside a SQLite DB; for a server, its own default."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts").as_uri()


def redact(uri: str) -> str:
    """The URI without any user:password part, for messages and manifests."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store at `uri` cannot be used."""
    if _is_http(uri):
        _check_http(uri, timeout)
        return
    db = sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create folder {db.parent} ({e})") from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(
                f"MLflow store {uri}: {db} is not writable; choose another --out or pass --mlflow-uri"
            )
        return
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"MLflow store {uri!r} is a file store, but the model registry needs a database store: "
            "use sqlite:///path/mlflow.db or an `mlflow server` URL (http://host:5000)"
        )
    try:  # other database schemes (postgresql://, mysql://, ...): ask MLflow itself
        _client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - drivers raise many types
        raise TrackingError(f"MLflow store {redact(uri)} cannot be used: {type(e).__name__}: {e}") from None


def _check_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=_auth_headers())
    fix = (
        f"start one (mlflow server --host 127.0.0.1 --port {urllib.parse.urlsplit(uri).port or 5000} "
        "--backend-store-uri sqlite:///mlflow.db --serve-artifacts --artifacts-destination ./mlartifacts) "
        "or point --mlflow-uri / MLFLOW_TRACKING_URI at a running server"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            said = e.read(300).decode(errors="replace").strip()
            raise TrackingError(
                f"MLflow server {redact(uri)} refused access (HTTP {e.code}: {said!r}); set MLFLOW_TRACKING_USERNAME"
                " / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or start the server with --allowed-hosts "
                "naming the host in this URI"
            ) from None
        raise TrackingError(
            f"{redact(uri)} answered HTTP {e.code} to {url}: is it an MLflow tracking server? {fix}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} is not reachable ({reason}); {fix}"
        ) from None
    try:
        json.loads(body)
    except ValueError:
        raise TrackingError(
            f"{redact(uri)} answered {url} with something other than JSON: not an MLflow server"
        ) from None


def _auth_headers() -> dict:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _client(uri: str) -> MlflowClient:
    # MLflow retries each HTTP request up to 7 times with exponential backoff (minutes when the server is
    # down). We retry whole operations ourselves (`_retry`), so keep its own retries short unless the user
    # chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # one "View run" line per finished run drowns the job's progress; the callback prints the experiment once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    db = sqlite_path(uri)
    if db is None or uri in _initialized:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # MLflow creates / migrates a SQLite DB when a process first opens it; two processes doing that at
    # once break the migration ("Online migration expected to match one row"). One at a time.
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _initialized.add(uri)
    return client


_initialized: set[str] = set()
_gave_up: dict[str, float] = {}  # uri -> when a registration last failed after all retries


def is_transient(error: BaseException) -> bool:
    """Connection failures, timeouts, 5xx and SQLite lock contention: worth retrying."""
    text = f"{type(error).__name__}: {error}"
    markers = (
        "Max retries exceeded",
        "Connection refused",
        "ConnectionError",
        "Connection aborted",
        "RemoteDisconnected",
        "timed out",
        "Timeout",
        "database is locked",
        "TEMPORARILY_UNAVAILABLE",
        "503",
        "502",
        "504",
        "too many 500 error responses",
    )
    return isinstance(error, (ConnectionError, TimeoutError)) or any(m in text for m in markers)


def _retry(what: str, fn, *, attempts: int | None = None, first_delay: float = 1.0):
    """Run `fn()`; on a transient error wait 1, 2, 4, ... s and try again (short outages pass)."""
    attempts = attempts or int(os.environ.get("INVDYN_MLFLOW_RETRIES", "6"))
    delay = first_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e) or attempt == attempts:
                raise
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.0fs",
                what,
                type(e).__name__,
                e,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
    raise AssertionError("unreachable")


def get_experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created (race-safely) with its artifacts beside a SQLite store."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{_safe(name)}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-") or "x"


def model_name(dataset: str) -> str:
    """Registered model name of a dataset: `invdyn-<dataset>` (characters outside [A-Za-z0-9._-] -> '-')."""
    return MODEL_PREFIX + _safe(dataset)


def code_version() -> str:
    """The git commit of this checkout (`+dirty` with local changes), else the invdyn version."""
    env = os.environ.get("INVDYN_CODE_VERSION")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"invdyn-{invdyn.__version__}"
    return f"git:{sha}{'+dirty' if dirty else ''}" if sha else f"invdyn-{invdyn.__version__}"


def weights_sha256(model_dir) -> str:
    """The weights checksum recorded in a model directory (verified by loading it): its identity."""
    model = read_model_dir(model_dir)  # refuses a broken or half-written directory
    sha = (model.params.get("weights") or {}).get("sha256")
    if not sha:
        ckpts = sorted(Path(model_dir).glob("*.ckpt"))
        sha = sha256_file(ckpts[0])
    return sha


# ----------------------------------------------------------------------------------------------
# Tracking: one run per trial, from the Tune driver


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _metric_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(key))


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _param_value(v) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text[:5000]


def _log_batch(client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    """MLflow's batch limits: 1000 entries, at most 100 params / tags per call."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        m, metrics = metrics[: 1000 - len(p) - len(t)], metrics[1000 - len(p) - len(t) :]
        client.log_batch(run_id, metrics=m, params=p, tags=t)


def find_model_dir(root) -> Path | None:
    """`root` itself when it holds params.json, else the one model directory below it (or None)."""
    root = Path(root)
    if (root / PARAMS_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(PARAMS_FILE) if any(p.parent.glob("*.ckpt")))
    return found[0] if len(found) == 1 else None


class MlflowTrialLogger(Callback):
    """Ray Tune callback (runs in the driver): one MLflow run per trial, nested in a run per dataset.

    Logs the trial's config and dataset as params, each learning-curve point (`result["curve"]`: dicts
    with "step"/"epoch" and metrics) at its training step, the final numeric results, and at the end
    the trial's model directory (`result["model_dir"]`, else the model directory inside the trial's
    latest checkpoint) as artifacts under `model/`. A transient failure (server restarting) is retried
    with backoff; if MLflow still fails three times in a row, tracking is switched off for the rest of the
    job with a warning: training never stops for tracking.
    """

    def __init__(self, uri: str, experiment: str, job_name: str):
        self.uri, self.experiment, self.job_name = uri, experiment, job_name
        self.run_ids: dict[str, str] = {}  # trial id -> MLflow run id
        self.parent_run_ids: dict[str, str] = {}  # dataset -> parent MLflow run id
        self._logged_params: dict[str, set] = {}
        self._logged_points: dict[str, set] = {}
        self._failures = 0
        self._disabled = False
        self._client_obj = None
        self._experiment_id = None

    def __getstate__(self):  # Tune may pickle callbacks with the run config; clients do not pickle
        state = dict(self.__dict__)
        state["_client_obj"] = None
        return state

    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = _client(self.uri)
        return self._client_obj

    def run_id(self, trial_id: str) -> str | None:
        """The MLflow run id of a trial (put it into the registration record as `mlflow_run_id`)."""
        return self.run_ids.get(trial_id)

    # -- Tune hooks --------------------------------------------------------------------------
    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safely("log a result", self._log_result, trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safely("finish a run", self._finish, trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safely("mark a run failed", self._finish, trial, "FAILED")

    def on_experiment_end(self, trials, **info):
        for run_id in self.parent_run_ids.values():
            self._safely("close a dataset run", self._client.set_terminated, run_id, "FINISHED")

    # -- work --------------------------------------------------------------------------------
    def _safely(self, what, fn, *args):
        if self._disabled:
            return
        try:
            # A server restart or a short outage is waited out (1, 2, 4, ... s), so no trial goes unrecorded;
            # meanwhile only the driver's event handling waits, the trials keep training.
            _retry(f"MLflow: {what}", lambda: fn(*args))
            self._failures = 0
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self._failures += 1
            log.warning("MLflow (%s): could not %s: %s: %s", redact(self.uri), what, type(e).__name__, e)
            if self._failures >= 3:
                self._disabled = True
                log.warning(
                    "MLflow at %s failed 3 times in a row: tracking is off for the rest of this job; "
                    "models stay in the job's output and `python -m pipeline.register --from-storage DIR` "
                    "registers them later",
                    redact(self.uri),
                )

    def _dataset(self, trial, result: dict) -> str:
        config = trial.config or {}
        for source in (result, config, config.get("train_loop_config") or {}):
            name = source.get("dataset") or source.get("dataset_name")
            if isinstance(name, str) and name:
                return name
        return "unknown"

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = get_experiment_id(self._client, self.uri, self.experiment)
            where = (
                f"{redact(self.uri)}/#/experiments/{self._experiment_id}"
                if _is_http(self.uri)
                else redact(self.uri)
            )
            print(f"MLflow: experiment {self.experiment!r} at {where}", flush=True)
        return self._experiment_id

    def _find_run(self, filter_string: str) -> str | None:
        runs = self._client.search_runs([self._experiment()], filter_string, max_results=1)
        return runs[0].info.run_id if runs else None

    def _parent(self, dataset: str) -> str:
        if dataset not in self.parent_run_ids:
            # A resumed job (same job name) goes on in the same parent run.
            found = self._find_run(
                f"tags.invdyn_kind = 'dataset' and tags.dataset = '{_q(dataset)}' and tags.job = '{_q(self.job_name)}'"
            )
            if found is None:
                tags = {"dataset": dataset, "job": self.job_name, "invdyn_kind": "dataset"}
                found = self._client.create_run(self._experiment(), tags=tags, run_name=dataset).info.run_id
            self.parent_run_ids[dataset] = found
        return self.parent_run_ids[dataset]

    def _run(self, trial, result: dict) -> str:
        trial_id = trial.trial_id
        if trial_id not in self.run_ids:
            dataset = self._dataset(trial, result)
            parent = self._parent(dataset)
            found = self._find_run(
                f"tags.ray_trial_id = '{_q(trial_id)}' and tags.job = '{_q(self.job_name)}'"
            )
            if found is None:
                tags = {
                    "dataset": dataset,
                    "job": self.job_name,
                    "ray_trial_id": trial_id,
                    "invdyn_kind": "trial",
                    "mlflow.parentRunId": parent,
                    "code_version": code_version(),
                }
                run = self._client.create_run(self._experiment(), tags=tags, run_name=f"{dataset}/{trial_id}")
                found = run.info.run_id
            self.run_ids[trial_id] = found
            self._logged_params[trial_id] = set()
            self._logged_points[trial_id] = set()
        return self.run_ids[trial_id]

    def _log_result(self, trial, result: dict) -> None:
        run_id = self._run(trial, result)
        trial_id = trial.trial_id
        now = int(time.time() * 1000)
        # Params: the trial's config (flattened) plus what the result says about the data.
        params = _flatten(trial.config or {})
        for key in ("dataset", "sha256", "dataset_sha256", "architecture", "split", "seed"):
            if key in result and not isinstance(result[key], (dict, list)):
                params.setdefault(key, result[key])
        new_params = [
            Param(k, _param_value(v))
            for k, v in sorted(params.items())
            if k not in self._logged_params[trial_id]
        ]
        self._logged_params[trial_id].update(p.key for p in new_params)
        # Learning curve: each point at its training step.
        metrics, points = [], self._logged_points[trial_id]
        curve = result.get("curve") if isinstance(result.get("curve"), list) else []
        for point in curve:
            if not isinstance(point, dict):
                continue
            step = int(_number(point.get("step")) or _number(point.get("epoch")) or 0)
            for key, value in point.items():
                number = _number(value)
                if key in _CURVE_INDEX_KEYS or number is None or (key, step) in points:
                    continue
                points.add((key, step))
                metrics.append(Metric(_metric_key(key), number, now, step))
        # Final / current scalars of this result.
        step = _number(result.get("step"))
        if step is None:
            last = curve[-1] if curve and isinstance(curve[-1], dict) else {}
            step = _number(last.get("step")) or _number(result.get("training_iteration")) or 0
        for key, value in result.items():
            number = _number(value)
            if key in _TUNE_KEYS or key in _CURVE_INDEX_KEYS or number is None or (key, int(step)) in points:
                continue
            points.add((key, int(step)))
            metrics.append(Metric(_metric_key(key), number, now, int(step)))
        tags = []
        sha = result.get("sha256") or result.get("dataset_sha256")
        if isinstance(sha, str):
            tags.append(RunTag("dataset_sha256", sha))
        _log_batch(self._client, run_id, metrics=metrics, params=new_params, tags=tags)

    def _finish(self, trial, status: str) -> None:
        result = trial.last_result or {}
        run_id = self._run(trial, result)
        if status == "FINISHED":
            self._upload_model(trial, result, run_id)
        else:
            error = getattr(trial, "error_file", None)
            self._client.set_tag(
                run_id, "error", f"trial {trial.trial_id} failed; see {error or 'the Ray logs'}"
            )
        self._client.set_terminated(run_id, status)

    def _upload_model(self, trial, result: dict, run_id: str) -> None:
        model_dir = result.get("model_dir")
        if model_dir and Path(model_dir).is_dir() and find_model_dir(model_dir):
            self._log_model_dir(run_id, find_model_dir(model_dir))
            return
        checkpoint = trial.checkpoint
        if checkpoint is None:
            log.warning(
                "trial %s reported no model_dir and no checkpoint: no model artifacts logged", trial.trial_id
            )
            return
        with tempfile.TemporaryDirectory(prefix="invdyn-ckpt-") as tmp:
            local = Path(checkpoint.to_directory(tmp))
            found = find_model_dir(local)
            if found is None:
                log.warning(
                    "checkpoint %s of trial %s holds no model directory", checkpoint.path, trial.trial_id
                )
                return
            self._log_model_dir(run_id, found)

    def _log_model_dir(self, run_id: str, model_dir: Path) -> None:
        self._client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
        self._client.set_tag(run_id, "weights_sha256", weights_sha256(model_dir))
        self._client.set_tag(run_id, "params_sha256", sha256_file(Path(model_dir) / PARAMS_FILE))


def _q(text: str) -> str:
    """Quote a value for an MLflow filter string."""
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


def tune_callback(uri: str, experiment: str, job_name: str) -> MlflowTrialLogger:
    """The Tune callback to pass in `RunConfig(callbacks=[...])`; see `MlflowTrialLogger`."""
    return MlflowTrialLogger(uri, experiment, job_name)


# ----------------------------------------------------------------------------------------------
# Registry: one version per dataset per job, champion only for a better model


def _tag_number(version, tag: str) -> float | None:
    try:
        value = float(version.tags.get(tag, "nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _mse(version) -> float | None:
    return _tag_number(version, "heldout_mse")


def _score(version, metric: str) -> float | None:
    """A version's value of a champion metric: the `heldout_mse` tag, else the `eval.<metric>` tag."""
    return _mse(version) if metric == "heldout_mse" else _tag_number(version, f"eval.{metric}")


_LABELS = {
    "heldout_mse": "held-out MSE",
    "one_step_error": "one-step error",
    "tracking_drift": "tracking drift",
}


def _ranking(versions, metric: str = "heldout_mse") -> tuple[str, list]:
    """(the metric that decides, the versions it ranks): the versions on the current data (the dataset
    sha256 of the newest version with a held-out MSE) that carry `eval.<metric>` (tracking drift: at the
    horizon of the newest of them), else, when none carries it, all of them by held-out MSE."""
    scored = [v for v in versions if _mse(v) is not None]
    if not scored:
        return "heldout_mse", []
    current = max(scored, key=lambda v: int(v.version)).tags.get("dataset_sha256")
    same = [v for v in scored if v.tags.get("dataset_sha256") == current]
    if metric != "heldout_mse":
        carrying = [v for v in same if _score(v, metric) is not None]
        if metric == "tracking_drift" and carrying:  # drift at another horizon is another quantity
            horizon = max(carrying, key=lambda v: int(v.version)).tags.get("eval.horizon")
            carrying = [v for v in carrying if v.tags.get("eval.horizon") == horizon]
        if carrying:
            return metric, carrying
    return "heldout_mse", same


def choose_champion(versions, metric: str = "heldout_mse") -> str | None:
    """The version that should hold `champion`: the lowest `metric` (the registered model's
    `champion_metric` tag: heldout_mse, one_step_error or tracking_drift) among the versions trained on
    the current data (the dataset sha256 of the newest registered version); ties go to the older version.

    Versions on older data are never compared with newer data: their metrics were measured on other
    transitions, so the first version registered on new data becomes champion and better versions on
    that data replace it. A physics metric compares only the versions that carry its `eval.*` tag; if
    none does, held-out MSE decides. Deterministic from the registry alone, so concurrent registrations
    agree.
    """
    rule, ranked = _ranking(versions, metric)
    if not ranked:
        return None
    return str(min(ranked, key=lambda v: (_score(v, rule), int(v.version))).version)


def champion_metric(client: MlflowClient, name: str) -> str:
    """The champion rule of registered model `name`: its `champion_metric` tag (default heldout_mse)."""
    from pipeline.quality.evaluate import SELECT_METRICS

    metric = client.get_registered_model(name).tags.get(CHAMPION_METRIC_TAG) or "heldout_mse"
    if metric not in SELECT_METRICS:
        log.warning(
            "%s: tag %s=%r is not one of %s; using heldout_mse",
            name,
            CHAMPION_METRIC_TAG,
            metric,
            SELECT_METRICS,
        )
        return "heldout_mse"
    return metric


def _champion_version(client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _all_versions(client: MlflowClient, name: str) -> list:
    return list(client.search_model_versions(f"name = '{_q(name)}'"))


def settle_champion(
    client: MlflowClient, name: str, alias: str = CHAMPION, max_rounds: int = 50
) -> str | None:
    """Point `alias` at `choose_champion(all versions, the model's champion_metric)`; loop until a fresh
    read agrees.

    MLflow has no compare-and-set for aliases. Every registering process ends with a read in which the
    alias already equals the best version it sees, and every version exists before its creator's reads;
    so after the last read of all no write follows and the alias is on the best version of all. The rule
    (the registered model's `champion_metric`) is read afresh in every round, like the versions.
    """
    for _ in range(max_rounds):
        target = choose_champion(_all_versions(client, name), champion_metric(client, name))
        current = _champion_version(client, name, alias)
        if target is None or current == target:
            return current
        try:
            client.set_registered_model_alias(name, alias, target)
        except Exception as e:  # noqa: BLE001 - a REST error via a server, SQLAlchemy's directly on a SQL store
            if not _is_alias_write_conflict(e):
                raise
            log.info("%s: alias %r was written concurrently (%s); reading it again", name, alias, e)
    raise TrackingError(f"{name}: alias {alias!r} kept changing under concurrent registrations; run again")


def _is_alias_write_conflict(error: Exception) -> bool:
    """Another process set the same alias at the same moment: a SQL store rejects the second insert with a
    unique-constraint error. Nothing is lost; the next round of `settle_champion` reads the alias again."""
    text = str(error)
    return "UNIQUE constraint failed" in text or "IntegrityError" in text or "Duplicate entry" in text


def _ensure_registered_model(client: MlflowClient, name: str, dataset: str) -> None:
    try:
        client.create_registered_model(
            name,
            tags={"dataset": dataset},
            description=f"invdyn inverse dynamics model for dataset {dataset}; alias `{CHAMPION}` = best version "
            f"by the metric in tag `{CHAMPION_METRIC_TAG}` (default: held-out MSE)",
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _find_trial_run(client: MlflowClient, record: dict):
    """The run the Tune callback logged for this record's trial (by id, else by trial tag)."""
    run_id = record.get("mlflow_run_id")
    if run_id:
        try:
            return client.get_run(run_id)
        except MlflowException:
            pass
    trial_id = record.get("trial_id")
    if not trial_id:
        return None
    experiments = [e.experiment_id for e in client.search_experiments(max_results=1000)]
    if not experiments:
        return None
    filt = f"tags.ray_trial_id = '{_q(trial_id)}' and tags.dataset = '{_q(record['dataset'])}'"
    if record.get("job"):
        filt += f" and tags.job = '{_q(record['job'])}'"
    runs = client.search_runs(experiments, filt, max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _source_for(client: MlflowClient, uri: str, record: dict, model_dir: Path, sha: str) -> tuple[str, str]:
    """(artifact URI of the model directory, run id): the trial's logged artifacts when they are the
    same files (weights and params.json: an evaluation attached after the trial changes params.json and
    the card), else a fresh upload (into the trial's run, or a new run in `invdyn-registry`)."""
    run = _find_trial_run(client, record)
    params_sha = sha256_file(model_dir / PARAMS_FILE)
    if run is not None and (run.data.tags.get("weights_sha256"), run.data.tags.get("params_sha256")) == (
        sha,
        params_sha,
    ):
        return f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run.info.run_id
    if run is None:
        experiment = get_experiment_id(client, uri, record.get("experiment") or REGISTRY_EXPERIMENT)
        tags = {
            "dataset": record["dataset"],
            "invdyn_kind": "registration",
            "ray_trial_id": str(record.get("trial_id", "")),
            "job": str(record.get("job", "")),
        }
        run = client.create_run(experiment, tags=tags, run_name=f"{record['dataset']}/register")
        params = [Param(k, _param_value(v)) for k, v in sorted(_flatten(record.get("config") or {}).items())]
        metrics = [
            Metric(k, _number(record[k]), int(time.time() * 1000), 0)
            for k in ("heldout_mse", "baseline_mse")
            if _number(record.get(k)) is not None
        ]
        _log_batch(client, run.info.run_id, metrics=metrics, params=params)
        path = MODEL_ARTIFACT
    elif client.list_artifacts(run.info.run_id, MODEL_ARTIFACT):
        path = f"{MODEL_ARTIFACT}-{params_sha[:12]}"  # the trial's run logged other files under model/
    else:
        path = MODEL_ARTIFACT  # the trial's upload never happened (MLflow was down when it finished)
    client.log_artifacts(run.info.run_id, str(model_dir), path)
    if path == MODEL_ARTIFACT:
        client.set_tag(run.info.run_id, "weights_sha256", sha)
        client.set_tag(run.info.run_id, "params_sha256", params_sha)
    if run.info.status == "RUNNING":  # its trial is over: we hold its model
        client.set_terminated(run.info.run_id, "FINISHED")
    return f"{run.info.artifact_uri}/{path}", run.info.run_id


def register_dataset(uri: str, record: dict, *, alias: str = CHAMPION, attempts: int | None = None) -> dict:
    """Register a dataset's best model directory as a new version of `invdyn-<dataset>`; move `alias` to
    it only if it is better (see `choose_champion`). Idempotent: the same weights are registered once.

    `record` holds at least dataset, heldout_mse, model_dir (+ sha256, baseline_mse, config, trial_id,
    mlflow_run_id, job when known). `record["evaluation"]` (pipeline.quality.evaluate's headline metrics) becomes
    the version's `eval.*` tags, set when it is created; `record["champion_metric"]` sets the registered
    model's champion rule (tag `champion_metric`) before the alias is settled.
    Returns {"model_name", "version", "champion", "reason", "champion_metric", ...}.
    Transient failures (server restarting, SQLite locked) are retried with backoff.
    """
    missing = [k for k in ("dataset", "heldout_mse", "model_dir") if record.get(k) in (None, "")]
    if missing:
        raise TrackingError(f"registration record {record.get('dataset', '?')!r} lacks {missing}")
    if _number(record["heldout_mse"]) is None:
        raise TrackingError(
            f"{record['dataset']}: heldout_mse {record['heldout_mse']!r} is not a finite number"
        )
    from pipeline.quality.evaluate import SELECT_METRICS

    if record.get("champion_metric") not in (None, *SELECT_METRICS):
        raise TrackingError(
            f"{record['dataset']}: champion_metric {record['champion_metric']!r} is not one of {list(SELECT_METRICS)}"
        )
    model_dir = Path(record["model_dir"])
    if not model_dir.is_dir():
        raise TrackingError(f"{record['dataset']}: model directory {model_dir} does not exist")
    sha = weights_sha256(model_dir)
    if attempts is None and time.monotonic() - _gave_up.get(uri, -1e9) < 120:
        attempts = 1  # it just failed after every retry: the next datasets of this job fail fast
    try:
        result = _retry(
            f"registering {record['dataset']} in {redact(uri)}",
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
            f"could not register {record['dataset']} in MLflow at {redact(uri)} ({type(e).__name__}: {e}). "
            f"The model stays at {model_dir}; once MLflow is reachable run "
            f"`python -m pipeline.register --from-storage <job output dir> --mlflow-uri {redact(uri)}`"
        ) from None


def _register(uri: str, record: dict, model_dir: Path, sha: str, alias: str) -> dict:
    client = _client(uri)
    dataset = record["dataset"]
    name = model_name(dataset)
    _ensure_registered_model(client, name, dataset)
    metric = record.get("champion_metric")
    if metric and client.get_registered_model(name).tags.get(CHAMPION_METRIC_TAG) != metric:
        client.set_registered_model_tag(name, CHAMPION_METRIC_TAG, metric)
    eval_tags = _eval_tags(record)
    before = _champion_version(client, name, alias)
    same = [v for v in _all_versions(client, name) if v.tags.get("weights_sha256") == sha]
    if same:
        version, created = min(same, key=lambda v: int(v.version)), False
        if eval_tags and not any(k.startswith("eval.") for k in version.tags):  # registered before evaluation
            for key, value in sorted(eval_tags.items()):
                client.set_model_version_tag(name, str(version.version), key, value)
    else:
        source, run_id = _source_for(client, uri, record, model_dir, sha)
        tags = {
            "dataset": dataset,
            "dataset_sha256": str(record.get("sha256") or record.get("dataset_sha256") or ""),
            "heldout_mse": repr(float(record["heldout_mse"])),
            "baseline_mse": repr(float(record["baseline_mse"]))
            if _number(record.get("baseline_mse")) is not None
            else "",
            "code_version": str(record.get("code_version") or code_version()),
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
        created = True
    after = settle_champion(client, name, alias)
    versions = {str(v.version): v for v in _all_versions(client, name)}
    mine = versions[str(version.version)]
    rule = champion_metric(client, name)
    reason = _reason(mine, versions, before, after, created, rule)
    if created:  # the decision made when the version was registered, shown in the registry UI
        client.set_model_version_tag(name, str(version.version), "champion_decision", reason)
        _summarize_in_parent(client, mine.run_id, name, mine, after == str(version.version))
    return {
        "model_name": name,
        "version": str(version.version),
        "champion": after == str(version.version),
        "reason": reason,
        "previous_champion": before,
        "champion_version": after,
        "registered": created,
        "run_id": mine.run_id,
        "source": mine.source,
        "heldout_mse": _mse(mine),
        "champion_metric": rule,
        "eval_tags": {k: v for k, v in mine.tags.items() if k.startswith("eval.")},
    }


def _eval_tags(record: dict) -> dict:
    """`eval.*` version tags (strings) from the record's evaluation (pipeline.quality.evaluate.evaluation_tags)."""
    evaluation = record.get("evaluation")
    if not isinstance(evaluation, dict) or not evaluation:
        return {}
    from pipeline.quality.evaluate import evaluation_tags

    return {k: repr(v) for k, v in evaluation_tags(evaluation).items()}


def _summarize_in_parent(client: MlflowClient, run_id: str, name: str, version, champion: bool) -> None:
    """Show the dataset's outcome on its parent run (the row a user sees first in the experiment)."""
    try:
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if not parent:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(version.tags[k]), now, 0)
            for k in sorted(version.tags)
            if (k in ("heldout_mse", "baseline_mse") or k.startswith("eval.")) and version.tags.get(k)
        ]
        tags = [
            RunTag("registered_model", name),
            RunTag("registered_version", str(version.version)),
            RunTag("champion", "yes" if champion else "no"),
            RunTag("best_trial_run", run_id),
        ]
        _log_batch(client, parent, metrics=metrics, tags=tags)
    except MlflowException as e:  # cosmetic: the registration itself is done
        log.warning("could not summarize %s v%s on its dataset run: %s", name, version.version, e)


def _reason(
    mine, versions: dict, before: str | None, after: str | None, created: bool, metric: str = "heldout_mse"
) -> str:
    me = str(mine.version)
    prefix = "" if created else f"already registered as version {me} (same weights); "
    rule, _ = _ranking(list(versions.values()), metric)
    label = _LABELS[rule] + (
        "" if rule == metric else f" ({_LABELS[metric]}: no version on this data carries it)"
    )
    score = _score(mine, rule)
    old = versions.get(before) if before else None
    if after == me:
        if before is None:
            return prefix + f"first champion: {label} {_g(score)}"
        if before == me:
            return prefix + "already the champion"
        if old is not None and old.tags.get("dataset_sha256") != mine.tags.get("dataset_sha256"):
            return prefix + (
                f"new data (sha256 {mine.tags.get('dataset_sha256', '')[:12]} differs from champion v{before}'s "
                f"{old.tags.get('dataset_sha256', '')[:12]}): metrics are not comparable, champion moves to the newest data"
            )
        if old is None or _score(old, rule) is None:
            return (
                prefix + f"{label} {_g(score)}: champion v{before} has no {rule} to compare, this version has"
            )
        return prefix + f"{label} {_g(score)} beats champion v{before}'s {_g(_score(old, rule))}"
    champ = versions.get(after) if after else None
    if champ is None:
        return prefix + "no champion (no version has a held-out MSE)"
    if champ.tags.get("dataset_sha256") != mine.tags.get("dataset_sha256"):
        return prefix + (
            f"registered without {CHAMPION}: trained on other data (sha256 {mine.tags.get('dataset_sha256', '')[:12]}) "
            f"than the newest version; champion is v{after}"
        )
    if score is None:
        return prefix + (
            f"registered without {CHAMPION}: the champion is chosen by {label} (registered-model tag "
            f"{CHAMPION_METRIC_TAG}) and this version has no eval.{rule} tag; champion is v{after}"
        )
    return prefix + (
        f"registered without {CHAMPION}: {label} {_g(score)} does not beat champion v{after}'s "
        f"{_g(_score(champ, rule))} on the same data"
    )


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


# ----------------------------------------------------------------------------------------------
# Reading the registry (export)


def champions(uri: str, alias: str = CHAMPION) -> list[dict]:
    """Every `invdyn-*` registered model's `alias` version: name, version, run id, source, tags (sorted)."""
    client = _client(uri)
    out = []
    for model in client.search_registered_models(f"name LIKE '{MODEL_PREFIX}%'", max_results=1000):
        version = _champion_version(client, model.name, alias)
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
    client = _client(uri)
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


def tag_model_version(uri: str, model_uri: str, tags: dict) -> dict:
    """Set `tags` on the registered version that `model_uri` (`models:/<name>/<version>` or
    `models:/<name>@<alias>`) points at; used to attach evaluation metrics to a registered model.
    Returns {"model_name", "version"}."""
    if not model_uri.startswith("models:/"):
        raise TrackingError(
            f"{model_uri!r} is not a registry URI: use models:/<name>@<alias> or models:/<name>/<version>"
        )
    try:
        return _tag_model_version(_client(uri), model_uri[len("models:/") :], tags)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow / HTTP / SQL errors become one actionable error
        raise TrackingError(
            f"could not tag {model_uri} in MLflow at {redact(uri)} ({type(e).__name__}: {e})"
        ) from None


def _tag_model_version(client: MlflowClient, ref: str, tags: dict) -> dict:
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = _retry(
            f"reading alias {alias} of {name}", lambda: client.get_model_version_by_alias(name, alias)
        ).version
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
    else:
        raise TrackingError(f"models:/{ref} names no version or alias: use models:/<name>@<alias>")
    for key, value in sorted(tags.items()):
        _retry(
            f"tagging {name} v{version}",
            lambda k=key, v=value: client.set_model_version_tag(name, version, k, str(v)),
        )
    return {"model_name": name, "version": str(version)}
