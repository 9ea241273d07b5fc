"""Hostile bundles (crafted manifests, member names, flipped bytes, truncations, bombs, links, odd sources):
each ends in an invdyn error or an install matching the manifest, with nothing written outside the cache."""

import copy
import io
import json
import re
import stat
import zipfile
import zlib
from pathlib import Path

import pytest
from helpers.models import make_bundle, rewrite_zip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import invdyn
from invdyn._files import sha256_file
from invdyn.errors import ChecksumError, DownloadError, FormatError, InvdynError
from invdyn.settings import invdyn_home, model_cache_dir

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def good_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle"), names=("a-v0",))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working directory; after the test only the invdyn home may have gained files."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _files_outside_cache(sandbox: Path, *allowed: Path) -> list[str]:
    """Files written anywhere under the sandbox or the env root that are not in the invdyn home / allowed."""
    home = invdyn_home()
    roots = [sandbox, home.parent]
    out = []
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_relative_to(home) and not any(p.is_relative_to(a) for a in allowed):
                out.append(str(p))
    return out


def _manifest(zip_path) -> dict:
    with zipfile.ZipFile(zip_path) as zf:
        return json.loads(zf.read("manifest.json"))


def _install_or_invdyn_error(zip_path):
    """verify + fetch: both refuse, or both accept and the installed files match the manifest."""
    try:
        manifest = invdyn.verify_bundle(zip_path)
    except InvdynError as e:
        assert str(zip_path) in str(e), f"error does not name the bundle: {e}"
        with pytest.raises(InvdynError):
            invdyn.fetch(zip_path, progress=False)
        return None
    names = invdyn.fetch(zip_path, progress=False, force=True)
    for model in manifest["models"]:
        assert model["name"] in names
        for fname, meta in model["files"].items():
            assert sha256_file(model_cache_dir() / model["name"] / fname) == meta["sha256"]
    return manifest


def _set(obj, path, value, delete):
    cur = obj
    for key in path[:-1]:
        cur = cur[key]
    if delete:
        cur.pop(path[-1], None) if isinstance(cur, dict) else None
    else:
        cur[path[-1]] = value
    return obj


MANIFEST_FIELDS = [
    ("format_version",),
    ("models",),
    ("models", 0),
    ("models", 0, "name"),
    ("models", 0, "files"),
    ("models", 0, "files", "params.json"),
    ("models", 0, "files", "model.ckpt", "size"),
    ("models", 0, "files", "model.ckpt", "sha256"),
    ("models", 0, "metrics"),
    ("invdyn_version",),
]


@SETTINGS
@given(field=st.sampled_from(MANIFEST_FIELDS), value=json_values, delete=st.booleans())
def test_manifest_with_any_field_replaced(good_bundle, tmp_path, sandbox, hostile_case, field, value, delete):
    hostile_case("bundle manifest field")
    manifest = _set(copy.deepcopy(_manifest(good_bundle)), field, value, delete)
    out = rewrite_zip(
        good_bundle, tmp_path / "m.zip", replace={"manifest.json": json.dumps(manifest).encode()}
    )
    _install_or_invdyn_error(out)
    assert _files_outside_cache(sandbox, tmp_path / "m.zip") == []


@SETTINGS
@given(data=st.binary(max_size=400))
def test_manifest_arbitrary_bytes(good_bundle, tmp_path, sandbox, hostile_case, data):
    hostile_case("bundle manifest bytes")
    out = rewrite_zip(good_bundle, tmp_path / "m.zip", replace={"manifest.json": data})
    with pytest.raises(InvdynError):
        invdyn.verify_bundle(out)


member_names = st.text(alphabet="ab./\\:\x00 -_C~", min_size=0, max_size=24) | st.sampled_from(
    [
        "../evil",
        "../../evil",
        "/etc/evil",
        "a-v0/../../evil",
        "a-v0/./params.json",
        "C:\\evil",
        "C:evil",
        "a-v0\\..\\..\\evil",
        "a-v0//params.json",
        "~/evil",
        "a-v0/",
        ".",
        "..",
        "a-v0/sub/evil",
    ]
)


@SETTINGS
@given(name=member_names, listed=st.booleans())
def test_member_names_never_escape(good_bundle, tmp_path, sandbox, hostile_case, name, listed):
    """An extra member with any name (also listed in the manifest): refused unless it is a plain file name."""
    hostile_case("bundle member name")
    manifest = _manifest(good_bundle)
    data = b"evil"
    if listed and "/" in name:
        model, _, fname = name.partition("/")
        entry = {
            "name": model,
            "files": {fname: {"sha256": __import__("hashlib").sha256(data).hexdigest(), "size": 4}},
        }
        manifest["models"].append(entry)
    info = zipfile.ZipInfo(name or "x", date_time=(1980, 1, 1, 0, 0, 0))
    info.filename = name  # zipfile would normalise some names: keep the raw one
    try:
        out = rewrite_zip(
            good_bundle,
            tmp_path / "m.zip",
            replace={"manifest.json": json.dumps(manifest).encode()},
            add=[(info, data)],
        )
    except (ValueError, UnicodeEncodeError):
        return  # zipfile itself cannot write this name, so no bundle can hold it
    with pytest.raises(InvdynError):
        invdyn.verify_bundle(out)
    with pytest.raises(InvdynError):
        invdyn.fetch(out, progress=False)
    assert _files_outside_cache(sandbox, tmp_path / "m.zip") == []
    assert not list(tmp_path.parent.rglob("evil"))


@SETTINGS
@given(pos=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_flipped_byte(good_bundle, tmp_path, sandbox, hostile_case, pos, xor):
    """One byte flipped anywhere: refused, or (a byte zip never checks, e.g. a timestamp) installed intact."""
    hostile_case("bundle flipped byte")
    data = bytearray(good_bundle.read_bytes())
    data[int(pos * len(data))] ^= xor
    out = tmp_path / "flipped.zip"
    out.write_bytes(bytes(data))
    _install_or_invdyn_error(out)
    assert _files_outside_cache(sandbox, out) == []


@pytest.mark.parametrize(
    "header, offset, value",
    [
        (b"PK\x01\x02", 8, 0x01),  # central directory: "encrypted" (zipfile wants a password)
        (b"PK\x01\x02", 8, 0x20),  # central directory: "compressed patched data"
        (b"PK\x01\x02", 8, 0x40),  # central directory: "strong encryption"
        (b"PK\x01\x02", 10, 99),  # central directory: a compression method zipfile does not know
    ],
    ids=["encrypted", "patched", "strong-encryption", "unknown-method"],
)
@pytest.mark.parametrize("member", [0, -1], ids=["first-member", "last-member"])
def test_flag_and_method_bits_zipfile_refuses(
    good_bundle, tmp_path, sandbox, hostile_case, header, offset, value, member
):
    """Bits that make zipfile raise NotImplementedError / RuntimeError end in an invdyn error too."""
    hostile_case("bundle flag bits")
    data = bytearray(good_bundle.read_bytes())
    starts = [m.start() for m in re.finditer(re.escape(header), data)]
    data[starts[member] + offset] = value
    out = tmp_path / "flags.zip"
    out.write_bytes(bytes(data))
    with pytest.raises((FormatError, ChecksumError), match=re.escape(str(out))):
        invdyn.verify_bundle(out)
    with pytest.raises((FormatError, ChecksumError)):
        invdyn.fetch(out, progress=False)
    assert _files_outside_cache(sandbox, out) == []


@SETTINGS
@given(frac=st.floats(0, 1, exclude_max=True))
def test_any_truncation(good_bundle, tmp_path, hostile_case, frac):
    hostile_case("bundle truncated")
    data = good_bundle.read_bytes()
    out = tmp_path / "cut.zip"
    out.write_bytes(data[: int(frac * len(data))])
    with pytest.raises((FormatError, ChecksumError)):
        invdyn.verify_bundle(out)
    with pytest.raises((FormatError, ChecksumError)):
        invdyn.fetch(out, progress=False)
    assert not model_cache_dir().exists() or not any(model_cache_dir().glob("a-v0/*"))


def _bomb_zip(good_bundle, tmp_path, *, lie_in_header: bool, recorded: int | None = None):
    """a-v0/README.md replaced by 200 MB of zeros (~200 KB deflated); the manifest keeps its small size."""
    big = 200 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = b"".join(comp.compress(b"\0" * (1 << 20)) for _ in range(big >> 20)) + comp.flush()
    manifest = _manifest(good_bundle)
    if recorded is not None:
        manifest["models"][0]["files"]["README.md"]["size"] = recorded
    out = tmp_path / "bomb.zip"
    with zipfile.ZipFile(good_bundle) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            if info.filename == "a-v0/README.md":
                continue
            data = json.dumps(manifest).encode() if info.filename == "manifest.json" else zin.read(info)
            zout.writestr(info, data)
    # append the bomb member by hand: deflated stream, sizes in the headers as we choose
    declared = 1000 if lie_in_header else big
    name = b"a-v0/README.md"
    raw = out.read_bytes()
    eocd = raw.rfind(b"PK\x05\x06")
    cd_off = int.from_bytes(raw[eocd + 16 : eocd + 20], "little")
    cd_len = int.from_bytes(raw[eocd + 12 : eocd + 16], "little")
    n_entries = int.from_bytes(raw[eocd + 10 : eocd + 12], "little")
    local_off = cd_off
    crc = zlib.crc32(b"\0" * 1000) if lie_in_header else 0  # any value: the check must not need it
    sizes = crc.to_bytes(4, "little") + len(body).to_bytes(4, "little") + declared.to_bytes(4, "little")
    local = b"PK\x03\x04" + b"\x14\x00\x00\x00\x08\x00\x00\x00\x21\x00" + sizes
    local += len(name).to_bytes(2, "little") + b"\x00\x00" + name + body
    central = b"PK\x01\x02" + b"\x14\x03\x14\x00\x00\x00\x08\x00\x00\x00\x21\x00" + sizes
    central += (
        len(name).to_bytes(2, "little")
        + b"\x00\x00" * 4
        + ((stat.S_IFREG | 0o644) << 16).to_bytes(4, "little")
    )
    central += local_off.to_bytes(4, "little") + name
    cd = raw[cd_off : cd_off + cd_len] + central
    new_eocd = (
        raw[eocd : eocd + 8] + (n_entries + 1).to_bytes(2, "little") * 2 + len(cd).to_bytes(4, "little")
    )
    new_eocd += (local_off + len(local)).to_bytes(4, "little") + raw[eocd + 20 : eocd + 22]
    out.write_bytes(raw[:cd_off] + local + cd + new_eocd)
    return out


@pytest.mark.parametrize("lie", [False, True], ids=["honest-header", "lying-header"])
def test_decompression_bomb_is_not_inflated(good_bundle, tmp_path, sandbox, hostile_case, lie):
    hostile_case("bundle explicit")
    out = _bomb_zip(good_bundle, tmp_path, lie_in_header=lie)
    with pytest.raises(ChecksumError, match="README.md"):
        invdyn.verify_bundle(out)
    with pytest.raises(ChecksumError):
        invdyn.fetch(out, progress=False)
    written = sum(p.stat().st_size for p in invdyn_home().rglob("*") if p.is_file())
    assert written < 1 << 20, "the bomb was inflated to disk"


def test_absurd_recorded_size_is_refused_before_reading(good_bundle, tmp_path, hostile_case):
    hostile_case("bundle explicit")
    out = _bomb_zip(good_bundle, tmp_path, lie_in_header=False, recorded=1 << 50)
    with pytest.raises(FormatError, match="README.md"):
        invdyn.verify_bundle(out)


@pytest.mark.parametrize(
    "mode", [stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o644, stat.S_IFCHR]
)
def test_special_file_members_are_refused(good_bundle, tmp_path, sandbox, hostile_case, mode):
    """A member flagged as symlink / directory / fifo / device (pointing at /etc/passwd) is never created."""
    hostile_case("bundle explicit")
    with zipfile.ZipFile(good_bundle) as zf:
        info = zf.getinfo("a-v0/README.md")
    link = copy.copy(info)
    link.external_attr = mode << 16
    link.create_system = 3
    out = rewrite_zip(good_bundle, tmp_path / "l.zip", drop=("a-v0/README.md",), add=[(link, b"/etc/passwd")])
    with pytest.raises(FormatError, match="README.md"):
        invdyn.verify_bundle(out)
    with pytest.raises(FormatError):
        invdyn.fetch(out, progress=False)
    assert not any(p.is_symlink() for p in invdyn_home().rglob("*"))


def test_duplicate_member_that_shadows_a_checked_one(good_bundle, tmp_path, hostile_case):
    """Two members with one name (a checked copy and an evil copy): refused, whichever zip readers pick."""
    hostile_case("bundle explicit")
    with zipfile.ZipFile(good_bundle) as zf:
        info = zf.getinfo("a-v0/model.ckpt")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the point
        out = rewrite_zip(good_bundle, tmp_path / "dup.zip", add=[(copy.copy(info), b"evil")])
    with pytest.raises(FormatError, match="twice"):
        invdyn.verify_bundle(out)


def test_many_tiny_members_are_refused_quickly(good_bundle, tmp_path, hostile_case):
    hostile_case("bundle explicit")
    buf = io.BytesIO()
    with zipfile.ZipFile(good_bundle) as zin, zipfile.ZipFile(buf, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info))
        for i in range(20_000):
            zout.writestr(f"a-v0/junk{i}", b"")
    out = tmp_path / "many.zip"
    out.write_bytes(buf.getvalue())
    with pytest.raises(FormatError, match="junk"):
        invdyn.verify_bundle(out)


SOURCES = [
    "ftp://example.invalid/b.zip",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "data:application/zip;base64,UEsFBg==",
    "gopher://x/b.zip",
    "jar:file:///x.zip!/",
    "http://[::1",
    "https://",
    "http:///x",
    "//host/share/b.zip",
    "../../../etc/passwd",
    "/etc/passwd",
    "/",
    "",
    "~nobody/b.zip",
    "~no_such_user_x/b.zip",
    "\x00",
    "a" * 5000,
    "http://user:pw@127.0.0.1:9/",
]


@pytest.mark.parametrize("source", SOURCES, ids=range(len(SOURCES)))
def test_odd_fetch_and_load_sources(sandbox, hostile_case, monkeypatch, source):
    """Odd schemes and paths given to fetch / load(source=...) / the CLI: an invdyn error, nothing written."""
    hostile_case("bundle source", 3)
    monkeypatch.setenv("INVDYN_OFFLINE", "1") if source.startswith("http") else None
    with pytest.raises(InvdynError) as err:
        invdyn.fetch(source, progress=False)
    assert "pw" not in str(err.value)
    with pytest.raises(InvdynError) as err:
        invdyn.load("a-v0", source=source)
    assert "pw" not in str(err.value)
    from invdyn.__main__ import main

    assert main(["fetch", source, "--quiet"]) == 1
    assert _files_outside_cache(sandbox) == []
    assert not model_cache_dir().exists() or not any(model_cache_dir().iterdir())


@SETTINGS
@given(
    source=st.text(max_size=40)
    | st.builds(
        lambda s, r: f"{s}:{r}", st.from_regex(r"[a-z][a-z0-9+.-]{0,8}", fullmatch=True), st.text(max_size=20)
    )
)
def test_any_source_string(sandbox, hostile_case, source):
    """Any string as a bundle source: installed only if it names a real bundle file, else an invdyn error."""
    hostile_case("bundle source fuzz")
    try:
        invdyn.fetch(source, progress=False)
    except InvdynError:
        pass
    else:  # pragma: no cover - no bundle exists in the sandbox
        pytest.fail(f"fetch({source!r}) installed something")
    assert _files_outside_cache(sandbox) == []


def test_offline_url_source_is_refused_without_network(hostile_case, monkeypatch):
    hostile_case("bundle explicit")
    monkeypatch.setenv("INVDYN_OFFLINE", "1")
    with pytest.raises(DownloadError, match="INVDYN_OFFLINE"):
        invdyn.fetch("https://example.invalid/b.zip", progress=False)
