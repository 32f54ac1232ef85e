"""Tests of monai_cft.utils.io, monai_cft.data.datalist and the synthetic dataset writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_cft.data._parallel import parallel_map
from monai_cft.data.datalist import make_datalist, split_ids
from monai_cft.utils.io import (
    atomic_path,
    load_centerline,
    load_datalist,
    save_centerline,
    save_csv,
    save_json,
    save_nifti,
)
from monai_cft.data.phantom import render_phantom
from monai_cft.data.synthetic import generate_dataset

POINTS = np.array([[1.5, -2.25, 30.0], [2.0, -2.0, 31.0], [2.5, -1.0, 32.5]])


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_path_success_keeps_suffix(tmp_path):
    target = tmp_path / "sub" / "a.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_text("x")
        assert not target.exists()
    assert target.read_text() == "x"
    assert [p.name for p in target.parent.iterdir()] == ["a.nii.gz"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "a.csv"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_previous_file(tmp_path):
    target = tmp_path / "a.json"
    save_json({"v": 1}, target)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2')
            raise KeyboardInterrupt
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_nothing_written_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "a.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_save_nifti_interrupted_leaves_no_file(tmp_path, monkeypatch):
    def fail(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        save_nifti(np.zeros((2, 3, 4), np.int16), np.eye(4), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_save_nifti_round_trip(tmp_path):
    affine = np.array([[-0.4, 0, 0, 10.0], [0, -0.4, 0, -20.0], [0, 0, 0.5, -150.0], [0, 0, 0, 1]])
    data = np.arange(24, dtype=np.float64).reshape(2, 3, 4) - 5.4
    path = save_nifti(data, affine, tmp_path / "x.nii.gz", dtype=np.int16)
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.rint(data).astype(np.int16))
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert img.header.get_xyzt_units()[0] == "mm" and int(img.header["sform_code"]) == 1
    flat = save_nifti(np.ones((3, 5), np.float32), np.diag([0.5, 0.5, 0.5, 1.0]), tmp_path / "f.nii.gz")
    assert nib.load(flat).shape == (3, 5)
    with pytest.raises(ValueError, match="affine"):
        save_nifti(data, np.eye(3), tmp_path / "y.nii.gz")


def test_save_csv_checks_row_length(tmp_path):
    save_csv(["a", "b"], [[1, 0.1], ["x", None]], tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == "a,b\n1,0.1\nx,\n"
    with pytest.raises(ValueError, match="2 cells"):
        save_csv(["a"], [[1, 2]], tmp_path / "u.csv")
    assert not (tmp_path / "u.csv").exists()


# ---------------------------------------------------------------------------------------------
# centrelines
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text",
    [
        ("h.csv", "x,y,z\n" + "\n".join(",".join(map(str, p)) for p in POINTS)),
        ("noheader.csv", "\n".join(",".join(map(str, p)) for p in POINTS) + "\n"),
        ("cols.csv", "id,z,x,y,r\n" + "\n".join(f"{i},{p[2]},{p[0]},{p[1]},1.0" for i, p in enumerate(POINTS))),
        ("w.txt", "# comment\n" + "\n".join(" ".join(map(str, p)) for p in POINTS)),
        ("l.json", json.dumps(POINTS.tolist())),
        ("p.json", json.dumps({"points": POINTS.tolist()})),
    ],
)
def test_load_centerline_text_formats(tmp_path, name, text):
    np.testing.assert_allclose(load_centerline(_write(tmp_path / name, text)), POINTS)


def _markups(system: str, points: np.ndarray, kind: str = "Curve") -> dict:
    return {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": kind,
                "coordinateSystem": system,
                "coordinateUnits": "mm",
                "controlPoints": [{"id": str(i), "label": f"C-{i}", "position": p.tolist()} for i, p in enumerate(points)],
            }
        ],
    }


def test_load_centerline_slicer_markups_lps_to_ras(tmp_path):
    lps = _write(tmp_path / "c.mrk.json", json.dumps(_markups("LPS", POINTS)))
    expected = POINTS * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(load_centerline(lps), expected)
    ras = _write(tmp_path / "r.mrk.json", json.dumps(_markups("RAS", POINTS)))
    np.testing.assert_allclose(load_centerline(ras), POINTS)
    bad = _write(tmp_path / "b.mrk.json", json.dumps(_markups("XYZ", POINTS)))
    with pytest.raises(ValueError, match="coordinateSystem"):
        load_centerline(bad)


def test_load_centerline_fcsv_lps(tmp_path):
    rows = "\n".join(f"vtkMRMLMarkupsFiducialNode_{i},{p[0]},{p[1]},{p[2]},0,0,0,1,1,1,0,F-{i},," for i, p in enumerate(POINTS))
    text = "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
    path = _write(tmp_path / "f.fcsv", text + rows + "\n")
    np.testing.assert_allclose(load_centerline(path), POINTS * np.array([-1.0, -1.0, 1.0]))


def test_save_and_load_centerline_round_trip(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 3)) * 40
    csv_path = save_centerline(pts, tmp_path / "c.csv")
    assert csv_path.read_text().startswith("x,y,z\n")
    np.testing.assert_allclose(load_centerline(csv_path), pts, atol=5e-5)
    np.testing.assert_array_equal(load_centerline(save_centerline(pts, tmp_path / "c.npy")), pts)
    with pytest.raises(ValueError, match=".csv or .npy"):
        save_centerline(pts, tmp_path / "c.vtk")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("one.csv", "x,y,z\n1,2,3\n", "at least 2 points"),
        ("nan.csv", "1,2,3\nnan,2,3\n", "non-finite"),
        ("two.csv", "1,2\n3,4\n", "not 3 numbers"),
        ("hdr.csv", "a,b,c\n1,2,3\n4,5,6\n", "without columns"),
        ("e.csv", "\n", "empty"),
        ("bad.json", "{", "not valid JSON"),
        ("shape.json", "[[1, 2], [3, 4]]", r"\(N, 3\)"),
        ("c.vtk", "x", "unsupported"),
    ],
)
def test_load_centerline_errors(tmp_path, name, content, match):
    with pytest.raises(ValueError, match=match):
        load_centerline(_write(tmp_path / name, content))


def test_load_centerline_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_centerline(tmp_path / "nope.csv")


# ---------------------------------------------------------------------------------------------
# datalists
# ---------------------------------------------------------------------------------------------


def _raw_folder(tmp_path: Path, ids=("a", "b", "c")) -> Path:
    for sub in ("images", "labels", "centerlines"):
        (tmp_path / sub).mkdir(exist_ok=True)
    for case in ids:
        (tmp_path / "images" / f"{case}.nii.gz").write_bytes(b"")
        (tmp_path / "labels" / f"{case}.nii.gz").write_bytes(b"")
        (tmp_path / "centerlines" / f"{case}.csv").write_text("x,y,z\n")
    return tmp_path


def _item(case: str) -> dict:
    return {"id": case, "image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "centerline": f"centerlines/{case}.csv"}


def test_load_datalist_resolves_paths(tmp_path):
    root = _raw_folder(tmp_path)
    save_json({"name": "x", "training": [_item("a"), _item("b")], "test": [_item("c")]}, root / "dataset.json")
    data = load_datalist(root / "dataset.json", required_keys=("id", "image", "centerline"))
    assert list(data) == ["training", "test"]
    assert data["training"][1]["image"] == str(root.resolve() / "images" / "b.nii.gz")
    assert Path(data["test"][0]["centerline"]).is_file()
    with pytest.raises(ValueError, match=r"no split\(s\) \['validation'\]"):
        load_datalist(root / "dataset.json", splits=["validation"])


def test_load_datalist_reports_missing_files_by_name(tmp_path):
    root = _raw_folder(tmp_path)
    (root / "labels" / "b.nii.gz").unlink()
    (root / "centerlines" / "c.csv").unlink()
    save_json({"training": [_item("a"), _item("b"), _item("c")]}, root / "dataset.json")
    with pytest.raises(FileNotFoundError) as info:
        load_datalist(root / "dataset.json")
    assert "labels/b.nii.gz" in str(info.value) and "centerlines/c.csv" in str(info.value)
    assert "2 missing" in str(info.value)
    assert load_datalist(root / "dataset.json", check_files=False)["training"][2]["id"] == "c"


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not valid JSON"),
        (json.dumps({"name": "x"}), "none of the splits"),
        (json.dumps({"training": {"id": "a"}}), "must be a list"),
        (json.dumps({"training": ["images/a.nii.gz"]}), r"training\[0\] must be an object"),
        (json.dumps({"training": [{"id": "a"}]}), r"lacks required key\(s\) \['image'\]"),
        (json.dumps({"training": [{"id": "a", "image": 3}]}), "must be a file path"),
        (json.dumps({"training": [{"id": "", "image": "a"}]}), "invalid case id ''"),
        (json.dumps({"training": [_item("a")], "test": [_item("a")]}), "appears twice"),
    ],
)
def test_load_datalist_malformed(tmp_path, content, match):
    _raw_folder(tmp_path)
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_datalist(tmp_path / "dataset.json")


def test_split_ids_deterministic_and_complete():
    ids = [f"case_{i:04d}" for i in range(100)]
    a, b = split_ids(ids, seed=3), split_ids(list(reversed(ids)), seed=3)
    assert [len(a[s]) for s in ("training", "validation", "test")] == [70, 15, 15]
    assert sorted(a["training"] + a["validation"] + a["test"]) == ids
    assert a == split_ids(ids, seed=3) and a != split_ids(ids, seed=4)
    assert a == b  # depends on the set of ids, not on their order
    small = split_ids(["a", "b", "c", "d"], seed=0)
    assert [len(small[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    assert split_ids(["a"])["training"] == ["a"]
    with pytest.raises(ValueError, match="sum"):
        split_ids(ids, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unique"):
        split_ids(["a", "a"])


def test_make_datalist_for_user_data(tmp_path):
    root = _raw_folder(tmp_path, ids=("p1", "p2", "p3", "p4"))
    (root / "labels" / "p2.nii.gz").unlink()
    (root / "centerlines" / "p3.csv").unlink()
    (root / "centerlines" / "p3.mrk.json").write_text("{}")
    data = make_datalist(root, seed=1)
    loaded = load_datalist(root / "dataset.json", required_keys=("id", "image", "centerline"))
    items = {it["id"]: it for split in loaded.values() for it in split}
    assert sorted(items) == ["p1", "p2", "p3", "p4"] and sum(len(data[s]) for s in loaded) == 4
    assert "label" not in items["p2"] and items["p3"]["centerline"].endswith("p3.mrk.json")
    (root / "images" / "p4.nii.gz").unlink()
    with pytest.raises(ValueError, match="without an image"):
        make_datalist(root)
    (root / "images" / "p5.nii").write_bytes(b"")
    with pytest.raises(ValueError, match=r"without a centreline.*p5"):
        make_datalist(root)


# ---------------------------------------------------------------------------------------------
# synthetic dataset writer
# ---------------------------------------------------------------------------------------------


def test_generate_dataset_layout_and_rerender(tmp_path):
    data = generate_dataset(tmp_path, num_cases=4, seed=5, workers=0, progress=False)
    assert data["_stats"] == {"rendered": 4, "skipped": 0}
    loaded = load_datalist(tmp_path / "dataset.json", required_keys=("id", "image", "label", "centerline"))
    assert [len(loaded[s]) for s in ("training", "validation", "test")] == [2, 1, 1]
    on_disk = json.loads((tmp_path / "dataset.json").read_text())
    assert on_disk["training"][0]["image"].startswith("images/") and "_stats" not in on_disk
    for split in loaded.values():
        for item in split:
            img, lab = nib.load(item["image"]), nib.load(item["label"])
            assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
            np.testing.assert_allclose(img.affine, lab.affine)
            params = json.loads((tmp_path / "params" / f"{item['id']}.json").read_text())
            assert params["seed"] == [5, int(item["id"].split("_")[1])]
            assert params["derived"]["shape"] == list(img.shape)
            case = render_phantom(params)  # the saved JSON alone reproduces the files exactly
            np.testing.assert_array_equal(np.asanyarray(img.dataobj), case.image)
            np.testing.assert_array_equal(np.asanyarray(lab.dataobj), case.label)
            np.testing.assert_allclose(img.affine, case.affine, atol=1e-5)
            np.testing.assert_allclose(load_centerline(item["centerline"]), case.centerline, atol=1e-4)
    again = generate_dataset(tmp_path, num_cases=4, seed=5, workers=0, progress=False)
    assert again["_stats"] == {"rendered": 0, "skipped": 4}
    with pytest.raises(ValueError, match="num_cases"):
        generate_dataset(tmp_path, num_cases=0)


def test_parallel_map_keeps_order_and_propagates_errors():
    assert list(parallel_map(math.sqrt, [4.0, 9.0, 16.0], workers=2, progress=False)) == [2.0, 3.0, 4.0]
    assert list(parallel_map(math.sqrt, [4.0, 9.0], workers=0, progress=False)) == [2.0, 3.0]
    with pytest.raises(ValueError, match="math domain"):
        list(parallel_map(math.sqrt, [4.0, -1.0, 9.0], workers=2, progress=False))
    with pytest.raises(ValueError, match="workers"):
        list(parallel_map(math.sqrt, [4.0], workers=-1, progress=False))
