"""The team remote (`INVDYN_REMOTE` or `invdyn.configure`): which bundle to install a model from when it is
not in the cache, a bundle URL or .zip (optionally pinned by sha256) or a directory of bundles."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ._download import is_url, redact_url
from .bundle import bundle_models
from .errors import FormatError, InvdynError
from .settings import is_offline
from .settings import remote as remote_setting

_PIN = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Remote:
    """A parsed remote setting."""

    #: the bundle URL, bundle .zip or directory of bundles, without its `#sha256=` fragment
    location: str
    #: the sha256 the one bundle must have ('' = not pinned)
    sha256: str
    #: "url", "zip" or "directory"
    kind: str

    @property
    def shown(self) -> str:
        """The remote as it may be printed or recorded (no password, no token)."""
        return redact_url(self.location) if self.kind == "url" else self.location


def configured_remote() -> Remote | None:
    """The remote `load` installs from, or None when none is set; FormatError for a setting that names
    no usable place (so a typo is not a silent miss)."""
    text, pin = remote_setting()
    if not text:
        return None
    location, _, fragment = text.partition("#")
    if fragment:
        key, _, value = fragment.partition("=")
        if key.strip().lower() != "sha256" or (pin and value.strip().lower() != pin):
            raise FormatError(
                f"team remote {redact_url(text)!r}: the only fragment understood is #sha256=<64 hex digits> "
                "(and it must agree with configure(sha256=...))"
            )
        pin = value.strip().lower()
    if pin and not _PIN.match(pin):
        raise FormatError(f"team remote {redact_url(location)!r}: sha256 pin {pin!r} is not 64 hex digits")
    if is_url(location):
        return Remote(location, pin, "url")
    if "://" in location:
        raise FormatError(
            f"team remote {redact_url(location)!r}: only an http(s) URL, a bundle .zip or a directory of "
            "bundles"
        )
    path = Path(location).expanduser()
    if path.is_dir():
        if pin:
            raise FormatError(
                f"team remote {location}: a sha256 pin names one bundle, but this is a directory of bundles; "
                "point INVDYN_REMOTE at the bundle itself"
            )
        return Remote(str(path), "", "directory")
    if path.is_file():
        return Remote(str(path), pin, "zip")
    raise FormatError(
        f"team remote {location!r} (INVDYN_REMOTE) is neither a bundle URL, a .zip nor a directory"
    )


def bundle_for(remote: Remote, name: str) -> tuple[str | None, str]:
    """(the bundle to install for `name`, or None when the remote cannot give it; a sentence on why not)."""
    if remote.kind == "url" and is_offline():
        return None, f"INVDYN_OFFLINE=1 keeps invdyn from installing it from the team remote {remote.shown}."
    if remote.kind != "directory":
        return remote.location, ""
    holders, unreadable = [], []
    for zip_path in sorted(Path(remote.location).glob("*.zip")):
        try:
            if name in bundle_models(zip_path):
                holders.append(zip_path)
        except (InvdynError, OSError):
            unreadable.append(zip_path.name)
    if holders:  # the newest bundle that holds it: a team adds bundles, it rarely rewrites one
        return str(max(holders, key=lambda p: (p.stat().st_mtime, p.name))), ""
    skipped = f" ({len(unreadable)} unreadable: {', '.join(unreadable[:3])})" if unreadable else ""
    return None, f"No bundle in the team remote {remote.location} holds it{skipped}."
