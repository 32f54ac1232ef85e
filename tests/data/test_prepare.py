"""End-to-end tests of the sCPR preparation (monai_cft.data.prepare) and the prepared-data loaders."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from monai_cft.data import prepare as prepare_module
from monai_cft.data.dataset import load_prepare_config, load_scpr_datalist
from monai_cft.utils.io import save_centerline, save_json
from monai_cft.data.prepare import prepare_dataset
from monai_cft.data.presets import HU_WINDOW, SCPR_PRESETS, get_scpr_preset
from monai_cft.data.synthetic import generate_dataset
from monai_cft.variables import DEFAULT_REGIONS, DEFAULT_STRUCTURES, variable_names

NAMES = variable_names(DEFAULT_STRUCTURES, DEFAULT_REGIONS)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    generate_dataset(root, num_cases=3, seed=1, workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def scpr_dir(raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scpr") / "quick"
    config = prepare_dataset(raw_dir, out, preset="quick", workers=0, progress=False)
    assert config["_stats"]["prepared"] == 3
    return out


def _measure_label(label: np.ndarray, spacing: float) -> list[float]:
    """Reference areas (mm^2) per structure and third of the columns, computed independently."""
    width = label.shape[1]
    region = np.minimum((np.arange(width) + 0.5) * 3 // width, 2).astype(int)  # thirds by pixel centre
    out = []
    for value in DEFAULT_STRUCTURES.values():
        for k in range(3):
            out.append(float(np.count_nonzero(label[:, region == k] == value)) * spacing**2)
    return out


def test_presets():
    assert SCPR_PRESETS["paper"] == {"spacing": 0.25, "output_size": (64, 384)}
    assert SCPR_PRESETS["quick"] == {"spacing": 0.5, "output_size": (32, 192)}
    assert HU_WINDOW == (-300.0, 1100.0)
    with pytest.raises(ValueError, match="valid presets"):
        get_scpr_preset("huge")


def test_prepared_files_and_variables(scpr_dir):
    rows = {r["id"]: r for r in csv.DictReader(open(scpr_dir / "variables.csv"))}
    assert len(rows) == 3 and list(next(iter(rows.values())))[:2] == ["id", "split"]
    for case, row in rows.items():
        img = nib.load(scpr_dir / "images" / f"{case}.nii.gz")
        lab = nib.load(scpr_dir / "labels" / f"{case}.nii.gz")
        assert img.shape == (32, 192) and lab.shape == (32, 192)
        assert lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(np.diag(img.affine)[:2], [0.5, 0.5])
        image = np.asanyarray(img.dataobj)
        label = np.asanyarray(lab.dataobj)
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
        # the vessel runs along the middle rows; its lumen is bright, its surroundings are not
        assert (label[14:18] == 1).mean() > 0.5 and (label[:3] == 0).all() and (label[-3:] == 0).all()
        assert np.median(image[label == 1]) > 150 and np.median(image[:3]) < 100
        expected = _measure_label(label, 0.5)
        np.testing.assert_allclose([float(row[n]) for n in NAMES], expected, atol=1e-6)
        per_case = list(csv.reader(open(scpr_dir / "cases" / f"{case}.csv")))
        assert per_case[0] == ["id", *NAMES]
        np.testing.assert_allclose([float(v) for v in per_case[1][1:]], expected, atol=1e-6)
        assert all(expected[i] > 0 for i in range(3))  # every third has lumen


def test_prepare_config_ranges_are_training_min_max(scpr_dir):
    config = load_prepare_config(scpr_dir)
    assert config["preset"] == "quick" and config["output_size"] == (32, 192) and config["spacing"] == 0.5
    assert config["variables"] == NAMES and config["regions"] == list(DEFAULT_REGIONS)
    rows = [r for r in csv.DictReader(open(scpr_dir / "variables.csv")) if r["split"] == "training"]
    assert config["num_labelled_training"] == len(rows) >= 1
    for name in NAMES:
        values = [float(r[name]) for r in rows]
        assert config["ranges"][name] == [min(values), max(values)]


def test_datalist_preserves_splits_and_loads(raw_dir, scpr_dir):
    raw = json.loads((raw_dir / "dataset.json").read_text())
    prepared = json.loads((scpr_dir / "dataset.json").read_text())
    for split in ("training", "validation", "test"):
        assert [i["id"] for i in prepared[split]] == [i["id"] for i in raw[split]]
        items = load_scpr_datalist(scpr_dir, split)
        for item in items:
            assert item["image"].startswith(str(scpr_dir.resolve())) and len(item["variables"]) == 9
            assert all(np.float32(v) == v for v in item["variables"])
            assert [item[n] for n in NAMES] == item["variables"]
    with pytest.raises(ValueError, match="unknown split"):
        load_scpr_datalist(scpr_dir, "train")


def test_rerun_skips_and_settings_mismatch_is_refused(raw_dir, scpr_dir):
    config = prepare_dataset(raw_dir, scpr_dir, preset="quick", workers=0, progress=False)
    assert config["_stats"]["skipped"] == 3 and config["_stats"]["prepared"] == 0
    with pytest.raises(ValueError, match="other settings"):
        prepare_dataset(raw_dir, scpr_dir, preset="paper", workers=0, progress=False)


def test_interrupted_case_leaves_no_marker_and_resumes(raw_dir, tmp_path, monkeypatch):
    out = tmp_path / "scpr"
    real = prepare_module.save_nifti
    calls = {"n": 0}

    def flaky(array, affine, path, dtype=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the label of the second case
            raise KeyboardInterrupt
        return real(array, affine, path, dtype)

    monkeypatch.setattr(prepare_module, "save_nifti", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(raw_dir, out, preset="quick", workers=0, progress=False)
    assert len(list((out / "cases").iterdir())) == 1  # only the finished case has its marker
    assert not (out / "prepare_config.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    monkeypatch.setattr(prepare_module, "save_nifti", real)
    with pytest.raises(ValueError, match="other settings"):  # the unfinished folder remembers its settings
        prepare_dataset(raw_dir, out, preset="paper", workers=0, progress=False)
    config = prepare_dataset(raw_dir, out, preset="quick", workers=0, progress=False)
    assert (config["_stats"]["prepared"], config["_stats"]["skipped"]) == (2, 1)


def test_paper_preset_and_unlabelled_user_data(raw_dir, tmp_path):
    """A user's folder: no labels, a Slicer-free CSV centreline, one split only."""
    user = tmp_path / "user"
    for sub in ("images", "centerlines"):
        (user / sub).mkdir(parents=True)
    shutil.copy(raw_dir / "images" / "case_0000.nii.gz", user / "images" / "p1.nii.gz")
    pts = np.loadtxt(raw_dir / "centerlines" / "case_0000.csv", delimiter=",", skiprows=1)
    save_centerline(pts[::4], user / "centerlines" / "p1.csv")  # a coarser centreline is fine
    save_json({"training": [{"id": "p1", "image": "images/p1.nii.gz", "centerline": "centerlines/p1.csv"}]},
              user / "dataset.json")
    out = tmp_path / "paper"
    with pytest.warns(UserWarning, match="no labelled training case"):
        config = prepare_dataset(user, out, preset="paper", workers=0, progress=False)
    assert config["ranges"] == {} and config["num_cases"] == {"training": 1}
    img = nib.load(out / "images" / "p1.nii.gz")
    assert img.shape == (64, 384) and not (out / "labels").exists()
    items = load_scpr_datalist(out, "training", require_variables=False)
    assert "variables" not in items[0] and "label" not in items[0]
    with pytest.raises(ValueError, match="lacks required key"):
        load_scpr_datalist(out, "training")


def test_centerline_in_wrong_coordinates_names_the_case(raw_dir, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(raw_dir, user)
    pts = np.loadtxt(user / "centerlines" / "case_0001.csv", delimiter=",", skiprows=1)
    save_centerline(pts * np.array([-1.0, -1.0, 1.0]), user / "centerlines" / "case_0001.csv")  # LPS by mistake
    with pytest.raises(ValueError, match="case_0001.*outside"):
        prepare_dataset(user, tmp_path / "out", preset="quick", workers=0, progress=False)


def test_load_prepare_config_validation(scpr_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="monai_cft.data.prepare"):
        load_prepare_config(tmp_path)
    good = json.loads((scpr_dir / "prepare_config.json").read_text())
    cases = [
        ({k: v for k, v in good.items() if k != "ranges"}, r"lacks the key\(s\) \['ranges'\]"),
        ({**good, "output_size": [32]}, "output_size"),
        ({**good, "spacing": -1}, "spacing"),
        ({**good, "variables": NAMES[::-1]}, "do not match"),
        ({**good, "ranges": {**good["ranges"], "calcified_mid": [3.0, 1.0]}}, "calcified_mid"),
        ({**good, "ranges": {n: good["ranges"][n] for n in NAMES[1:]}}, "lumen_proximal"),
    ]
    for content, match in cases:
        save_json(content, tmp_path / "prepare_config.json")
        with pytest.raises(ValueError, match=match):
            load_prepare_config(tmp_path)


# ---------------------------------------------------------------------------------------------
# reliability (issue 13): one prepare per folder at a time; the per-case skip checks the geometry
# ---------------------------------------------------------------------------------------------

_HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, b"424242")
print("locked", flush=True)
sys.stdin.read()
"""

_PROBE_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(3)
"""


def test_concurrent_prepare_of_one_folder_fails_at_once(raw_dir, scpr_dir, tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    out = tmp_path / "scpr"
    shutil.copytree(scpr_dir, out)
    lock = out / prepare_module.LOCK_FILE
    settings = (out / ".prepare_settings.json").read_text()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(lock)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        with pytest.raises(RuntimeError, match="another process") as info:
            prepare_dataset(raw_dir, out, preset="paper", workers=0, progress=False)
        assert time.perf_counter() - t0 < 1.0, "the second run must fail at once, not wait"
        assert str(out) in str(info.value) and str(lock) in str(info.value) and "424242" in str(info.value)
        assert (out / ".prepare_settings.json").read_text() == settings, "the refused run must write nothing"
    finally:
        holder.communicate("")
    # the lock is held for the whole run: another process cannot take it while cases are prepared
    probes = []
    real_map = prepare_module.parallel_map

    def probing_map(*args, **kwargs):
        probes.append(subprocess.run([sys.executable, "-c", _PROBE_LOCK, str(lock)]).returncode)
        yield from real_map(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "parallel_map", probing_map)
    config = prepare_dataset(raw_dir, out, preset="quick", workers=0, progress=False)
    assert probes == [3] and config["_stats"]["skipped"] == 3
    assert subprocess.run([sys.executable, "-c", _PROBE_LOCK, str(lock)]).returncode == 0, "released after the run"


@pytest.mark.parametrize(
    "shape,spacing,why",
    [((64, 384), 0.25, r"shape \(64, 384\), expected \(32, 192\)"),  # left by a concurrent 'paper' run
     ((32, 192), 0.25, r"spacing \[0.25, 0.25\] mm, expected 0.5 mm")],
)
def test_resume_reprepares_cases_made_with_other_geometry(raw_dir, scpr_dir, tmp_path, shape, spacing, why):
    out = tmp_path / "scpr"
    shutil.copytree(scpr_dir, out)
    case = "case_0001"
    from monai_cft.utils.io import save_nifti

    save_nifti(np.zeros(shape, np.float32), np.diag([spacing, spacing, spacing, 1.0]), out / "images" / f"{case}.nii.gz")
    with pytest.warns(UserWarning, match=f"1 finished case.*prepared again.*{case}.*{why}"):
        config = prepare_dataset(raw_dir, out, preset="quick", workers=0, progress=False)
    assert (config["_stats"]["prepared"], config["_stats"]["skipped"]) == (1, 2)
    img = nib.load(out / "images" / f"{case}.nii.gz")
    assert img.shape == (32, 192) and np.allclose(img.header.get_zooms()[:2], 0.5)
    assert (out / "images" / f"{case}.nii.gz").read_bytes() == (scpr_dir / "images" / f"{case}.nii.gz").read_bytes()


def test_resume_with_another_preset_is_refused(raw_dir, scpr_dir, tmp_path):
    out = tmp_path / "scpr"
    shutil.copytree(scpr_dir, out)
    with pytest.raises(ValueError, match=r"other settings.*spacing.*\(0.5, 0.25\)"):
        prepare_dataset(raw_dir, out, preset="paper", workers=0, progress=False)
    assert nib.load(out / "images" / "case_0000.nii.gz").shape == (32, 192)


def _tube_case(root, centre_xy=(5.0, 3.0), lps=False, labelled=True):
    """A 0.5 mm volume spanning x, y in [-16, 16] mm with a bright tube (400 HU, radius 1.5 mm) along z at
    ``centre_xy``: a centreline in LPS (x and y negated) still lies inside the volume."""
    from monai_cft.utils.io import save_nifti

    n, sp = 64, 0.5
    affine = np.diag([sp, sp, sp, 1.0])
    affine[:3, 3] = [-16.0 + sp / 2, -16.0 + sp / 2, 0.0]
    idx = np.indices((n, n, n)).astype(float) * sp
    x, y = idx[0] - 16.0 + sp / 2, idx[1] - 16.0 + sp / 2
    tube = (x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2 <= 1.5**2
    image = np.where(tube, 400.0, 0.0).astype(np.float32)
    (root / "images").mkdir(parents=True, exist_ok=True)
    save_nifti(image, affine, root / "images" / "t1.nii.gz")
    item = {"id": "t1", "image": "images/t1.nii.gz", "centerline": "t1.csv"}
    if labelled:
        save_nifti(tube.astype(np.uint8), affine, root / "t1_label.nii.gz", dtype=np.uint8)
        item["label"] = "t1_label.nii.gz"
    sign = -1.0 if lps else 1.0
    z = np.linspace(2.0, 30.0, 15)
    save_centerline(np.stack([np.full_like(z, sign * centre_xy[0]), np.full_like(z, sign * centre_xy[1]), z], 1),
                    root / "t1.csv")
    save_json({"training": [item]}, root / "dataset.json")
    return root


@pytest.mark.parametrize("labelled", [True, False])
def test_centerline_in_lps_inside_the_volume_is_refused(tmp_path, labelled):
    import warnings

    good = _tube_case(tmp_path / "ras", labelled=labelled)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unlabelled single case: no ranges to speak of
        prepare_dataset(good, tmp_path / "ok", preset="quick", workers=0, progress=False)
    bad = _tube_case(tmp_path / "lps", lps=True, labelled=labelled)
    with pytest.raises(ValueError, match=r"case 't1'.*x and y negated.*LPS.*RAS"):
        prepare_dataset(bad, tmp_path / "no", preset="quick", workers=0, progress=False)
    assert not (tmp_path / "no" / "images" / "t1.nii.gz").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_dataset(bad, tmp_path / "forced", preset="quick", workers=0, progress=False, check_centerline=False)
    assert (tmp_path / "forced" / "images" / "t1.nii.gz").exists()
