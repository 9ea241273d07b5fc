"""Bundles: reproducible zips whose every member is verified; hostile or damaged zips are refused."""

import hashlib
import json
import os
import stat
import warnings
import zipfile

import pytest
from helpers.models import make_bundle, make_model_dir, rewrite_zip

import invdyn
from invdyn.bundle import BUNDLE_FORMAT_VERSION


def _info(name, mode=stat.S_IFREG | 0o644):
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def test_bundle_is_reproducible_and_describes_its_models(tmp_path):
    a = make_model_dir(tmp_path / "x" / "a-v0", seed=0)
    b = make_model_dir(tmp_path / "x" / "b-v0", seed=1)
    one = invdyn.write_bundle(tmp_path / "one.zip", [a, b])
    for p in (a / "params.json", b / "model.ckpt"):
        os.utime(p, (1_000_000_000, 1_000_000_000))  # mtimes must not leak into the zip
    two = invdyn.write_bundle(tmp_path / "two.zip", [b, a])
    assert one.read_bytes() == two.read_bytes()
    manifest = invdyn.verify_bundle(one)
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION
    assert manifest["invdyn_version"] == invdyn.__version__
    assert [m["name"] for m in manifest["models"]] == ["a-v0", "b-v0"]
    files = manifest["models"][1]["files"]
    assert sorted(files) == ["README.md", "model.ckpt", "model.safetensors", "params.json"]
    for weights in ("model.ckpt", "model.safetensors"):  # both weight files travel, each with its checksum
        data = (b / weights).read_bytes()
        assert files[weights] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["models"][1]["metrics"] == {"heldout_mse": 1.01, "baseline_mse": 1.02}
    with zipfile.ZipFile(one) as zf:
        names = zf.namelist()
    assert names[0] == "manifest.json" and names[1:] == sorted(names[1:])


def test_extra_manifest_and_extract(tmp_path):
    a = make_model_dir(tmp_path / "x" / "a-v0")
    bundle = invdyn.write_bundle(tmp_path / "b.zip", {"a-v0": a}, extra_manifest={"created_by": "test"})
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")  # replaced as a whole
    manifest = invdyn.extract_bundle(bundle, target)
    assert manifest["created_by"] == "test"
    assert sorted(p.name for p in target.iterdir()) == ["a-v0", "manifest.json"]
    for f in ("params.json", "model.ckpt", "model.safetensors", "README.md"):
        assert (target / "a-v0" / f).read_bytes() == (a / f).read_bytes()
    with pytest.raises(invdyn.FormatError, match="reserved"):
        invdyn.write_bundle(tmp_path / "c.zip", [a], extra_manifest={"models": []})


def test_write_refuses_a_broken_model_dir(tmp_path):
    a = make_model_dir(tmp_path / "a-v0")
    with open(a / "model.ckpt", "r+b") as f:
        f.seek(200)
        f.write(b"\xff\xfe")
    with pytest.raises(invdyn.ChecksumError, match="model.ckpt"):
        invdyn.write_bundle(tmp_path / "b.zip", [a])
    assert not (tmp_path / "b.zip").exists()
    assert list(tmp_path.glob(".b.zip*")) == []


def test_tampered_member_is_refused_with_both_checksums(tmp_path):
    bundle = make_bundle(tmp_path)
    with zipfile.ZipFile(bundle) as zf:
        params = json.loads(zf.read("a-v0/params.json"))
        expected = json.loads(zf.read("manifest.json"))["models"][0]["files"]["params.json"]["sha256"]
    params["metrics"]["heldout_mse"] = 0.0001  # a better-looking score: size and sha256 differ
    data = json.dumps(params).encode()
    bad = rewrite_zip(bundle, tmp_path / "bad.zip", replace={"a-v0/params.json": data})
    with pytest.raises(invdyn.ChecksumError) as e:
        invdyn.verify_bundle(bad)
    msg = str(e.value)
    actual = hashlib.sha256(data).hexdigest()
    assert "a-v0/params.json" in msg and "bad.zip" in msg and expected in msg and actual in msg
    # same size, different bytes: the sha256 must catch it and be named
    with zipfile.ZipFile(bundle) as zf:
        raw = bytearray(zf.read("b-v0/model.ckpt"))
        want = hashlib.sha256(raw).hexdigest()
    raw[-30] ^= 0x01
    bad2 = rewrite_zip(bundle, tmp_path / "bad2.zip", replace={"b-v0/model.ckpt": bytes(raw)})
    with pytest.raises(invdyn.ChecksumError) as e:
        invdyn.verify_bundle(bad2)
    assert want in str(e.value) and hashlib.sha256(raw).hexdigest() in str(e.value)
    with pytest.raises(invdyn.ChecksumError):
        invdyn.fetch(bad2)
    assert invdyn.list_models() == []


def test_oversized_member_is_not_read(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    bomb = rewrite_zip(bundle, tmp_path / "bomb.zip", replace={"a-v0/README.md": bytes(50 << 20)})
    assert bomb.stat().st_size < 1 << 20  # 50 MB of zeros deflate to almost nothing
    with pytest.raises(
        invdyn.ChecksumError, match=r"a-v0/README.md is 52428800 bytes but manifest.json records"
    ):
        invdyn.verify_bundle(bomb)


def test_corrupt_compressed_bytes_are_refused(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("a-v0/model.ckpt")
    at = info.header_offset + 30 + len(info.filename) + 40  # inside the member's compressed data
    data[at] ^= 0xFF
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(invdyn.ChecksumError, match="a-v0/model.ckpt"):
        invdyn.verify_bundle(bad)


def test_truncated_bundle_is_refused(tmp_path):
    bundle = make_bundle(tmp_path)
    data = bundle.read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(invdyn.FormatError, match="cut.zip.*truncated"):
        invdyn.verify_bundle(cut)
    # a member missing from an otherwise valid zip (e.g. a bad re-pack) is named too
    short = rewrite_zip(bundle, tmp_path / "short.zip", drop={"b-v0/model.ckpt"})
    with pytest.raises(invdyn.ChecksumError, match="missing.*b-v0/model.ckpt"):
        invdyn.verify_bundle(short)


@pytest.mark.parametrize(
    "member", ["../evil.txt", "/etc/evil", "a-v0/../../evil", "a-v0\\..\\evil", "C:/evil"]
)
def test_zip_slip_members_are_refused(tmp_path, member):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    bad = rewrite_zip(bundle, tmp_path / "slip.zip", add=[(_info(member), b"pwned")])
    with pytest.raises(invdyn.FormatError, match="unsafe member path"):
        invdyn.verify_bundle(bad)
    target = tmp_path / "deep" / "out"
    with pytest.raises(invdyn.FormatError):
        invdyn.extract_bundle(bad, target)
    assert not target.exists() and not list(tmp_path.rglob("evil*"))


def test_symlink_member_is_refused(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    link = _info("a-v0/README.md", stat.S_IFLNK | 0o777)
    with zipfile.ZipFile(bundle) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != "a-v0/README.md"}
    bad = tmp_path / "link.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in members.items():
            zf.writestr(_info(name), data)
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(invdyn.FormatError, match="symlink"):
        invdyn.verify_bundle(bad)


def test_duplicate_and_unlisted_members_are_refused(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate we write on purpose
        dup = rewrite_zip(bundle, tmp_path / "dup.zip", add=[(_info("a-v0/params.json"), b"{}")])
    with pytest.raises(invdyn.FormatError, match="twice"):
        invdyn.verify_bundle(dup)
    extra = rewrite_zip(bundle, tmp_path / "extra.zip", add=[(_info("a-v0/payload.py"), b"print(1)")])
    with pytest.raises(invdyn.FormatError, match="not listed.*payload.py"):
        invdyn.verify_bundle(extra)


def test_unknown_format_version_asks_to_upgrade(tmp_path):
    bundle = make_bundle(tmp_path, names=("a-v0",))
    with zipfile.ZipFile(bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    manifest["format_version"] = 99
    bad = rewrite_zip(bundle, tmp_path / "v99.zip", replace={"manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(invdyn.FormatError, match=r"format_version 99.*upgrade invdyn"):
        invdyn.verify_bundle(bad)
    no_manifest = rewrite_zip(bundle, tmp_path / "nm.zip", drop={"manifest.json"})
    with pytest.raises(invdyn.FormatError, match="no manifest.json"):
        invdyn.verify_bundle(no_manifest)
