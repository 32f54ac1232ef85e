"""The monai-cft main job: every stage from synthetic data to the evaluation report, one command.

``python -m monai_cft.pipeline`` runs, in order (each stage also runnable alone with ``--stages``):

==========================  ==================================================================
stage                       what it runs
==========================  ==================================================================
``generate``                ``python -m monai_cft.data.synthetic`` (3D phantom CCTA volumes)
``prepare``                 ``python -m monai_cft.data.prepare`` (sCPR images + 9 variables)
``dscm``                    bundle ``train.json`` (run id ``training``): flows + HVAE
``segmentor_guidance``      bundle ``train_segmentor.json`` (UNet, seed 0): guides Seg-/Pos-Seg-CFT
``segmentor_eval``          bundle ``train_segmentor.json`` (SegResNet, seed 1): evaluation only
``regressor``               bundle ``train_regressor.json``: guides Reg-CFT
``ground_truth``            ``python -m monai_cft.data.ground_truth``: true counterfactuals (test split)
``measurements``            ``python -m monai_cft.segmentor_evaluation``: segmentor Dice, calcium threshold
``finetune_<mode>``         bundle ``finetune.json`` for mode in none, reg, seg, pos_seg
``evaluate_<mode>``         bundle ``evaluate.json`` for each mode
``report``                  ``outputs/report.md``: Table 1, figures, metrics and stage times
==========================  ==================================================================

A finished stage leaves ``<output_dir>/stages/<stage>.json``: its command, wall time and a
fingerprint of the markers of the stages it was computed from (its ``after`` stages).
A marker means "this stage, with this command and these inputs, finished": re-running skips a
stage only if its marker's command (``--workers`` / ``--torch_threads`` aside) and upstream
fingerprint still match, and no stage it depends on runs again in the same invocation; otherwise it
re-runs and says why. ``--force`` names stages to redo anyway (or ``all``). A re-run of a finished
stage deletes its marker before it starts (a killed re-run is never taken for done) and its
``restart_files`` (resume state) once, recording the restart in ``stages/<stage>.forced`` until it
succeeds: a run after a killed re-run resumes that re-run instead of restarting it again.
Stages whose module is not installed yet are reported and skipped, never faked.

Each stage names the stages whose outputs it reads (``Stage.after``): a fine-tuning needs the DSCM,
the guidance segmentor and the regressor, an evaluation its fine-tuning, the evaluation segmentor,
the ground truth and the measurements. With ``--jobs N`` (default: the number of cores) up to N
stages whose inputs are finished run at once (waves, then the order above, decide among them),
each with one torch thread (``--torch-threads``), their output in ``<output_dir>/logs/<stage>.log``
and a status line every 30 s. On two cores this is faster than one stage with two threads, whose
threads wait on each other for the small tensors of the quick preset.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from monai_cft.constants import CFT_MODES
from monai_cft.utils.cli import count_arg, number_arg, run_cli
from monai_cft.utils.io import save_text

__all__ = ["Stage", "build_stages", "run_pipeline", "main"]

#: the mode whose fine-tuned DSCM is the bundle's main network, also written as ``models/model.pt``
MAIN_MODE = "pos_seg"
#: epochs per stage kind for the 30-minute CPU run of the quick preset (the bundle configs' own
#: defaults are longer schedules for a GPU).
QUICK_EPOCHS = {"segmentor": 16, "segmentor_eval": 28, "regressor": 20, "dscm": 25, "finetune": 15}
#: learning rate of the quick CPU fine-tuning: a few hundred CFT steps instead of causal-gen's
#: thousands at 1e-4 (the finetune.json default).
QUICK_FINETUNE_LR = 2e-3


@dataclass
class Stage:
    """One step of the pipeline: a command line (run as a subprocess) or a Python callable."""

    name: str
    command: list[str] | None = None
    wave: int = 0
    func: Callable[[], None] | None = None
    requires_module: str | None = None
    description: str = ""
    #: files a forced re-run deletes first (e.g. a fine-tuning's resume state, which would otherwise
    #: continue the finished run instead of starting the new one)
    restart_files: list[Path] = field(default_factory=list)
    #: the stages whose outputs this one reads; ``None``: every stage of an earlier wave. A stage starts
    #: as soon as these have finished, so independent work of different waves overlaps.
    after: tuple[str, ...] | None = None


def _dependencies(stages: Sequence[Stage], stage: Stage) -> list[str]:
    """Names of the stages ``stage`` reads from (:attr:`Stage.after`, else every earlier wave)."""
    if stage.after is not None:
        return list(stage.after)
    return [s.name for s in stages if s.wave < stage.wave]


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _bundle_cmd(python: str, bundle_dir: Path, run_id: str, configs: Sequence[str], nproc: int = 1,
                **overrides) -> list[str]:
    """``python -m monai.bundle run ...``; with ``nproc > 1`` a torchrun launch stacking ``multi_gpu.json``
    (and ``multi_gpu_validate.json`` on a config with a ``validate`` section)."""
    configs = list(configs)
    launcher = [python]
    if nproc > 1:
        validated = any("validate" in json.loads((bundle_dir / "configs" / c).read_text()) for c in configs)
        configs += ["multi_gpu.json"] + (["multi_gpu_validate.json"] if validated else [])
        launcher = [python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={nproc}"]
    files = [str(bundle_dir / "configs" / c) for c in configs]
    cmd = [*launcher, "-m", "monai.bundle", "run", run_id, "--config_file", repr(files)]
    cmd += ["--meta_file", str(bundle_dir / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(bundle_dir / "configs" / "logging.conf")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def build_stages(args: argparse.Namespace) -> list[Stage]:
    """Build the ordered stage list for the parsed command-line arguments."""
    py = sys.executable
    out = Path(args.output_dir).resolve()
    raw = Path(args.data_dir).resolve() / "raw"
    scpr = Path(args.data_dir).resolve() / f"scpr_{args.preset}"
    bundle = Path(args.bundle_dir).resolve()
    ckpt = out / "models"
    common = {"preset": args.preset, "dataset_dir": scpr, "ckpt_dir": ckpt, "output_dir": out}
    if args.device:
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1): {err}") from None
        common["device"] = f"$torch.device('{device}')"
    try:
        epochs = json.loads(args.epochs) if args.epochs else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"--epochs {args.epochs!r} is not valid JSON ({err}); e.g. '{{\"dscm\": 5}}'.") from None
    bad = {k: v for k, v in epochs.items() if k not in QUICK_EPOCHS or isinstance(v, bool) or not isinstance(v, int)
           or v < 1} if isinstance(epochs, dict) else epochs
    if bad or not isinstance(epochs, dict):
        raise ValueError(f"--epochs must be a JSON dict of whole numbers >= 1 for the stage kinds "
                         f"{list(QUICK_EPOCHS)}, got {bad!r} in {args.epochs!r}.")

    def ep(name: str) -> dict:
        return {"max_epochs": epochs[name]} if name in epochs else {}

    if args.torch_threads:
        common["torch_threads"] = args.torch_threads
    nproc = int(getattr(args, "nproc", 1))
    stages = [
        Stage(
            "generate",
            [py, "-m", "monai_cft.data.synthetic", "--out", str(raw), "--num-cases", str(args.num_cases),
             "--seed", str(args.seed), "--workers", str(args.workers)],
            requires_module="monai_cft.data.synthetic",
            description=f"{args.num_cases} synthetic 3D coronary CCTA phantoms",
        ),
        Stage(
            "prepare",
            [py, "-m", "monai_cft.data.prepare", "--data-dir", str(raw), "--out", str(scpr), "--preset", args.preset,
             "--workers", str(args.workers)],
            requires_module="monai_cft.data.prepare",
            description=f"sCPR straightening ({args.preset} preset) and regional measurements",
            wave=1,
            after=("generate",),
        ),
    ]
    # the four trainings that only need the prepared data: (stage, config, epochs kind, module, description, extra)
    for name, config, kind, module, description, extra in (
        ("dscm", "train.json", "dscm", "monai_cft.engines.dscm_trainer",
         "deep SCM: attribute flows + hierarchical VAE", {}),
        ("segmentor_guidance", "train_segmentor.json", "segmentor", "monai_cft.networks.predictors",
         "guidance segmentor (UNet)", {"segmentor_role": "guidance"}),
        ("regressor", "train_regressor.json", "regressor", "monai_cft.networks.predictors",
         "parent regressor (ResNet)", {}),
        ("segmentor_eval", "train_segmentor.json", "segmentor_eval", "monai_cft.networks.predictors",
         "evaluation segmentor (SegResNet, other seed)", {"segmentor_role": "eval"}),
    ):
        stages.append(Stage(name, _bundle_cmd(py, bundle, "training", ["common.json", config], nproc, **extra,
                                              **common, **ep(kind)),
                            requires_module=module, description=description, wave=2, after=("prepare",)))
    for mode in CFT_MODES:
        stages.append(
            Stage(
                f"finetune_{mode}",
                _bundle_cmd(py, bundle, "finetune", ["common.json", "finetune.json"], nproc, cft_mode=mode, **common,
                            **ep("finetune"), **({"lr": args.finetune_lr} if args.finetune_lr else {}),
                            # the main network of the bundle, where the model zoo (and MONAI Label) look for it
                            **({"extra_output_paths": repr([str(ckpt / "model.pt")])} if mode == MAIN_MODE else {})),
                requires_module="monai_cft.engines.cft_trainer",
                description=f"counterfactual fine-tuning, mode {mode}",
                restart_files=[out / "cft_state" / f"cft_{mode}_state.pt"],
                wave=3,
                after=("prepare", "dscm", "segmentor_guidance", "regressor"),
            )
        )
    stages += [
        Stage(
            "ground_truth",
            [py, "-m", "monai_cft.data.ground_truth", "--raw", str(raw), "--scpr", str(scpr), "--split", "test",
             "--seed", "0", "--workers", str(args.workers)],
            requires_module="monai_cft.data.ground_truth",
            description="ground-truth counterfactuals of the test split (evaluation only)",
            wave=2,
            after=("generate", "prepare"),
        ),
        Stage(
            "measurements",
            [py, "-m", "monai_cft.segmentor_evaluation", "--dataset-dir", str(scpr), "--ckpt-dir", str(ckpt),
             "--out", str(out / "eval" / "measurements.json"), "--raw-dir", str(raw)],
            requires_module="monai_cft.segmentor_evaluation",
            description="segmentor Dice and the HU-threshold calcium measure on the test split",
            wave=3,
            after=("generate", "prepare", "dscm", "segmentor_guidance", "segmentor_eval"),
        ),
    ]
    for mode in CFT_MODES:
        stages.append(
            Stage(
                f"evaluate_{mode}",
                _bundle_cmd(py, bundle, "evaluating", ["common.json", "evaluate.json"], cft_mode=mode,
                            allow_extrapolation=True, **common),
                requires_module="monai_cft.evaluation",
                description=f"evaluation of mode {mode}",
                wave=4,
                after=("prepare", f"finetune_{mode}", "segmentor_eval", "ground_truth", "measurements"),
            )
        )
    stages.append(Stage("report", func=lambda: _write_report(out, args), requires_module="monai_cft.report",
                        description="outputs/report.md", wave=5))
    return stages


def _write_report(out: Path, args: argparse.Namespace) -> None:
    from monai_cft.report import write_report

    write_report(out, modes=CFT_MODES)
    if out == (_repo_root() / "outputs").resolve() and (_repo_root() / "docs").is_dir():
        from monai_cft.publish import publish

        for path in publish(out, _repo_root()):
            print(f"    wrote {path}", flush=True)


def _module_available(name: str | None) -> bool:
    if name is None:
        return True
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _stage_marker(out: Path, name: str) -> Path:
    return out / "stages" / f"{name}.json"


def _forced_marker(out: Path, name: str) -> Path:
    """Record of a re-run of a finished stage in progress (removed when the stage succeeds)."""
    return out / "stages" / f"{name}.forced"


#: command options that change how a stage runs, not what it computes (ignored when comparing).
_EXECUTION_ONLY_OPTIONS = ("--workers", "--torch_threads")


def _comparable(command: Sequence[str] | None) -> list[str] | None:
    if command is None:
        return None
    cmd = [str(c) for c in command]
    keep: list[str] = []
    skip = False
    for token in cmd:
        if skip:
            skip = False
        elif token in _EXECUTION_ONLY_OPTIONS:
            skip = True
        else:
            keep.append(token)
    return keep


def _upstream(out: Path, stages: Sequence[Stage], stage: Stage) -> dict[str, str]:
    """Fingerprints (sha256 of the marker) of the finished stages ``stage`` depends on
    (:func:`_dependencies`)."""
    prints = {}
    for name in _dependencies(stages, stage):
        marker = _stage_marker(out, name)
        if marker.is_file():
            prints[name] = hashlib.sha256(marker.read_bytes()).hexdigest()[:16]
    return prints


def _stale_reason(out: Path, stages: Sequence[Stage], stage: Stage, done: dict, rerun: set[str]) -> str | None:
    """Why a finished stage's marker no longer describes this run (``None``: it is up to date)."""
    old, new = _comparable(done.get("command")), _comparable(stage.command)
    if old != new:
        if old is None or new is None:
            return f"its command changed from {old} to {new}"
        removed = [t for t in old if t not in new]
        added = [t for t in new if t not in old]
        return f"its command changed (only in the marker: {removed}, only now: {added})" if removed or added else \
            "its command changed (the order of its arguments)"
    again = [name for name in _dependencies(stages, stage) if name in rerun]
    if again:
        return f"stage(s) it depends on run again now: {', '.join(again)}"
    if "upstream" in done:  # markers of older versions recorded no inputs: trusted on their command
        now, then = _upstream(out, stages, stage), dict(done["upstream"])
        changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        if changed:
            return f"stage(s) it depends on finished again since, or lost their marker: {', '.join(changed)}"
    return None


def _begin(out: Path, stages: Sequence[Stage], stage: Stage) -> dict[str, str]:
    """Start a stage: a re-run of a finished one first records the restart, deletes its resume state
    and its marker. Returns the fingerprint of its inputs (for the marker written on success)."""
    marker, forced = _stage_marker(out, stage.name), _forced_marker(out, stage.name)
    if marker.exists():
        forced.write_text(json.dumps({"stage": stage.name, "restarted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                      "removed": [str(p) for p in stage.restart_files]}, indent=2))
        for path in stage.restart_files:
            if path.exists():
                path.unlink()
                print(f"    re-run of a finished stage: removed {path}", flush=True)
        marker.unlink()
    elif forced.exists() and any(p.exists() for p in stage.restart_files):
        print(f"    resuming the re-run recorded in {forced} (delete "
              f"{', '.join(str(p) for p in stage.restart_files)} to start afresh)", flush=True)
    return _upstream(out, stages, stage)


def _last_line(path: Path) -> str:
    """Last non-empty line of a log (progress bars' carriage returns count as line ends)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.replace("\r", "\n").split("\n") if ln.strip()]
    return lines[-1][:160] if lines else ""


def _finish(out: Path, stage: Stage, seconds: float, upstream: dict[str, str] | None = None) -> None:
    marker = _stage_marker(out, stage.name)
    # the completion id makes every marker unique, so a dependant's fingerprint of it changes with
    # each completion even when two runs finish within the same second with the same duration
    save_text(json.dumps({"stage": stage.name, "seconds": seconds, "command": stage.command,
                          "upstream": dict(upstream or {}), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                          "completion": uuid.uuid4().hex}, indent=2), marker)
    _forced_marker(out, stage.name).unlink(missing_ok=True)


def run_pipeline(stages: list[Stage], out: Path, selected: Sequence[str] | None, force: Sequence[str],
                 jobs: int = 1, status_every: float = 30.0) -> int:
    """Run the selected stages in order, up to ``jobs`` stages of one wave at a time.

    Returns:
        the number of failed stages. A stage whose wave has a failure still runs; a later wave
        runs too (its own checks report missing inputs).
    """
    names = [s.name for s in stages]
    unknown = [s for s in (list(selected or []) + [f for f in force if f != "all"]) if s not in names]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; valid stages are {names}.")
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    failures = 0
    t_all = time.time()
    todo = [s for s in stages if not selected or s.name in selected]
    runnable: list[tuple[str, Stage]] = []
    rerun: set[str] = set()  # stages that run in this invocation (their dependants are stale)
    inputs: dict[str, dict[str, str]] = {}
    for i, stage in enumerate(todo, 1):
        head = f"[{i}/{len(todo)}] {stage.name}: {stage.description}"
        marker = _stage_marker(out, stage.name)
        stale = None
        if marker.exists() and "all" not in force and stage.name not in force:
            try:
                done = json.loads(marker.read_text())
                stale = _stale_reason(out, stages, stage, done, rerun) if isinstance(done, dict) else "unreadable"
            except (OSError, ValueError) as err:
                stale = f"its marker {marker} is unreadable ({err})"
            if stale is None:
                print(f"{head} -- done earlier in {done.get('seconds', 0):.1f} s, skipped (use --force {stage.name})",
                      flush=True)
                continue
        if not _module_available(stage.requires_module):
            print(f"{head} -- NOT AVAILABLE: module {stage.requires_module} is not installed; skipped", flush=True)
        else:
            if stale is not None:
                print(f"{head} -- done earlier but stale, re-running: {stale}", flush=True)
            runnable.append((head, stage))
            rerun.add(stage.name)
    # a stage starts once the stages it reads from (those that run now) have ended; the list order
    # (waves, then definition order) decides among ready ones
    pending = list(runnable)
    running: dict[str, tuple[subprocess.Popen, float, Path, Stage]] = {}
    ended: set[str] = set()
    waiting_on = {stage.name: [d for d in _dependencies(stages, stage) if d in rerun] for _, stage in runnable}
    last_status = time.time()
    while pending or running:
        while len(running) < jobs:
            ready = [item for item in pending if all(d in ended for d in waiting_on[item[1].name])]
            if not ready:
                break
            pending.remove(ready[0])
            head, stage = ready[0]
            print(head, flush=True)
            inputs[stage.name] = _begin(out, stages, stage)
            t0 = time.time()
            if stage.command is None:
                try:
                    stage.func()
                    rc = 0
                except Exception as exc:  # a failing stage is reported, later stages still get their chance
                    print(f"    stage {stage.name} raised {type(exc).__name__}: {exc}", flush=True)
                    rc = 1
                if rc:
                    failures += 1
                    print(f"    {stage.name} FAILED after {time.time() - t0:.1f} s", flush=True)
                else:
                    _finish(out, stage, time.time() - t0, inputs[stage.name])
                    print(f"    {stage.name} done in {time.time() - t0:.1f} s", flush=True)
                ended.add(stage.name)
                continue
            print("    $ " + " ".join(shlex.quote(c) for c in stage.command), flush=True)
            log = out / "logs" / f"{stage.name}.log"
            if jobs == 1:
                proc = subprocess.Popen(stage.command, cwd=str(out))
            else:
                print(f"    output: {log}", flush=True)
                with log.open("w") as fh:
                    proc = subprocess.Popen(stage.command, cwd=str(out), stdout=fh, stderr=subprocess.STDOUT)
            running[stage.name] = (proc, t0, log, stage)
        time.sleep(0.5)
        for name, (proc, t0, log, stage) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            seconds = time.time() - t0
            if rc != 0:
                failures += 1
                hint = f"; see {log}" if jobs > 1 else ""
                print(f"    {name} FAILED (exit {rc}) after {seconds:.1f} s{hint}", flush=True)
            else:
                _finish(out, stage, seconds, inputs[name])
                print(f"    {name} done in {seconds:.1f} s", flush=True)
            ended.add(name)
        if jobs > 1 and running and time.time() - last_status >= status_every:
            last_status = time.time()
            for name, (_, t0, log, _) in running.items():
                print(f"    .. {name} ({time.time() - t0:.0f} s): {_last_line(log)}", flush=True)
    print(f"pipeline finished in {time.time() - t_all:.1f} s with {failures} failed stage(s); outputs in {out}")
    return failures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    root = _repo_root()
    p = argparse.ArgumentParser(prog="python -m monai_cft.pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quick", choices=("quick", "paper"), help="sCPR and network size preset")
    p.add_argument("--num-cases", type=count_arg(1), default=600, help="number of synthetic cases to generate")
    p.add_argument("--seed", type=count_arg(0), default=0)
    p.add_argument("--workers", type=count_arg(0), default=os.cpu_count() or 1)
    p.add_argument("--device", default="", help="torch device for the bundle stages (default: cuda if available, else cpu)")
    p.add_argument("--data-dir", default=str(root / "data"), help="where raw/ and scpr_<preset>/ are written")
    p.add_argument("--output-dir", default=str(root / "outputs"), help="models, logs, evaluation and report.md")
    p.add_argument("--bundle-dir", default=str(root / "bundle"))
    p.add_argument("--epochs", default=json.dumps(QUICK_EPOCHS),
                   help="JSON dict of max_epochs per stage kind (segmentor, segmentor_eval, regressor, dscm, finetune); the default "
                        "is the CPU schedule of the quick preset, '{}' keeps the bundle configs' own values")
    p.add_argument("--finetune-lr", type=number_arg(0.0), default=QUICK_FINETUNE_LR,
                   help="learning rate of the CFT stages (0 keeps finetune.json's own value)")
    p.add_argument("--jobs", type=count_arg(1), default=os.cpu_count() or 1,
                   help="stages of one wave run at once (default: the number of cores)")
    p.add_argument("--torch-threads", type=count_arg(1), default=None,
                   help="torch threads per bundle stage (default: 1 when --jobs > 1, else torch's default)")
    p.add_argument("--nproc", type=count_arg(1), default=1,
                   help="processes per training stage (torchrun, configs/multi_gpu.json; each process takes the "
                        "configs' batch_size, so the global batch is nproc x batch_size)")
    p.add_argument("--stages", nargs="*", default=None, help="run only these stages (default: all)")
    p.add_argument("--force", nargs="*", default=[], help="re-run these finished stages ('all' for every stage)")
    p.add_argument("--list", action="store_true", help="list the stages and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.torch_threads is None:
        args.torch_threads = 1 if args.jobs > 1 else 0
    if args.num_cases < 10:
        raise SystemExit(f"--num-cases must be at least 10 (train/validation/test splits), got {args.num_cases}.")
    stages = build_stages(args)
    if args.list:
        for s in stages:
            print(f"{s.name:22s} {s.description}")
        return 0
    out = Path(args.output_dir).resolve()
    failures = run_pipeline(stages, out, args.stages, args.force, jobs=args.jobs)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
