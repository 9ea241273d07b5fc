"""Bundles: one reproducible zip of many model directories plus a manifest of their checksums, and its
verification (nothing in a bundle is trusted before every member's size and sha256 match)."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from . import __version__
from ._files import atomic_dir, atomic_file, sha256_file
from .errors import BundleNotFoundError, ChecksumError, FormatError
from .model_dir import PARAMS_FILE, read_model_dir
from .settings import is_valid_name

BUNDLE_FORMAT_VERSION = 1
#: The zip holds `manifest.json` and one model directory per model, `<name>/params.json`, `model.ckpt`,
#: `model.safetensors`, `README.md` (see model_dir.py). The manifest: {"format_version", "invdyn_version",
#: "models": [{"name", "files": {file: {"sha256", "size"}}, "metrics", "dataset", "architecture"}],
#: ...extra}. No member may land outside its directory: absolute paths, `..`, backslashes and symlinks are
#: refused.
MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: same inputs -> byte-identical zip
_CHUNK = 1 << 20
_SIZE_SLACK = 1 << 20  # how far past its recorded size a member is read (to name its checksum)
#: no model file is anywhere near this (a 512-wide IDM is ~2 MB): a larger size is a disk-filling bundle
MAX_MEMBER_BYTES = 4 << 30


def write_bundle(zip_path, model_dirs, *, extra_manifest: dict | None = None) -> Path:
    """Write the model directories into one zip at `zip_path` (atomically) and return its path.

    `model_dirs` is a list of directories (each named after its model) or a dict name -> directory.
    Each directory must load (weights checksum and shapes are checked) so no broken model is shipped.
    """
    if isinstance(model_dirs, dict):
        items = dict(model_dirs)
    else:
        dirs = [Path(d) for d in model_dirs]
        items = {d.name: d for d in dirs}
        if len(items) != len(dirs):
            raise FormatError("two model directories have the same name; a bundle holds each name once")
    if not items:
        raise FormatError("no model directories given: a bundle needs at least one model")
    extra = dict(extra_manifest or {})
    clash = {"format_version", "invdyn_version", "models"} & set(extra)
    if clash:
        raise FormatError(f"extra_manifest may not set reserved keys {sorted(clash)}")
    models, members = [], []
    for name in sorted(items):
        src = Path(items[name])
        if not is_valid_name(name):
            raise FormatError(
                f"{src}: model name {name!r} is not a plain name (letters, digits, '.', '_', '-')"
            )
        loaded = read_model_dir(src)  # refuses a directory that does not load
        files = {}
        for path in sorted(src.iterdir()):
            if path.name.startswith("."):
                continue  # install records and temp files are not part of the model
            if path.is_symlink() or not path.is_file():
                raise FormatError(
                    f"{path}: a model directory may hold only regular files (no links or folders)"
                )
            files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            members.append((f"{name}/{path.name}", path))
        params = loaded.params
        models.append(
            {
                "name": name,
                "files": files,
                "metrics": params.get("metrics") or {},
                "dataset": params.get("dataset") or {},
                "architecture": params.get("architecture") or {"name": "fancy_mlp"},
            }
        )
    manifest = {
        **extra,
        "format_version": BUNDLE_FORMAT_VERSION,
        "invdyn_version": __version__,
        "models": models,
    }
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    zip_path = Path(zip_path)
    with atomic_file(zip_path) as f, zipfile.ZipFile(f, "w") as zf:
        zf.writestr(_zipinfo(MANIFEST), manifest_bytes)
        for arcname, path in members:
            with open(path, "rb") as src, zf.open(_zipinfo(arcname), "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return zip_path


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.create_system = 3  # unix, whatever OS writes it
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def bundle_models(zip_path) -> list[str]:
    """The model names a bundle's manifest lists (its checksums are checked when it is installed)."""
    with open_bundle(zip_path) as zf:
        if MANIFEST not in zf.namelist():
            raise FormatError(f"{zip_path}: no {MANIFEST}; this is not an invdyn bundle")
        return [model["name"] for model in _read_manifest(zf, Path(zip_path))["models"]]


def verify_bundle(zip_path) -> dict:
    """Check a bundle completely (layout, every size and sha256) and return its manifest."""
    with open_bundle(zip_path) as zf:
        return verify_open(zf, Path(zip_path))


def extract_bundle(zip_path, target_dir) -> dict:
    """Verify, then extract to `target_dir/<name>/...` (plus manifest.json) atomically; returns the
    manifest."""
    zip_path = Path(zip_path)
    with open_bundle(zip_path) as zf:
        manifest = verify_open(zf, zip_path)
        with atomic_dir(target_dir) as tmp:
            extract_verified(zf, zip_path, manifest, tmp)
            (tmp / MANIFEST).write_bytes(zf.read(MANIFEST))
    return manifest


def extract_verified(zf: zipfile.ZipFile, zip_path: Path, manifest: dict, into: Path) -> list[Path]:
    """Write each model's files to `into/<name>/` (checksums checked again while writing); returns the
    dirs."""
    dirs = []
    for model in manifest["models"]:
        out = Path(into) / model["name"]
        out.mkdir(mode=0o755)
        for fname, meta in sorted(model["files"].items()):
            member = f"{model['name']}/{fname}"
            with open(out / fname, "wb") as dst:
                _copy_member(zf, zip_path, member, meta, dst)
        dirs.append(out)
    return dirs


def open_bundle(zip_path) -> zipfile.ZipFile:
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        what = "is a directory, not a bundle .zip" if zip_path.is_dir() else "does not exist"
        raise BundleNotFoundError(f"bundle {zip_path} {what}")
    try:
        return zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise FormatError(
            f"{zip_path} is not a readable zip bundle ({e}); it may be truncated or corrupt: download it "
            "again"
        ) from None


def verify_open(zf: zipfile.ZipFile, zip_path: Path) -> dict:
    infos = zf.infolist()
    seen = set()
    for info in infos:
        _check_member(info, zip_path)
        if info.filename in seen:
            raise FormatError(
                f"{zip_path}: member {info.filename!r} appears twice; refusing an ambiguous bundle"
            )
        seen.add(info.filename)
    if MANIFEST not in seen:
        raise FormatError(f"{zip_path}: no {MANIFEST}; this is not an invdyn bundle")
    manifest = _read_manifest(zf, zip_path)
    expected = {MANIFEST: None}
    for model in manifest["models"]:
        for fname, meta in model["files"].items():
            expected[f"{model['name']}/{fname}"] = meta
    extra = sorted(seen - set(expected))
    if extra:
        raise FormatError(f"{zip_path}: members not listed in {MANIFEST}: {extra[:5]}; refusing the bundle")
    missing = sorted(set(expected) - seen)
    if missing:
        raise ChecksumError(
            f"{zip_path}: files listed in {MANIFEST} are missing (truncated bundle?): {missing[:5]}"
        )
    for member, meta in sorted(expected.items()):
        if meta is not None:
            _copy_member(zf, zip_path, member, meta, None)
    return manifest


def _check_member(info: zipfile.ZipInfo, zip_path: Path) -> None:
    """Refuse any member that could land outside its directory or is not a plain file."""
    name = info.filename
    path = PurePosixPath(name)
    bad = (
        not name
        or "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or path.is_absolute()
        or ":" in name.split("/")[0]  # "C:..." (a drive on Windows)
        or any(part in ("..", ".", "") for part in name.split("/"))
    )
    if bad:
        raise FormatError(
            f"{zip_path}: unsafe member path {name!r} (absolute, '..' or backslash); refusing the bundle"
        )
    mode = info.external_attr >> 16
    if info.create_system == 3 and mode and not stat.S_ISREG(mode):
        kind = "symlink" if stat.S_ISLNK(mode) else "non-regular file"
        raise FormatError(f"{zip_path}: member {name!r} is a {kind}; bundles may hold only regular files")
    if info.is_dir():
        raise FormatError(f"{zip_path}: unexpected directory member {name!r}")


def _read_manifest(zf: zipfile.ZipFile, zip_path: Path) -> dict:
    info = zf.getinfo(MANIFEST)
    if info.file_size > 16 << 20:
        raise FormatError(f"{zip_path}: {MANIFEST} is implausibly large ({info.file_size} bytes)")
    try:
        manifest = json.loads(zf.read(MANIFEST))
    except (
        zipfile.BadZipFile,
        zlib.error,
        ValueError,  # bad JSON
        RecursionError,
        OSError,
        EOFError,
        NotImplementedError,  # a flipped compression method or flag bit
        RuntimeError,  # a flipped "encrypted" bit: zipfile asks for a password
    ) as e:
        raise FormatError(f"{zip_path}: {MANIFEST} is not readable JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{zip_path}: {MANIFEST} must be a JSON object")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        written = manifest.get("invdyn_version", "an unknown version")
        raise FormatError(
            f"{zip_path}: bundle format_version {version!r} (written by invdyn {written}) is not supported "
            f"by invdyn {__version__}, which reads format_version {BUNDLE_FORMAT_VERSION}; upgrade invdyn "
            "(pip install -U invdyn)"
        )
    models = manifest.get("models")
    if not isinstance(models, list) or not models:
        raise FormatError(f"{zip_path}: {MANIFEST} key 'models' must be a non-empty list")
    names = set()
    for i, model in enumerate(models):
        where = f"{zip_path}: {MANIFEST} models[{i}]"
        if not isinstance(model, dict) or not is_valid_name(model.get("name")):
            raise FormatError(f"{where}: 'name' must be a plain model name")
        if model["name"] in names:
            raise FormatError(f"{where}: model {model['name']!r} is listed twice")
        names.add(model["name"])
        files = model.get("files")
        if not isinstance(files, dict) or PARAMS_FILE not in files:
            raise FormatError(f"{where}: 'files' must map file names to checksums and include {PARAMS_FILE}")
        for fname, meta in files.items():
            ok_meta = (
                isinstance(meta, dict)
                and isinstance(meta.get("sha256"), str)
                and len(meta["sha256"]) == 64
                and isinstance(meta.get("size"), int)
                and not isinstance(meta["size"], bool)
                and 0 <= meta["size"] <= MAX_MEMBER_BYTES
            )
            if not is_valid_name(fname) or not ok_meta:
                raise FormatError(
                    f"{where}: bad entry for file {fname!r} (need a plain name, sha256 and a size of at most "
                    f"{MAX_MEMBER_BYTES} bytes)"
                )
    return manifest


def _copy_member(zf: zipfile.ZipFile, zip_path: Path, member: str, meta: dict, dst) -> None:
    """Stream one member, checking its size and sha256; write it to `dst` if given.

    A member much larger than the manifest says is not read to the end (decompression-bomb guard).
    """
    info = zf.getinfo(member)
    limit = meta["size"] + _SIZE_SLACK
    if info.file_size > limit:
        raise ChecksumError(
            f"{zip_path}: {member} is {info.file_size} bytes but {MANIFEST} records {meta['size']} "
            f"(sha256 {meta['sha256']}): the bundle is corrupt or was tampered with"
        )
    h, size, write_error = hashlib.sha256(), 0, None
    try:
        with zf.open(info) as src:
            while block := src.read(_CHUNK):
                size += len(block)
                if size > limit:
                    break
                h.update(block)
                if dst is not None:
                    try:
                        dst.write(block)
                    except OSError as e:  # the target's fault (full, read-only), not the bundle's
                        write_error = e
                        break
    # NotImplementedError / RuntimeError: a flipped compression method, flag bit or "encrypted" bit
    except (
        zipfile.BadZipFile,
        zlib.error,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
    ) as e:
        raise ChecksumError(
            f"{zip_path}: {member} is corrupt ({e}); expected sha256 {meta['sha256']}; download the bundle "
            "again"
        ) from None
    if write_error is not None:
        raise write_error
    actual = h.hexdigest()
    if size != meta["size"] or actual != meta["sha256"]:
        raise ChecksumError(
            f"{zip_path}: {member} has sha256 {actual} ({size} bytes) but {MANIFEST} records "
            f"{meta['sha256']} ({meta['size']} bytes): the bundle is corrupt or was tampered with"
        )
