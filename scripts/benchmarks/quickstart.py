"""Benchmark section ``quickstart``: stage times of ``python -m monai_cft.pipeline``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .harness import machine_description, markdown_table

# --------------------------------------------------------------------------------------------
# section: the quickstart pipeline's stage times
# --------------------------------------------------------------------------------------------


def pipeline_stages(output_dir: Path) -> dict[str, int | None]:
    """Stage name -> wave (stages of one wave may run concurrently) of ``python -m monai_cft.pipeline``, in
    running order ({} if it cannot be imported)."""
    try:
        from monai_cft.pipeline import build_stages, parse_args

        return {s.name: getattr(s, "wave", None) for s in build_stages(parse_args(["--output-dir", str(output_dir)]))}
    except (ImportError, SystemExit, ValueError):
        return {}


def read_stage_times(output_dir: Path) -> list[dict[str, Any]]:
    """The ``<output_dir>/stages/*.json`` markers of ``python -m monai_cft.pipeline``, in pipeline order
    (stages the pipeline does not list, e.g. from another version, come last by finishing time). Each
    gets ``"started"`` / ``"ended"`` (``datetime``) when its ``"finished"`` time stamp can be read."""
    import datetime

    stage_dir = Path(output_dir) / "stages"
    markers = []
    for path in sorted(stage_dir.glob("*.json")) if stage_dir.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"stage marker {path} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or not isinstance(record.get("seconds"), (int, float)):
            raise ValueError(f"stage marker {path} has no numeric 'seconds': {record!r}")
        record.setdefault("stage", path.stem)
        try:
            record["ended"] = datetime.datetime.fromisoformat(str(record["finished"]))
            record["started"] = record["ended"] - datetime.timedelta(seconds=float(record["seconds"]))
        except (KeyError, ValueError):
            pass
        markers.append(record)
    rank = {name: i for i, name in enumerate(pipeline_stages(output_dir))}
    return sorted(markers, key=lambda m: (rank.get(m["stage"], len(rank)), str(m.get("finished", ""))))


def _command_option(command: Any, option: str) -> str | None:
    if isinstance(command, list) and option in command:
        i = command.index(option)
        return str(command[i + 1]) if i + 1 < len(command) else None
    return None


def bench_quickstart(args: argparse.Namespace) -> str:
    """Stage times of the last ``python -m monai_cft.pipeline`` run (its ``stages/*.json`` markers)."""
    out = Path(args.outputs_dir)
    stages = read_stage_times(out)
    if not stages:
        return (f"The quickstart has not been run: no stage markers under `{out / 'stages'}`. Run "
                "`python -m monai_cft.pipeline` (see the README), then "
                "`python scripts/benchmark.py --only quickstart --write-docs docs/benchmarks.md`.")
    waves = pipeline_stages(out)
    total = sum(float(s["seconds"]) for s in stages)
    rows = [[f"`{s['stage']}`", "" if waves.get(s["stage"]) is None else waves[s["stage"]],
             f"{float(s['seconds']):.1f}", f"{float(s['seconds']) / 60:.1f}",
             s["started"].strftime("%H:%M:%S") if "started" in s else "", s.get("finished", "")] for s in stages]
    rows.append(["**sum of the stages**", "", f"**{total:.1f}**", f"**{total / 60:.1f}**", "", ""])
    span_text = ""
    if all("started" in s for s in stages):
        intervals = sorted((s["started"], s["ended"]) for s in stages)
        busy, (lo, hi) = 0.0, intervals[0]
        for a, b in intervals[1:]:  # union of the stages' intervals
            if a > hi:
                busy, lo = busy + (hi - lo).total_seconds(), a
            hi = max(hi, b)
        busy += (hi - lo).total_seconds()
        span = (max(s["ended"] for s in stages) - intervals[0][0]).total_seconds()
        rows.append(["**wall clock with a stage running**", "", f"**{busy:.1f}**", f"**{busy / 60:.1f}**", "", ""])
        rows.append(["wall clock, first start to last finish", "", f"{span:.1f}", f"{span / 60:.1f}", "", ""])
        span_text = (
            f" Stages of one wave run concurrently, so the wall-clock time during which at least one stage was "
            f"running ({busy / 60:.1f} min, the union of the stages' intervals) is "
            f"{'shorter' if busy < total else 'not shorter'} than their sum ({total / 60:.1f} min)"
            + (f"; the span from the first start to the last finish ({span / 60:.1f} min) also counts "
               f"{(span - busy) / 60:.1f} min without any stage running (e.g. between separate runs of stages)."
               if span - busy > 1.0 else ".")
        )
    details = []
    for s in stages:
        for option, what in (("--num-cases", "cases"), ("--preset", "preset"), ("--workers", "workers")):
            value = _command_option(s.get("command"), option)
            if value is not None and f"{what} {value}" not in details:
                details.append(f"{what} {value}")
    missing = [name for name in waves if name not in {s["stage"] for s in stages}]
    text = (
        f"Stage times of `python -m monai_cft.pipeline` read from `{out / 'stages'}/*.json` "
        f"({', '.join(details) or 'settings not recorded'}), tabulated {time.strftime('%Y-%m-%d %H:%M %Z')} on "
        f"{machine_description()} (the load average is of the moment of tabulation, not of the run).\n\n"
        f"{markdown_table(['stage', 'wave', 'seconds', 'minutes', 'started (computed)', 'finished'], rows)}\n\n"
        "Each stage's wall time as the pipeline recorded it (a stage skipped because it had finished in an "
        "earlier run keeps its earlier time); started = finished - seconds." + span_text
    )
    if missing:
        text += f" Stages without a marker (not run, or failed): {', '.join(f'`{m}`' for m in missing)}."
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quickstart section")
    group.add_argument("--outputs-dir", default=str(Path(__file__).resolve().parents[2] / "outputs"),
                       help="the pipeline's --output-dir (default: outputs/ of the repository)")
