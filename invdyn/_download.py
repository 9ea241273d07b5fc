"""One resumable, verified HTTP download (urllib only), shared by bundle fetches and D4RL files: `dest`
appears only once complete and checked; a cut transfer stays as `<dest>.part` for the next call to resume."""

from __future__ import annotations

import base64
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ._files import file_lock, sha256_file, storage_errors
from .errors import ChecksumError, DownloadError
from .settings import is_offline

CHUNK = 1 << 16
#: attempts per call: a transfer cut mid-way is resumed this many times before giving up
ATTEMPTS = 3


def is_url(s) -> bool:
    try:
        return isinstance(s, str) and urllib.parse.urlsplit(s).scheme.lower() in {"http", "https"}
    except ValueError:  # e.g. "http://[::1" (unclosed IPv6 bracket)
        return False


#: query keys whose values are secrets (presigned URLs, API tokens): never printed or recorded
_SECRET_KEY = re.compile(r"token|sig|secret|passw|key|credential|auth", re.I)


def redact_url(url) -> str:
    """`url` safe to print, log or record: `user:password@` becomes `***@`, secret-looking query values
    `***`."""
    try:
        parts = urllib.parse.urlsplit(str(url))
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc
    if "@" not in netloc and not _SECRET_KEY.search(parts.query):
        return str(url)  # nothing to mask: unchanged (urlunsplit would rewrite e.g. sqlite:////abs/path)
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_KEY.search(k) for k, _ in pairs):
        query = "&".join(f"{k}=***" if _SECRET_KEY.search(k) else f"{k}={v}" for k, v in pairs)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def _split_credentials(url: str) -> tuple[str, str | None]:
    """(url without `user:password@`, Basic Authorization header value or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), "Basic " + base64.b64encode(token).decode()


def download(
    url: str,
    dest,
    *,
    expected_sha256: str | None = None,
    desc: str | None = None,
    progress: bool = True,
    timeout: float = 60,
) -> Path:
    """Download `url` to `dest` and return `dest`.

    Resumes `<dest>.part` left by an interrupted call; a server that ignores Range (answers 200)
    restarts from byte 0. Raises `DownloadError` (names the URL) for a refused scheme, offline mode,
    HTTP / connection errors and a transfer still short after retries (the `.part` is kept, so a later
    call resumes), and `ChecksumError` when the finished file's sha256 differs (the `.part` is deleted).
    If `dest` already exists with the expected sha256, nothing is downloaded.
    """
    shown = redact_url(url)
    if not is_url(url):
        raise DownloadError(f"cannot download {shown!r}: only http:// and https:// URLs are supported")
    dest = Path(dest)
    expected = expected_sha256.lower() if expected_sha256 else None
    if expected and dest.is_file() and sha256_file(dest) == expected:
        return dest
    if is_offline():
        raise DownloadError(
            f"INVDYN_OFFLINE=1: refusing to download {shown}; unset it or put the file at {dest}"
        )
    with storage_errors(dest):
        return _download_locked(url, dest, expected, desc, progress, timeout, shown)


def _download_locked(url, dest: Path, expected, desc, progress, timeout, shown) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if expected and dest.is_file() and sha256_file(dest) == expected:
            return dest  # another process finished it while we waited for the lock
        for attempt in range(1, ATTEMPTS + 1):
            before = part.stat().st_size if part.exists() else 0
            done = _transfer(url, part, desc or dest.name, progress, timeout)
            if done:
                break
            gained = (part.stat().st_size if part.exists() else 0) - before
            if attempt == ATTEMPTS or gained <= 0:
                raise DownloadError(
                    f"download of {shown} was cut short ({part.stat().st_size} bytes so far, kept in "
                    f"{part}); run again to resume"
                )
        if expected:
            actual = sha256_file(part)
            if actual != expected:
                part.unlink()
                raise ChecksumError(
                    f"{shown}: downloaded file has sha256 {actual} but {expected} was expected; the file was "
                    "deleted, try again (if it repeats, the server's file is not the expected one)"
                )
        os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, desc: str, progress: bool, timeout: float) -> bool:
    """One HTTP request appending to `part`; True when the whole file is there."""
    offset = part.stat().st_size if part.exists() else 0
    shown = redact_url(url)
    plain, auth = _split_credentials(url)
    req = urllib.request.Request(
        plain, headers={"User-Agent": "invdyn-downloader", "Accept-Encoding": "identity"}
    )
    if auth:  # a header, not the URL (servers log URLs); unredirected: never sent on to another host
        req.add_unredirected_header("Authorization", auth)
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = _opener().open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            total = _content_range_total(e.headers.get("Content-Range"))
            if total == offset:
                return True  # the .part is already complete
            part.unlink()  # the .part is longer than the file: start over
            return _transfer(url, part, desc, progress, timeout)
        raise DownloadError(f"cannot download {shown}: HTTP {e.code} {e.reason}") from None
    except DownloadError:
        raise
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {shown}: {reason}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(
                    f"cannot resume {shown}: asked for byte {offset}, server sent from {start}"
                )
            mode, total = "ab", (offset + length if length is not None else None)
        else:  # 200: the server ignored Range (or there was nothing to resume): start from byte 0
            mode, total, offset = "wb", length, 0
        bar = _Progress(desc, total, offset, progress)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, ValueError) as e:  # connection reset / IncompleteRead mid-transfer
                        bar.note(f"connection lost ({type(e).__name__})")
                        break
                    if not block:
                        break
                    f.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    size = part.stat().st_size
    if total is None:
        return True  # no Content-Length: the server closing the stream is the only end we can see
    if size > total:
        part.unlink()
        raise DownloadError(f"{shown}: received {size} bytes but the server announced {total}; try again")
    return size == total


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) (urllib would also follow one to ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in {"http", "https"}:
            raise DownloadError(
                f"{redact_url(req.full_url)} redirects to {redact_url(newurl)!r}; only http(s) redirects are "
                "followed"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(_HttpOnlyRedirects())


def _content_range_start(header) -> int | None:
    m = re.match(r"\s*bytes\s+(\d+)-", header or "")
    return int(m.group(1)) if m else None


def _content_range_total(header) -> int | None:
    m = re.search(r"/(\d+)\s*$", header or "")
    return int(m.group(1)) if m else None


def _terminal_tqdm():
    """tqdm's bar class when stderr is a terminal and tqdm is installed, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


class _Progress:
    """A tqdm bar on a terminal when tqdm is installed (imported lazily), else one line on stderr at start
    and end (a log that is not a terminal gets no carriage-return frames)."""

    def __init__(self, desc: str, total: int | None, initial: int, enabled: bool):
        self.desc, self.total, self.done, self.enabled = desc, total, initial, enabled
        self.t0, self.bar = time.monotonic(), None
        if not enabled:
            return
        tqdm = _terminal_tqdm()
        if tqdm is None:
            size = f"{total / 1e6:.1f} MB" if total else "unknown size"
            resume = f", resuming at {initial / 1e6:.1f} MB" if initial else ""
            print(f"downloading {desc} ({size}{resume}) ...", file=sys.stderr, flush=True)
            return
        self.bar = tqdm(
            total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True
        )

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def note(self, msg: str) -> None:
        if self.enabled:
            print(f"{self.desc}: {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            secs = time.monotonic() - self.t0
            print(f"{self.desc}: {self.done / 1e6:.1f} MB in {secs:.1f} s", file=sys.stderr, flush=True)
