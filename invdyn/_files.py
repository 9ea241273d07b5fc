"""File helpers shared by the model format, bundles, downloads and the pipeline: hashing, atomic writes,
the one JSON writer and inter-process locks."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePath

from .errors import InvdynError, StorageError

#: errno -> what a user is told when a write fails for a reason of the storage, not of the data
_STORAGE_ERRNOS = {
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


@contextlib.contextmanager
def storage_errors(path):
    """Turn a read-only / full / forbidden file system under `path` into a StorageError naming the path."""
    try:
        yield
    except InvdynError:
        raise
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        raise StorageError(
            f"cannot write {path}: {_STORAGE_ERRNOS[e.errno]}; free space there or choose a writable "
            "location (for invdyn's caches: set INVDYN_HOME)"
        ) from None


def check_writable(folder) -> None:
    """Raise StorageError naming `folder` unless a file can be created in it (it is made if missing): a
    command checks its output place before any long work, not when it saves the result."""
    folder = Path(folder)
    with storage_errors(folder):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        except OSError as e:
            if e.errno in _STORAGE_ERRNOS:
                raise
            what = "a file is in the way" if e.errno in (errno.EEXIST, errno.ENOTDIR) else e.strerror or e
            raise StorageError(f"cannot write in {folder}: {what}; choose another place") from None
        os.close(fd)
        os.unlink(probe)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path, obj) -> None:
    """THE JSON writer: atomic (temp file + rename), stable (sorted keys, indent 2, trailing newline) so the
    same content gives the same bytes and checksum; NaN / inf become null, Paths and numpy values plain."""
    text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    with atomic_file(path, "w") as f:
        f.write(text)


def json_safe(obj):
    """`obj` with what JSON cannot hold made plain: NaN / inf -> None, Path -> str, tuple -> list, numpy
    scalars and arrays -> Python numbers and lists. Anything else unknown raises TypeError (no silent str)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, PurePath):
        return str(obj)
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # np.float32, np.int64, np.ndarray
        return json_safe(obj.tolist())
    if obj is None or isinstance(obj, (str, int)):
        return obj
    raise TypeError(f"JSON cannot hold {type(obj).__name__} values: {obj!r:.80}")


@contextlib.contextmanager
def sigterm_raises():
    """While a temp file exists, make SIGTERM raise SystemExit(143) so the `except` below removes it.

    SIGTERM's default action kills the process at once, leaving temp files behind. Only the main thread can
    set handlers, and a handler someone else installed (Ray's, a CLI's) is left alone.
    """
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _hold_signals():
    """Defer SIGINT/SIGTERM (main thread) while a temp path is created and named.

    An interrupt landing between the temp file appearing on disk and the `try` that removes it on failure
    would leave it behind (seen under load). Until `_release_signals` (called inside that `try`) they are
    only recorded; then the previous handler runs, so KeyboardInterrupt / SystemExit raise inside the `try`.
    Python-level handlers, not a thread signal mask: another thread (torch's, Ray's) could take the signal.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    pending: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    return previous, pending


def _release_signals(held) -> None:
    if held is None:
        return
    import signal

    previous, pending = held
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if pending:
        handler = previous[pending[0]]
        if callable(handler):
            handler(pending[0], None)
        elif handler in (signal.SIG_DFL, None):
            signal.raise_signal(pending[0])


@contextlib.contextmanager
def atomic_dir(target):
    """Yield a temp directory beside `target`; on success it replaces `target` by rename, else it is removed.

    Readers never see a half-written directory: they see the old one or the new one. Safe when several
    processes replace the same `target` at once: the last rename wins and every copy is complete.
    """
    target = Path(target)
    with storage_errors(target), sigterm_raises():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, mask = None, _hold_signals()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            _release_signals(mask)
            mask = None
            yield tmp
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model directory is meant to be shared
            replace_dir(tmp, target)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            _release_signals(mask)
            raise


def replace_dir(src: Path, target: Path) -> None:
    """Rename `src` to `target`, moving an existing `target` aside first (retrying if another process
    races)."""
    for _ in range(100):
        try:
            os.replace(src, target)  # succeeds when target is absent (or an empty directory)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        try:
            os.replace(target, old / "x")
        except FileNotFoundError:
            pass  # another process moved it first; try again
        finally:
            shutil.rmtree(old, ignore_errors=True)
    raise OSError(f"could not replace {target}: it keeps being recreated by another process")


@contextlib.contextmanager
def atomic_file(target, mode: str = "wb"):
    """Yield a file object writing to a temp file beside `target`; renamed over `target` only on success."""
    target = Path(target)
    with storage_errors(target), sigterm_raises():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp, mask = None, _hold_signals()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
            _release_signals(mask)
            mask = None
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be read by others
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            _release_signals(mask)
            raise


def file_lock(lock_path):
    """Exclusive inter-process lock on `lock_path` (filelock: flock on POSIX, msvcrt on Windows).

    Used as `with file_lock(path):`. The lock file is left in place on POSIX: deleting it would let two
    processes lock different inodes.
    """
    from filelock import FileLock

    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path))
