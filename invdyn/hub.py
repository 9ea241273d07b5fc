"""Find a model by name (`load`), install bundles into the cache (`fetch`, or the team remote on a miss),
list what is installed."""

from __future__ import annotations

import difflib
import hashlib
import json
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path

from . import __version__
from ._download import download, is_url, redact_url
from ._files import atomic_file, file_lock, replace_dir, sha256_file, storage_errors
from ._hints import MINARI_ID_PREFIX, how_to_get, minari_id_message
from .bundle import extract_verified, open_bundle, verify_open
from .errors import (
    BundleNotFoundError,
    ChecksumError,
    DownloadError,
    FormatError,
    InvdynError,
    ModelNotFoundError,
)
from .model_dir import PARAMS_FILE, read_model_dir, read_params
from .pretrained import PretrainedIDM
from .remote import Remote, bundle_for, configured_remote
from .settings import (
    cleandiffuser_dir,
    dataset_model_name,
    invdyn_home,
    is_offline,
    is_valid_name,
    model_cache_dir,
    split_jump,
)
from .settings import remote as remote_setting

# The cache under $INVDYN_HOME (default ~/.cache/invdyn):
#   models/<name>/                     an installed model directory (exactly the bundle's files)
#   models/<name>/.invdyn-install.json where it came from and the checksums it was installed with
#   bundles/<sha256>.json              the verified manifest of every bundle installed
#   downloads/                         partial downloads (`*.part`), resumed by the next fetch
# Every model directory appears by one rename, so a reader sees the old copy or the new one, never half
# of one, and concurrent fetches of the same bundle end with one good copy.

INSTALL_RECORD = ".invdyn-install.json"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def load(name: str, *, jump: int | None = None, source=None, device="cpu") -> PretrainedIDM:
    """A ready model (eval mode) with its normalizer and metadata.

    Looks in, in order: `source` (a model directory, a bundle .zip path or http(s) URL — installed into
    the cache first — or an MLflow `models:/...` URI), the invdyn cache, CleanDiffuser's directory, and
    then installs it from the team remote (`INVDYN_REMOTE` / `invdyn.configure(remote=...)`) when one is set.
    `jump=k` asks for the model of a_t = I(s_t, s_{t+k}): `load("hopper-medium-v2", jump=4)` is
    `load("hopper-medium-v2@k4")`.
    """
    name = _with_jump(name, jump)
    if not is_valid_name(name):
        if isinstance(name, str) and name.startswith(MINARI_ID_PREFIX):
            raise ModelNotFoundError(minari_id_message(name, dataset_model_name(name)))
        raise ModelNotFoundError(
            f"{name!r} is not a model name (letters, digits, '.', '_', '-'; e.g. hopper-medium-v2)"
        )
    if source is not None:
        return _load_from_source(name, source, device)
    cached = model_cache_dir() / name
    if cached.is_dir():
        return _read_installed(cached, device)._with_source("invdyn cache")
    theirs = cleandiffuser_dir(name)
    if theirs.is_dir():
        return read_model_dir(theirs, device)._with_source("CleanDiffuser")
    remote = configured_remote()
    if remote is not None:
        return _load_from_remote(name, remote, device)
    raise _not_found(name)


def _with_jump(name, jump) -> str:
    """`name` with the jump suffix `jump` asks for; refuses a jump that contradicts the name's own."""
    if jump is None or not isinstance(name, str):
        return name
    if isinstance(jump, bool) or not isinstance(jump, int) or jump < 1:
        raise ValueError(f"jump must be an integer >= 1, got {jump!r}")
    base, own = split_jump(name)
    if own not in (1, jump):
        raise ValueError(f"{name!r} is the model of jump {own}, but jump={jump} was asked for")
    return base if jump == 1 else f"{base}@k{jump}"


def _load_from_remote(name: str, remote: Remote, device) -> PretrainedIDM:
    """Install the remote's bundle that holds `name` (checksums verified, a download resumed) and load it."""
    pinned = invdyn_home() / "bundles" / f"{remote.sha256}.json"
    if remote.sha256 and pinned.is_file():  # this exact bundle was installed before: no need to download it
        try:
            known = [m.get("name") for m in json.loads(pinned.read_text()).get("models", [])]
        except (OSError, ValueError, AttributeError):
            known = None
        if known is not None and name not in known:
            raise _not_found(
                name, f"The team remote {remote.shown} (sha256 {remote.sha256}) has no model {name!r}."
            )
    bundle, why_not = bundle_for(remote, name)
    if bundle is None:
        raise _not_found(name, why_not)
    installed = fetch(bundle, sha256=remote.sha256 or None)
    if name not in installed:
        raise _not_found(
            name, f"The team remote {remote.shown} has no model {name!r}; it holds: {', '.join(installed)}."
        )
    return _read_installed(model_cache_dir() / name, device)._with_source(remote.shown)


def _load_from_source(name: str, source, device) -> PretrainedIDM:
    text = str(source)
    if text.startswith(MLFLOW_SCHEMES):
        return _load_from_mlflow(name, text, device)
    if is_url(text):
        cached = model_cache_dir() / name
        if (_install_record(cached) or {}).get("source") == redact_url(text):
            # installed from this URL before: no network (fetch(url, force=True) refreshes)
            return _read_installed(cached, device)._with_source(redact_url(text))
        installed = fetch(text)
        return _load_installed(name, installed, redact_url(text), device)
    if "://" in text:
        raise DownloadError(
            f"source {redact_url(text)!r}: only http(s) URLs, MLflow models:/ URIs and local paths are "
            "supported"
        )
    path = _local_path(text)
    if path is None:
        raise ModelNotFoundError(
            f"source {text[:200]!r} is not a usable path (too long, NUL byte or unknown ~user)"
        )
    if path.is_file():
        installed = fetch(path)
        return _load_installed(name, installed, text, device)
    if path.is_dir():
        if (path / PARAMS_FILE).is_file():
            return read_model_dir(path, device)
        if (path / name / PARAMS_FILE).is_file():
            return read_model_dir(path / name, device)
        inside = sorted(p.parent.name for p in path.glob(f"*/{PARAMS_FILE}"))
        raise ModelNotFoundError(
            f"{path} is neither a model directory (no {PARAMS_FILE}) nor holds one named {name!r}"
            + (f"; it holds: {', '.join(inside)}" if inside else "")
        )
    raise ModelNotFoundError(f"source {text} does not exist")


def _load_installed(name: str, installed: list[str], source: str, device) -> PretrainedIDM:
    if name not in installed:
        near = difflib.get_close_matches(name, installed, n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise ModelNotFoundError(
            f"bundle {source} has no model {name!r}; it holds: {', '.join(installed)}.{hint}"
        )
    return read_model_dir(model_cache_dir() / name, device)._with_source(source)


def _load_from_mlflow(name: str, uri: str, device) -> PretrainedIDM:
    """Download the MLflow artifact into a temp dir, find the model directory in it, load it."""
    try:
        import mlflow.artifacts
    except ImportError:
        raise InvdynError(f"loading {uri} needs MLflow, which is not installed: pip install mlflow") from None
    with tempfile.TemporaryDirectory(prefix="invdyn-mlflow-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as e:  # noqa: BLE001 - MLflow raises many types (MlflowException, OSError, ...)
            raise ModelNotFoundError(f"MLflow could not download {uri}: {type(e).__name__}: {e}") from None
        return read_model_dir(_find_model_dir(local, name, uri), device)._with_source(uri, path=None)


def _find_model_dir(root: Path, name: str, where: str) -> Path:
    """The artifact may be the model directory itself or contain it (e.g. inside a pyfunc model)."""
    if (root / PARAMS_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.rglob(PARAMS_FILE) if any(p.parent.glob("*.ckpt")))
    if len(found) == 1:
        return found[0]
    named = [d for d in found if d.name == name]
    if len(named) == 1:
        return named[0]
    if not found:
        raise ModelNotFoundError(f"{where} holds no model directory ({PARAMS_FILE} + *.ckpt)")
    rel = ", ".join(str(d.relative_to(root)) for d in found)
    raise ModelNotFoundError(f"{where} holds several model directories ({rel}) and none is named {name!r}")


def fetch(url_or_path, *, force: bool = False, progress: bool = True, sha256: str | None = None) -> list[str]:
    """Install a bundle (http(s) URL or local .zip) into the cache; returns the names of its models.

    Downloads show progress and resume an interrupted `.part`; every checksum is verified before
    anything is installed; each model directory is swapped in whole. Models already installed with
    identical files are left alone unless `force`. With INVDYN_OFFLINE=1 a URL is refused. `sha256` pins
    the bundle file itself: any other bundle is refused (ChecksumError) before it is opened.
    """
    text = str(url_or_path)
    if not is_url(text):
        if "://" in text:
            raise DownloadError(
                f"cannot fetch {redact_url(text)!r}: only http(s) URLs and local .zip paths are supported"
            )
        path = _local_path(text)
        if path is None:
            raise BundleNotFoundError(
                f"bundle {text[:200]!r} is not a usable path (too long, NUL byte or unknown ~user)"
            )
        if not path.is_file():
            what = "is a directory, not a bundle .zip" if path.is_dir() else "does not exist"
            raise BundleNotFoundError(f"bundle {path} {what}")
        if sha256 and sha256_file(path) != sha256.lower():
            raise ChecksumError(
                f"bundle {path} has sha256 {sha256_file(path)}, not the pinned {sha256.lower()}; refusing it"
            )
        with storage_errors(model_cache_dir()):
            return _install(path, str(path.resolve()), force)
    if is_offline():
        raise DownloadError(
            f"INVDYN_OFFLINE=1: refusing to fetch {redact_url(text)}; unset it or fetch a local .zip path"
        )
    with storage_errors(invdyn_home()):
        return _fetch_url(text, force, progress, sha256)


def _fetch_url(text: str, force: bool, progress: bool, sha256: str | None = None) -> list[str]:
    downloads = invdyn_home() / "downloads"
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    base = Path(urllib.parse.urlsplit(text).path).name
    dest = downloads / f"{key}-{base if is_valid_name(base) else 'bundle.zip'}"
    with file_lock(downloads / f".{key}.lock"):  # one fetch of this URL at a time
        if force:
            dest.with_name(dest.name + ".part").unlink(missing_ok=True)
        download(text, dest, expected_sha256=sha256, desc=base or redact_url(text), progress=progress)
        try:
            return _install(dest, redact_url(text), force)  # the install record never holds a password
        finally:
            dest.unlink(missing_ok=True)


def _local_path(text: str) -> Path | None:
    """`text` as a local path, or None when the OS cannot even look it up (name too long, NUL, unknown
    ~user)."""
    try:
        path = Path(text).expanduser()
        path.exists()
    except (OSError, ValueError, RuntimeError):
        return None
    return path


def _install(zip_path: Path, source: str, force: bool) -> list[str]:
    models_dir = model_cache_dir()
    models_dir.mkdir(parents=True, exist_ok=True)
    with open_bundle(zip_path) as zf:
        manifest = verify_open(zf, zip_path)
        bundle_sha = sha256_file(zip_path)
        with file_lock(models_dir / ".lock"):
            for stale in models_dir.glob(".fetch-*"):  # only made under this lock: left by a killed fetch
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=models_dir))
            try:
                extract_verified(zf, zip_path, manifest, tmp)
                names = []
                for model in manifest["models"]:
                    name, src, target = model["name"], tmp / model["name"], models_dir / model["name"]
                    names.append(name)
                    if not force and _installed_files(target) == model["files"]:
                        continue  # same files already installed
                    try:
                        read_model_dir(src)  # never install a model that does not load
                    except InvdynError as e:
                        raise FormatError(f"{zip_path}: model {name!r} does not load: {e}") from None
                    record = {
                        "source": source,
                        "bundle_sha256": bundle_sha,
                        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "invdyn_version": __version__,
                        "files": model["files"],
                    }
                    (src / INSTALL_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
                    src.chmod(0o755)
                    replace_dir(src, target)
                with atomic_file(invdyn_home() / "bundles" / f"{bundle_sha}.json", "w") as f:
                    json.dump({**manifest, "source": source}, f, indent=2, sort_keys=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return names


def _read_installed(model_dir: Path, device) -> PretrainedIDM:
    """Verify and read an installed model; if a concurrent fetch swapped the directory mid-read, read the
    new one.

    Each install is one rename, but reading takes several opens: a swap in between shows up as a missing or
    mismatching file of a directory whose inode has changed. Then the new copy is read; a real fault repeats.
    """
    for _ in range(5):
        try:
            inode = model_dir.stat().st_ino
        except FileNotFoundError:
            raise _not_found(model_dir.name) from None
        try:
            _verify_installed(model_dir)
            return read_model_dir(model_dir, device)
        except (InvdynError, OSError):
            try:
                swapped = model_dir.stat().st_ino != inode
            except FileNotFoundError:
                swapped = True
            if not swapped:
                raise
    raise ChecksumError(
        f"{model_dir} keeps being replaced while it is read; try again when the fetch is done"
    )


def _install_record(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / INSTALL_RECORD).read_text())
    except (OSError, ValueError):
        return None


def _installed_files(model_dir: Path) -> dict | None:
    record = _install_record(model_dir)
    if not record:
        return None
    files = record.get("files") or {}
    for fname, meta in files.items():
        p = model_dir / fname
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            return None
    return files


def _verify_installed(model_dir: Path) -> None:
    """Check an installed model's files against the checksums it was installed with."""
    record = _install_record(model_dir)
    if not record:
        return  # placed there by hand (e.g. save_model_dir): read_model_dir checks the weights' sha256
    for fname, meta in (record.get("files") or {}).items():
        path = model_dir / fname
        actual = sha256_file(path) if path.is_file() else "missing"
        if actual != meta.get("sha256"):
            raise ChecksumError(
                f"{path}: sha256 {actual} does not match {meta.get('sha256')} recorded when it was "
                f"installed; reinstall with invdyn.fetch({record.get('source')!r}, force=True)"
            )


def list_models(*, include_cleandiffuser: bool = True) -> list[dict]:
    """Records for installed models (and CleanDiffuser's): name, location, path, source, metrics, dataset."""
    places = [("invdyn cache", model_cache_dir())]
    if include_cleandiffuser:
        places.append(("CleanDiffuser", cleandiffuser_dir("x").parent))
    records = []
    for location, root in places:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            rec = {"name": d.name, "location": location, "path": str(d), "source": location, "metrics": {}}
            rec["dataset"], rec["error"] = {}, None
            installed = _install_record(d) or {}
            if installed.get("source"):
                rec["source"] = installed["source"]
            try:
                params = read_params(d / PARAMS_FILE)
                rec["metrics"] = params.get("metrics") or {}
                rec["dataset"] = params.get("dataset") or {}
            except InvdynError as e:
                rec["error"] = str(e)
            records.append(rec)
    return records


def _not_found(name: str, note: str = "") -> ModelNotFoundError:
    available = sorted({r["name"] for r in list_models()})
    near = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
    msg = (
        f"no model named {name!r} in the invdyn cache ({model_cache_dir()}) "
        f"or CleanDiffuser's directory ({cleandiffuser_dir(name).parent})."
    )
    if near:
        msg += f" Did you mean: {', '.join(near)}?"
    msg += f" Available: {', '.join(available)}." if available else " No models are installed."
    tail = ""
    if not note and not remote_setting()[0]:
        tail = (
            " Or set INVDYN_REMOTE to a team's bundle URL or folder of bundles: load then installs from it."
        )
    base, jump = split_jump(name)
    if jump > 1:  # the dataset's hints, and the flag that trains its jumpy model
        hint = how_to_get(name, base).replace(" --export", f" --jumps 1,{jump} --export")
        hint = f"{name!r} is the jump-{jump} model of {base!r} (a_t = I(s_t, s_{{t+{jump}}})). {hint}"
        return ModelNotFoundError(f"{msg} {note + ' ' if note else ''}{hint}{tail}")
    return ModelNotFoundError(f"{msg} {note + ' ' if note else ''}{how_to_get(name)}{tail}")
