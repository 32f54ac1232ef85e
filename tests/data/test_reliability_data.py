"""Reliability of the data layer (issue 13): case ids and save names are plain file names (no path
traversal), and ``atomic_path`` flushes the file and its folder to disk around the rename."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from monai_cft.utils import io as io_module
from monai_cft.utils.io import atomic_path, check_file_name, load_datalist, save_json

VALID_NAMES = ["case_0000", "p1", "a.b", "case-1 (copy)", "Ünïcode", "x" * 200]
INVALID_NAMES = [
    # (value, text the message must contain)
    ("", "''"),
    (None, "None"),
    (3, "3"),
    ("../../evil", "'../../evil'"),
    ("a/b", "'a/b'"),
    ("/abs", "'/abs'"),
    ("a\\b", "'a\\\\\\\\b'"),
    ("..", "'..'"),
    (".", "'.'"),
    (".hidden", "'.hidden'"),
    ("x..y", "'x..y'"),
    ("a\x00b", "'a\\\\x00b'"),
    ("x" * 201, "longer than 200"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_check_file_name_valid(name):
    assert check_file_name(name) == name


@pytest.mark.parametrize("name,text", INVALID_NAMES, ids=[repr(n)[:20] for n, _ in INVALID_NAMES])
def test_check_file_name_invalid(name, text):
    with pytest.raises(ValueError, match=text) as info:
        check_file_name(name, "case id", "somewhere.json")
    assert "somewhere.json" in str(info.value) and "invalid case id" in str(info.value)


def _raw(root: Path, case: str) -> Path:
    """A raw folder whose one case has the id ``case`` (its files have a safe name)."""
    for sub in ("images", "labels", "centerlines"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "images" / "a.nii.gz").write_bytes(b"")
    (root / "labels" / "a.nii.gz").write_bytes(b"")
    (root / "centerlines" / "a.csv").write_text("x,y,z\n")
    item = {"id": case, "image": "images/a.nii.gz", "label": "labels/a.nii.gz", "centerline": "centerlines/a.csv"}
    save_json({"training": [item]}, root / "dataset.json")
    return root


BAD_IDS = ["../../evil", "sub/evil", ".evil", "..", "a\\b", "a\x00b"]


@pytest.mark.parametrize("case", BAD_IDS, ids=[repr(c) for c in BAD_IDS])
def test_load_datalist_rejects_traversing_ids(tmp_path, case):
    raw = _raw(tmp_path / "raw", case)
    with pytest.raises(ValueError) as info:
        load_datalist(raw / "dataset.json")
    msg = str(info.value)
    assert repr(case) in msg and str(raw / "dataset.json") in msg and "training[0]" in msg


@pytest.mark.parametrize("case", ["../../evil", "../evil"])
def test_prepare_writes_nothing_outside_out(tmp_path, case):
    from monai_cft.data.prepare import main, prepare_case

    raw = _raw(tmp_path / "a" / "raw", case)
    out = tmp_path / "a" / "out"
    with pytest.raises(ValueError, match=repr(case).replace(".", r"\.")):
        main(["--data-dir", str(raw), "--out", str(out), "--workers", "0", "--no-progress"])
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "evil" in p.name)
    assert written == [] and not out.exists()
    with pytest.raises(ValueError, match="invalid case id"):  # the per-case function checks too
        prepare_case({"item": {"id": case, "image": "x", "centerline": "y"}, "out_dir": str(out)})


def test_synthetic_write_case_rejects_bad_ids(tmp_path):
    from monai_cft.data.synthetic import write_case

    with pytest.raises(ValueError, match="'../evil'"):
        write_case((str(tmp_path / "out"), "../evil", {}, False))
    assert not (tmp_path / "evil.nii.gz").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".x", None])
def test_inference_save_name_must_be_plain(tmp_path, name):
    from monai_cft.inference_output import save_result

    with pytest.raises(ValueError, match="invalid save name") as info:
        save_result(None, tmp_path / "out", name=name)
    assert repr(name) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_atomic_path_fsyncs_file_then_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(io_module.os, "fsync", fsync)
    monkeypatch.setattr(io_module.os, "replace", replace)
    target = tmp_path / "sub" / "a.json"
    save_json({"a": 1}, target)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(".tmp-") and events[0][1].endswith("a.json")
    assert events[1][1] == "a.json" and events[2][1] == "sub"
    assert json.loads(target.read_text()) == {"a": 1}
    # a failing block neither syncs nor renames
    events.clear()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert events == [] and not (tmp_path / "b.txt").exists()
