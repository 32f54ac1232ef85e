"""Every shell command the README and docs show works as written, on a tiny copy of the main job.

The fenced ``bash`` blocks of README.md, docs/*.md and bundle/docs/README.md are read; every
command in them must be classified in :data:`KINDS` (a new command in the docs fails
:func:`test_every_documented_command_is_known` until this test runs it). The commands then run in
the documented order in a scratch folder laid out like the repository (``bundle/`` a copy of the
repository's bundle, ``data/`` and ``outputs/`` written by the commands themselves), changed only to
tiny sizes: 16 synthetic cases instead of 600 or 1000 and one epoch per training. The models of the
training commands (``bundle/models``) stand in for the main job's ``outputs/models``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "bundle" / "docs" / "README.md"]
TINY_CASES = "16"

#: (kind, regular expression on the command, how it runs here); kinds run in this order.
KINDS = [
    ("setup", r"^bash scripts/quickstart\.sh$", "skip: the main job itself (30 min); its stages are the commands below"),
    ("setup", r"^python3 -m venv --clear \.venv && .*pytest", "skip: the test command (CI runs it)"),
    ("synthetic", r"^python -m monai_cft\.data\.synthetic ", "--num-cases -> 16"),
    ("prepare", r"^python -m monai_cft\.data\.prepare ", "as written"),
    ("training", r"^python -m monai\.bundle run training ", "+ --max_epochs 1"),
    ("export", r"^python -m monai\.bundle ckpt_export ", "as written (on the training commands' models)"),
    ("finetune", r"^python -m monai\.bundle run finetune ", "+ --max_epochs 1"),
    ("evaluating", r"^python -m monai\.bundle run evaluating ", "as written"),
    ("inference", r"^python -m monai\.bundle run inference ",
     "+ --allow_extrapolation True: the one-epoch guidance segmentor measures the factual far outside the "
     "observed range (on the main job's models the command runs as written)"),
    ("override", r"^--\w", "skip: an option list to append to the commands above, not a command"),
    ("torchrun", r"^torchrun ", "skip: tests/engines/test_distributed.py runs these launches (1 and 2 processes, tiny data)"),
]
ORDER = [k for k, _, _ in KINDS]
#: documents whose commands another test runs, with the test that runs them
ELSEWHERE = {"docs/monailabel.md": "tests/monailabel/test_monailabel.py (the same requests against a real MONAI Label server)"}


def documented_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every command of every fenced bash block (continuations joined, comments dropped)."""
    out = []
    for path in DOCS:
        if not path.is_file() or str(path.relative_to(REPO)) in ELSEWHERE:
            continue
        text = path.read_text(encoding="utf-8")
        for block in re.finditer(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
            line0 = text[: block.start()].count("\n") + 2
            joined = re.sub(r"\\\n\s*", " ", block.group(1))
            for i, line in enumerate(joined.splitlines()):
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append((f"{path.relative_to(REPO)}:{line0 + i}", line))
    return out


def kind_of(command: str) -> str | None:
    for kind, pattern, _ in KINDS:
        if re.search(pattern, command):
            return kind
    return None


def test_every_documented_command_is_known():
    commands = documented_commands()
    assert len(commands) >= 10, commands
    unknown = [f"{where}: {cmd}" for where, cmd in commands if kind_of(cmd) is None]
    assert not unknown, "documented commands this test does not run (add them to KINDS):\n" + "\n".join(unknown)


def tiny(command: str, kind: str) -> list[str]:
    """The command as argv for this interpreter, at tiny sizes (see :data:`KINDS`)."""
    command = command.split("  #")[0].strip()
    argv = shlex.split(command.replace("$B", "bundle/configs"))
    assert argv[0] == "python", command
    argv[0] = sys.executable
    if kind == "synthetic":
        argv[argv.index("--num-cases") + 1] = TINY_CASES
    if kind in ("training", "finetune"):
        argv += ["--max_epochs", "1"]
    if kind == "inference":
        argv += ["--allow_extrapolation", "True"]
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs_commands")
    shutil.copytree(REPO / "bundle", root / "bundle", ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    return root


def _run(argv: list[str], cwd: Path, where: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MONAI_CFT_BUNDLE_ROOT=str(cwd / "bundle"), OMP_NUM_THREADS="1")
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_documented_commands_run_as_written(workdir):
    seen, runs = set(), []
    for where, cmd in documented_commands():
        kind = kind_of(cmd)
        if kind in ("setup", "override", "torchrun") or cmd in seen:
            continue
        seen.add(cmd)
        runs.append((ORDER.index(kind), len(runs), kind, where, cmd))
    kinds_run = {r[2] for r in runs}
    assert {"synthetic", "prepare", "training", "finetune", "evaluating", "inference"} <= kinds_run, kinds_run
    models_copied = False
    for _, _, kind, where, cmd in sorted(runs):
        if kind in ("finetune", "evaluating", "inference") and not models_copied:
            # the training commands wrote bundle/models; the docs' later commands read the main job's outputs/models
            shutil.copytree(workdir / "bundle" / "models", workdir / "outputs" / "models", dirs_exist_ok=True)
            models_copied = True
        argv = tiny(cmd, kind)
        _run(argv, workdir, where)
        if kind == "inference" and "--image" in argv:
            # the documented variant "a 3D volume: add --centerline path/to/centerline.csv"
            volume = argv[:]
            volume[volume.index("--image") + 1] = "data/raw/images/case_0001.nii.gz"
            volume[volume.index("--case_name") + 1] = "case_0001_volume"
            _run(volume + ["--centerline", "data/raw/centerlines/case_0001.csv"], workdir, where + " (3D volume)")
    # what the commands promise
    assert len(list((workdir / "data" / "scpr_quick" / "images").glob("*.nii.gz"))) == int(TINY_CASES)
    for name in ("segmentor_guidance.pt", "segmentor_eval.pt", "regressor.pt", "dscm.pt", "segmentor_guidance.ts"):
        assert (workdir / "bundle" / "models" / name).is_file(), name
    assert (workdir / "outputs" / "models" / "dscm_cft_pos_seg.pt").is_file()
    assert (workdir / "outputs" / "eval_again" / "eval" / "pos_seg" / "metrics.json").is_file()
    values = json.loads((workdir / "outputs" / "inference" / "pos_seg" / "case_0001_values.json").read_text())
    assert "calcified_mid" in json.dumps(values)
    import nibabel as nib

    factual = nib.load(workdir / "data" / "scpr_quick" / "images" / "case_0001.nii.gz")
    for name in ("case_0001", "case_0001_volume"):
        cf = nib.load(workdir / "outputs" / "inference" / "pos_seg" / f"{name}_cf.nii.gz")
        assert cf.shape == factual.shape, (name, cf.shape)
