"""Repository-level checks: the README's commands and CI stay in sync; the pipeline's stage logic."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set-up: the two commands", 1)[1].split("\n## ", 1)[0]
    blocks = _bash_blocks(section)
    assert len(blocks) == 2, blocks
    main_job, tests = blocks
    assert main_job == "bash scripts/quickstart.sh"
    assert (ROOT / "scripts" / "quickstart.sh").exists()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, "the README's test command must be what .ci/run runs"
    assert "torch==2.13.0" in tests and "pytest" in tests


def test_transforms_import_is_light():
    """``import monai_cft.transforms`` adds nothing heavy to what monai, torch and numpy import."""
    import subprocess

    code = (
        "import sys, numpy, torch, monai; base = set(sys.modules); "
        "import monai_cft.transforms; new = sorted(set(sys.modules) - base); "
        "print(sorted({m.split('.')[0] for m in new} - {'monai_cft'})); "
        "print(sorted(m for m in new if m.startswith('monai_cft.') and not m.startswith('monai_cft.transforms')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    heavy = [m for m in eval(out[0]) if m in ("zuko", "ignite", "nibabel", "itk", "matplotlib", "tensorboard", "scipy", "tqdm")]
    assert heavy == [], f"import monai_cft.transforms pulled in {heavy} beyond monai/torch/numpy"
    # the bottom layer only: names and order of the variables, the shared constants, small utils
    allowed = {"monai_cft.variables", "monai_cft.constants", "monai_cft.utils", "monai_cft.utils.tensors"}
    assert set(eval(out[1])) <= allowed, f"transforms import other sub-packages: {out[1]}"


def test_pipeline_stage_markers_skip_and_force(tmp_path, capsys):
    from monai_cft.pipeline import Stage, run_pipeline

    calls = []
    stages = [Stage("a", func=lambda: calls.append("a")), Stage("b", func=lambda: calls.append("b"))]
    assert run_pipeline(stages, tmp_path, None, []) == 0
    assert calls == ["a", "b"]
    marker = json.loads((tmp_path / "stages" / "a.json").read_text())
    assert marker["stage"] == "a" and marker["seconds"] >= 0
    run_pipeline(stages, tmp_path, None, [])
    assert calls == ["a", "b"], "finished stages must be skipped"
    run_pipeline(stages, tmp_path, None, ["b"])
    assert calls == ["a", "b", "b"]
    with pytest.raises(ValueError, match="unknown stage"):
        run_pipeline(stages, tmp_path, ["nope"], [])


def test_pipeline_failed_stage_leaves_no_marker(tmp_path):
    from monai_cft.pipeline import Stage, run_pipeline

    def boom():
        raise RuntimeError("boom")

    assert run_pipeline([Stage("x", func=boom)], tmp_path, None, []) == 1
    assert not (tmp_path / "stages" / "x.json").exists()


def test_forced_rerun_removes_restart_files_but_a_first_run_keeps_them(tmp_path):
    from monai_cft.pipeline import Stage, run_pipeline

    state = tmp_path / "state.pt"
    state.write_text("resume me")
    stage = Stage("ft", func=lambda: None, restart_files=[state])
    run_pipeline([stage], tmp_path, None, [])
    assert state.exists(), "an unfinished stage resumes from its state"
    run_pipeline([stage], tmp_path, None, ["ft"])
    assert not state.exists(), "a forced re-run of a finished stage starts afresh"
