"""Reliability of the pipeline's stage markers (issue 13, item 1): a marker means "this stage, with
this command and these inputs, finished"; a killed re-run is never taken for done and resumes.

Stub stages only (``python -c`` commands and callables), no training.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monai_cft import pipeline
from monai_cft.pipeline import Stage, run_pipeline

#: a "fine-tuning" stub: appends one step to its resume state, then (if the kill flag exists) kills
#: the pipeline that runs it and itself, else writes its result (the state it ended with).
_FINETUNE = """
import os, signal, sys
from pathlib import Path
state, result, kill = (Path(a) for a in sys.argv[1:4])
state.write_text((state.read_text() if state.exists() else "") + "x")
if kill.exists():
    kill.unlink()
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
result.write_text(state.read_text())
"""

_DRIVER = """
import json, sys
from pathlib import Path
from monai_cft.pipeline import Stage, run_pipeline

def stages(root):
    root = Path(root)
    state, result, kill = root / "state.txt", root / "result.txt", root / "kill"
    log = root / "evaluated.txt"
    def evaluate():
        with log.open("a") as fh:
            fh.write(result.read_text() + "\\n")
    return [
        Stage("ft", [sys.executable, "-c", FINETUNE, str(state), str(result), str(kill)], wave=0,
              restart_files=[state]),
        Stage("ev", func=evaluate, wave=1),
    ]

if __name__ == "__main__":
    root = Path(sys.argv[1])
    sys.exit(run_pipeline(stages(root), root / "out", None, sys.argv[2:]))
"""


@pytest.fixture
def fast_poll(monkeypatch):
    """The pipeline polls its subprocesses every 0.5 s; poll faster in these tests."""
    sleep = time.sleep
    monkeypatch.setattr(pipeline.time, "sleep", lambda s: sleep(min(s, 0.02)))


def _driver(tmp_path: Path):
    path = tmp_path / "driver.py"
    path.write_text(f"FINETUNE = {_FINETUNE!r}\n" + _DRIVER)
    spec = importlib.util.spec_from_file_location("driver_" + tmp_path.name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


def _run(stages, out: Path, force=(), selected=None, capsys=None) -> str:
    run_pipeline(stages, out, selected, list(force))
    return capsys.readouterr().out if capsys is not None else ""


def test_killed_forced_stage_is_rerun_and_resumed_not_skipped(tmp_path, fast_poll, capsys):
    path, driver = _driver(tmp_path)
    out = tmp_path / "out"
    stages = driver.stages(tmp_path)
    assert run_pipeline(stages, out, None, []) == 0
    assert (tmp_path / "result.txt").read_text() == "x"
    assert (tmp_path / "evaluated.txt").read_text() == "x\n"
    old_marker = json.loads((out / "stages" / "ft.json").read_text())
    assert old_marker["command"] == stages[0].command and old_marker["upstream"] == {}
    assert set(json.loads((out / "stages" / "ev.json").read_text())["upstream"]) == {"ft"}

    # --force ft, killed (SIGKILL of the whole pipeline) in the middle of the stage
    (tmp_path / "kill").touch()
    proc = subprocess.run([sys.executable, str(path), str(tmp_path), "ft"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert "removed" in proc.stdout and str(tmp_path / "state.txt") in proc.stdout
    assert not (out / "stages" / "ft.json").exists(), "a killed forced stage must not look finished"
    assert (out / "stages" / "ft.forced").exists()
    assert (tmp_path / "state.txt").read_text() == "x", "the forced run restarted from an empty state"

    # a plain re-run: the killed stage runs again and resumes its state; its dependant re-runs too
    text = _run(stages, out, capsys=capsys)
    assert "ft: " in text and "skipped" not in text.split("[2/2]")[0]
    assert "resuming the re-run" in text
    assert (tmp_path / "result.txt").read_text() == "xx", "the re-run must resume the killed run's state"
    assert (tmp_path / "evaluated.txt").read_text() == "x\nxx\n", "the evaluation must use the new result"
    assert not (out / "stages" / "ft.forced").exists()
    # now everything is up to date
    text = _run(stages, out, capsys=capsys)
    assert text.count("skipped") == 2 and (tmp_path / "evaluated.txt").read_text() == "x\nxx\n"


def test_second_force_after_a_killed_forced_run_resumes(tmp_path, fast_poll, capsys):
    state = tmp_path / "state.txt"
    calls = []

    def finetune(fail: list):
        state.write_text((state.read_text() if state.exists() else "") + "x")
        calls.append(state.read_text())
        if fail:
            fail.pop()
            raise RuntimeError("killed")

    fail: list = []
    stages = [Stage("ft", func=lambda: finetune(fail), restart_files=[state])]
    out = tmp_path / "out"
    run_pipeline(stages, out, None, [])
    fail.append(1)
    assert run_pipeline(stages, out, None, ["ft"]) == 1  # forced, restarted afresh, dies
    assert calls == ["x", "x"]
    assert not (out / "stages" / "ft.json").exists()
    assert run_pipeline(stages, out, None, ["ft"]) == 0  # forced again: resumes, does not restart
    assert calls == ["x", "x", "xx"]
    assert not (out / "stages" / "ft.forced").exists()
    run_pipeline(stages, out, None, ["ft"])  # forcing a finished stage restarts it
    assert calls[-1] == "x"


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, "-c", "pass", *extra]


# (name, first command, second command, whether the second run re-runs, text naming why)
COMMAND_CASES = [
    ("same", _cmd("--max_epochs", "3"), _cmd("--max_epochs", "3"), False, "skipped"),
    ("workers_only", _cmd("--workers", "2"), _cmd("--workers", "8"), False, "skipped"),
    ("threads_only", _cmd("--torch_threads", "1"), _cmd(), False, "skipped"),
    ("epochs", _cmd("--max_epochs", "3"), _cmd("--max_epochs", "4"), True, "'4'"),
    ("lr", _cmd("--lr", "0.001"), _cmd("--lr", "0.01"), True, "'0.01'"),
    ("extra_arg", _cmd(), _cmd("--raw-dir", "raw"), True, "'--raw-dir'"),
]


@pytest.mark.parametrize("name,first,second,reruns,why", COMMAND_CASES, ids=[c[0] for c in COMMAND_CASES])
def test_marker_with_another_command_is_stale(tmp_path, fast_poll, capsys, name, first, second, reruns, why):
    out = tmp_path / "out"
    _run([Stage("s", first)], out, capsys=capsys)
    before = (out / "stages" / "s.json").read_text()
    text = _run([Stage("s", second)], out, capsys=capsys)
    assert why in text
    assert ("stale" in text) == reruns
    assert ((out / "stages" / "s.json").read_text() != before) == reruns
    if reruns:
        assert json.loads((out / "stages" / "s.json").read_text())["command"] == second


def _two_waves(calls: list) -> list[Stage]:
    return [Stage("up", func=lambda: calls.append("up"), wave=0),
            Stage("other", func=lambda: calls.append("other"), wave=0),
            Stage("down", func=lambda: calls.append("down"), wave=1)]


def test_upstream_rerun_makes_dependants_stale(tmp_path, fast_poll, capsys):
    calls: list = []
    stages = _two_waves(calls)
    out = tmp_path / "out"
    _run(stages, out, capsys=capsys)
    assert calls == ["up", "other", "down"]
    # forcing an upstream stage re-runs its dependants in the same invocation, not its wave-mates
    text = _run(stages, out, force=["up"], capsys=capsys)
    assert calls[3:] == ["up", "down"] and "depends on run again now: up" in text
    # the upstream stage alone (--stages up), then a plain run: the dependant is stale
    _run(stages, out, force=["up"], selected=["up"], capsys=capsys)
    text = _run(stages, out, capsys=capsys)
    assert calls[5:] == ["up", "down"], calls
    assert "finished again since, or lost their marker: up" in text
    # an upstream marker that disappeared also makes the dependant stale
    _run(stages, out, capsys=capsys)
    assert calls[7:] == []
    (out / "stages" / "other.json").unlink()
    _run(stages, out, capsys=capsys)
    assert calls[7:] == ["other", "down"]


def test_legacy_marker_without_inputs_is_trusted_on_its_command(tmp_path, fast_poll, capsys):
    calls: list = []
    stages = _two_waves(calls)
    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    for s in stages:
        (out / "stages" / f"{s.name}.json").write_text(json.dumps({"stage": s.name, "seconds": 1.0, "command": None}))
    text = _run(stages, out, capsys=capsys)
    assert calls == [] and text.count("skipped") == 3


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_unreadable_marker_is_stale(tmp_path, fast_poll, capsys, content):
    calls: list = []
    out = tmp_path / "out"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "a.json").write_text(content)
    text = _run([Stage("a", func=lambda: calls.append("a"))], out, capsys=capsys)
    assert calls == ["a"] and "stale" in text and "unreadable" in text


def test_a_stage_starts_when_its_own_inputs_are_done(tmp_path, fast_poll):
    """With explicit dependencies a later-wave stage does not wait for an unrelated slow stage."""
    log = tmp_path / "order.txt"

    def step(name, seconds, until=None):
        # ``until``: stay running until that line is in the log (at most 60 s), so that the order does not
        # depend on how fast a loaded machine starts the other processes
        wait = (f"t0 = time.time()\nwhile {until!r} not in p.read_text() and time.time() - t0 < 60: time.sleep(0.05)\n"
                if until else "")
        code = (f"import time, pathlib\np = pathlib.Path({str(log)!r})\np.open('a').write('start {name}\\n')\n"
                f"time.sleep({seconds})\n{wait}p.open('a').write('end {name}\\n')")
        return [sys.executable, "-c", code]

    stages = [
        Stage("slow", step("slow", 0.5, until="end dependant"), wave=0),
        Stage("fast", step("fast", 0.1), wave=0),
        Stage("dependant", step("dependant", 0.1), wave=1, after=("fast",)),
        Stage("last", step("last", 0.1), wave=2),  # no `after`: every earlier wave
    ]
    assert run_pipeline(stages, tmp_path / "out", None, [], jobs=2) == 0
    order = log.read_text().split("\n")
    assert order.index("end dependant") < order.index("end slow") < order.index("start last")
    marker = json.loads((tmp_path / "out" / "stages" / "dependant.json").read_text())
    assert set(marker["upstream"]) == {"fast"}  # its fingerprint covers what it reads, nothing else
    assert set(json.loads((tmp_path / "out" / "stages" / "last.json").read_text())["upstream"]) == {
        "slow", "fast", "dependant"}
