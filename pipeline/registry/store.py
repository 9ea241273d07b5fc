"""Where MLflow lives and how we talk to it: the URI, a fail-fast check, the client, retries, names.

Default store: `sqlite:///<out>/mlflow.db` with artifacts in `<out>/mlartifacts` (the registry needs a
database store). In a cluster: `mlflow server ... --serve-artifacts` on the head, so that artifacts go
through the server and never land in one worker's local folder.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import invdyn
from invdyn import settings
from invdyn._download import redact_url
from invdyn._files import sha256_file
from invdyn.errors import InvdynError
from invdyn.model_dir import read_model_dir
from invdyn.settings import code_version_override, dataset_model_name, mlflow_retries, mlflow_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHAMPION_METRIC_TAG = "champion_metric"  # registered-model tag: the metric that picks the champion
MODEL_ARTIFACT = "model"  # artifact path of a model directory inside a run
MODEL_PREFIX = "invdyn-"
REGISTRY_EXPERIMENT = "invdyn-registry"  # runs made for registrations whose trial was never tracked
# MLflow 3's UI opens an experiment by this tag: unset, it shows the GenAI view (traces); this value opens
# the runs table and the model-training view
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: MLflow errors that mean "no such alias / version": an answer, not a failure
MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class TrackingError(InvdynError, RuntimeError):
    """MLflow is unreachable or refused a write; the message names the URI and what to do."""


# ---------------------------------------------------------------------------------------------- the URI


def default_uri(out_dir) -> str:
    """The job's own SQLite store `<out_dir>/mlflow.db` (artifacts go to `<out_dir>/mlartifacts`)."""
    return f"sqlite:///{Path(out_dir).expanduser().resolve() / 'mlflow.db'}"


def resolve_uri(uri: str | None, out_dir) -> str:
    """`--mlflow-uri`, else `$MLFLOW_TRACKING_URI`, else the default SQLite store in `out_dir`."""
    return uri or mlflow_tracking_uri() or default_uri(out_dir)


def is_http(uri: str) -> bool:
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


def experiment_url(ui: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the MLflow UI at `ui` (http://host:port).

    MLflow 3.x's UI shows an experiment in the view of its global GenAI / Model training switch (kept in
    the browser, GenAI at first), not of the experiment's tag; the query asks for the training view."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def where_to_look(uri: str, experiment_id: str) -> str:
    """How a user opens experiment `experiment_id` of store `uri` in the UI (one line, secrets hidden)."""
    if is_http(uri):
        return experiment_url(redact_url(uri), experiment_id)
    local = "http://127.0.0.1:5000"
    return (
        f"{redact_url(uri)} (to see it: mlflow ui --backend-store-uri {redact_url(uri)} --host 127.0.0.1 "
        f"--port 5000, then {experiment_url(local, experiment_id)})"
    )


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the tracking store at `uri` cannot be used."""
    if is_http(uri):
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
        client(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - drivers raise many types
        raise TrackingError(
            f"MLflow store {redact_url(uri)} cannot be used: {type(e).__name__}: {e}"
        ) from None


def _check_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=_auth_headers())
    shown = redact_url(uri)
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
                f"MLflow server {shown} refused access (HTTP {e.code}: {said!r}); set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or start "
                "the server with --allowed-hosts naming the host in this URI"
            ) from None
        raise TrackingError(
            f"{shown} answered HTTP {e.code} to {redact_url(url)}: is it an MLflow tracking server? {fix}"
        ) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {shown} is not reachable ({reason}); {fix}") from None
    try:
        json.loads(body)
    except ValueError:
        raise TrackingError(
            f"{shown} answered {redact_url(url)} with something other than JSON: not an MLflow server"
        ) from None


def _auth_headers() -> dict:
    """MLflow's own credential variables (MLflow reads them too), for the one request made without it."""
    token, user, password = settings.mlflow_credentials()
    if token:
        return {"Authorization": f"Bearer {token}"}
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


# ------------------------------------------------------------------------------------- the client


_initialized: set[str] = set()


def client(uri: str) -> MlflowClient:
    """An MlflowClient for tracking and registry at `uri` (a new SQLite DB is created under a lock)."""
    # MLflow retries each HTTP request up to 7 times with exponential backoff (minutes when the server is
    # down). We retry whole operations ourselves (`retry`), so keep its own retries short unless the user
    # chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # one "View run" line per finished run drowns the job's progress; the trial logger prints it once
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # the model directories we download are a few files: a bar per download finishes in a millisecond
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    db = sqlite_path(uri)
    if db is None or uri in _initialized:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # MLflow creates / migrates a SQLite DB when a process first opens it; two processes doing that at
    # once break the migration ("Online migration expected to match one row"). One at a time.
    db.parent.mkdir(parents=True, exist_ok=True)
    # and it says so at INFO on stderr ("Creating initial MLflow database tables..."): routine, not news
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    with FileLock(str(db) + ".lock"):
        mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        mlflow_client.search_experiments(max_results=1)
        mlflow_client.search_registered_models(max_results=1)
    _initialized.add(uri)
    return mlflow_client


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


def retry(what: str, fn, *, attempts: int | None = None, first_delay: float = 1.0):
    """Run `fn()`; on a transient error wait 1, 2, 4, ... s and try again (short outages pass)."""
    attempts = attempts or mlflow_retries()
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


def get_experiment_id(mlflow_client: MlflowClient, uri: str, name: str) -> str:
    """The id of experiment `name`, created (race-safely) with its artifacts beside a SQLite store and
    tagged as a model-training experiment (an existing one lacking the tag gets it)."""
    if sqlite_path(uri) is not None:
        _tag_default_experiment(mlflow_client)
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage != "active":
            mlflow_client.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # a user's own choice of view is left alone
            mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'x'}" if root else None
    try:
        return mlflow_client.create_experiment(
            name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return get_experiment_id(mlflow_client, uri, name)


def _tag_default_experiment(mlflow_client: MlflowClient) -> None:
    """A SQLite store gets MLflow's own "Default" experiment when it is made; in a store of ours it is
    tagged like the job's, so every experiment there opens in the model-training view."""
    default = mlflow_client.get_experiment("0")
    if default.lifecycle_stage == "active" and default.tags.get(EXPERIMENT_KIND_TAG) is None:
        mlflow_client.set_experiment_tag("0", EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def check_alias(alias: str) -> str:
    """`alias` when MLflow would take it as a model alias; else a TrackingError saying what would."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias or "") or re.fullmatch(r"[vV]\d+", alias):
        raise TrackingError(
            f"alias {alias!r} is not a valid MLflow alias: use letters, digits, '_' or '-' "
            f"(not v<number>), e.g. {CHAMPION}"
        )
    return alias


def quote(text: str) -> str:
    """A value quoted for an MLflow filter string."""
    return str(text).replace("\\", "\\\\").replace("'", "\\'")


def alias_version(mlflow_client: MlflowClient, name: str, alias: str = CHAMPION) -> str | None:
    """The version number `alias` of registered model `name` points at, or None."""
    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if e.error_code in MISSING:
            return None
        raise


def all_versions(mlflow_client: MlflowClient, name: str) -> list:
    return list(mlflow_client.search_model_versions(f"name = '{quote(name)}'"))


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level of dotted keys (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def param_value(v) -> str:
    """A param or tag value: strings as they are, anything else as JSON, cut to MLflow's 5000 chars."""
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text[:5000]


def log_batch(mlflow_client: MlflowClient, run_id: str, metrics=(), params=(), tags=()) -> None:
    """`log_batch` within MLflow's limits: 1000 entries, at most 100 params / tags per call."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        m, metrics = metrics[: 1000 - len(p) - len(t)], metrics[1000 - len(p) - len(t) :]
        mlflow_client.log_batch(run_id, metrics=m, params=p, tags=t)


# ---------------------------------------------------------------------------------- names and ids


def model_name(dataset: str) -> str:
    """Registered model name of a dataset: `invdyn-` + the dataset's model name (invdyn.settings)."""
    return MODEL_PREFIX + dataset_model_name(dataset)


def code_version() -> str:
    """The git commit of this checkout (`+dirty` with local changes), else the invdyn version."""
    override = code_version_override()
    if override:
        return override
    root = str(Path(__file__).resolve().parents[2])

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=5, check=True
        )
        return run.stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
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
