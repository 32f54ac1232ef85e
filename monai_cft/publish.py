"""Copy the numbers of a pipeline run into the repository's docs: nothing in them is pasted by hand.

:func:`publish` (called by the pipeline's ``report`` stage when it writes to the repository's own
``outputs/``) writes

* ``docs/results.md``: the run's ``report.md`` with a header naming the commit, the machine and the
  date, and its figures copied to ``docs/figures/``;
* the block between ``<!-- results:start -->`` and ``<!-- results:end -->`` of ``README.md``: the
  headline numbers from ``summary.json``;
* the block between ``<!-- rendered-hu:start -->`` and ``<!-- rendered-hu:end -->`` of
  ``docs/data.md``: the phantoms' rendered HU table from ``eval/measurements.json``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from monai_cft.benchmark_report import format_number as _num
from monai_cft.constants import MODE_LABELS
from monai_cft.utils.io import atomic_path

__all__ = ["publish", "replace_block"]



def replace_block(text: str, name: str, body: str) -> str:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` (markers kept).

    Raises:
        ValueError: the markers are missing.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"the markers {start} ... {end} are missing.")
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text, count=1)


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _headline(summary: dict, measurements: dict | None, stage_seconds: float) -> str:
    lines = []
    if measurements and measurements.get("segmentors"):
        for role, r in measurements["segmentors"].items():
            d = r["dice"]
            lines.append(f"- {role} segmentor ({r.get('arch')}) Dice on the test split, per image: "
                         + ", ".join(f"{s} {_num(v['per_image'], 3)}" for s, v in d.items()) + ".")
    val = summary.get("benchmark_validity")
    if val:
        lines.append(f"- Benchmark validity: the ground-truth counterfactual's error is at most "
                     f"{_num(val['max_intervened_ratio'])} x the unchanged image's in the intervened cells "
                     f"(limit 0.35) and at most {_num(val['max_other_ratio'])} x in the other cells (limit 1.1).")
    gap = (summary.get("gap_closure") or {}).get("vs_no_cft")
    if gap:
        lines.append("- Gap closure vs No-CFT (median over the 9 rows; 1 = as good as the ground truth): "
                     + ", ".join(f"{MODE_LABELS.get(m, m)} {_num(v.get('median'))}" for m, v in gap.items()) + ".")
    slopes = summary.get("response_slope")
    if slopes:
        parts = []
        for src, per in slopes.items():
            vals = [v["intervened"] for v in per.values() if v.get("intervened") is not None]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                parts.append(f"{MODE_LABELS.get(src, src.replace('_', ' '))} {_num(sorted(vals)[len(vals) // 2])}")
        if parts:
            lines.append("- Response slope in the intervened region (median over the 9 rows; 1 = follows the "
                         "intervention): " + ", ".join(parts) + ".")
    if stage_seconds:
        lines.append(f"- Time of this run: {stage_seconds / 60:.1f} min from the first stage's start to the last "
                     "stage's end (every stage's time is in docs/results.md).")
    return "\n".join(lines) + "\n"


def _wall_seconds(stage_dir: Path) -> float:
    """First start to last finish of the stage markers (start = finish - seconds), in seconds."""
    spans = []
    for p in stage_dir.glob("*.json"):
        st = json.loads(p.read_text())
        try:
            end = time.mktime(time.strptime(st["finished"], "%Y-%m-%dT%H:%M:%S"))
        except (KeyError, ValueError):
            continue
        spans.append((end - float(st.get("seconds", 0.0)), end))
    return max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0


def publish(output_dir: str | os.PathLike, repo_root: str | os.PathLike) -> list[Path]:
    """Write the run's numbers into ``docs/results.md``, ``README.md`` and ``docs/data.md``; return the files."""
    out, repo = Path(output_dir), Path(repo_root)
    report = out / "report.md"
    if not report.is_file():
        raise FileNotFoundError(f"{report} does not exist: run the report stage first.")
    commit = _commit(repo)  # before any file of the repository is written
    docs = repo / "docs"
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    text = report.read_text()
    for m in re.findall(r"\]\((eval/[^)]+\.png)\)", text):
        src = out / m
        if src.is_file():
            shutil.copyfile(src, figures / src.name)
            text = text.replace(f"]({m})", f"](figures/{src.name})")
    header = (f"<!-- written by monai_cft.publish from {out}; do not edit by hand -->\n\n"
              f"_Run of commit {commit} on {platform.node() or 'this machine'} "
              f"({os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}), finished "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}._\n\n")
    written = [docs / "results.md"]
    _write(docs / "results.md", header + text.replace("# monai-cft report", "# Results on the embedded synthetic "
                                                                             "coronary data", 1))
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    meas_path = out / "eval" / "measurements.json"
    measurements = json.loads(meas_path.read_text()) if meas_path.is_file() else None
    seconds = _wall_seconds(out / "stages")
    readme = repo / "README.md"
    if readme.is_file() and "<!-- results:start -->" in readme.read_text():
        _write(readme, replace_block(readme.read_text(), "results", _headline(summary, measurements, seconds)))
        written.append(readme)
    data_md = docs / "data.md"
    if measurements and measurements.get("rendered_hu") and data_md.is_file() \
            and "<!-- rendered-hu:start -->" in data_md.read_text():
        from monai_cft.data.fidelity import hu_table_markdown

        hu = measurements["rendered_hu"]
        body = (f"Measured on {hu['n_cases']} {hu['split']} cases of the run of commit {commit}:\n\n"
                + hu_table_markdown(hu))
        _write(data_md, replace_block(data_md.read_text(), "rendered-hu", body))
        written.append(data_md)
    return written
