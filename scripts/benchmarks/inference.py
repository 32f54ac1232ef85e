"""Benchmark section ``inference``: counterfactual inference latency per image."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .harness import (
    NO_GPU, TimeBudget, _device_settings, _settings_label, _threads_or_null, build_benchmark_dscm, command_line,
    cuda_available, fmt, machine_description, markdown_table, median, preset_geometry, run_section, table_rows,
    random_batch, thread_scaling_note, time_calls, variables_and_ranges,
)

# --------------------------------------------------------------------------------------------
# section: counterfactual inference latency
# --------------------------------------------------------------------------------------------


def predict_call_seconds(seconds: dict[tuple[int, int], float], batch: int, particles: int) -> float | None:
    """Predict a ``counterfactual`` call's seconds from the measured ``{(batch, particles): seconds}``:
    from the largest measured configuration with no larger batch and no more particles, scaled by
    ``batch`` and ``particles`` (both costs are at most proportional); ``None`` if there is none."""
    smaller = [(b * p, b, p) for b, p in seconds if b <= batch and p <= particles]
    if not smaller:
        return None
    _, b, p = max(smaller)
    return seconds[(b, p)] * (batch / b) * (particles / p)


def inference_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Latency of ``DeepSCM.counterfactual`` per (preset, device setting, batch, particles).

    Within a preset and setting, a configuration's time is predicted from those already measured
    (:func:`predict_call_seconds`); one predicted (with its warm-up call) not to fit ``--config-cap``
    or what is left of ``--section-budget`` is skipped and says so.
    """
    import torch

    from monai_cft.engines.common import autocast

    names, ranges = variables_and_ranges()
    target = {"lumen_mid": 0.5 * (ranges["lumen_mid"][0] + ranges["lumen_mid"][1])}
    budget = 0.0 if args.tiny else args.repeat_budget
    section = TimeBudget(args.section_budget, args.config_cap)
    batches, particle_counts = sorted(set(args.inference_batches)), sorted(set(args.particles))
    rows = []
    for preset in args.inference_presets:
        _, size = preset_geometry(preset, args.tiny)
        name = f"{preset} (tiny)" if args.tiny else preset
        for device, threads in _device_settings(args):
            label = _settings_label(device, threads)
            if device == "cuda" and not cuda_available():
                rows.append({"preset": name, "setting": label, "note": NO_GPU})
                continue
            with _threads_or_null(threads):
                torch.manual_seed(0)
                model = build_benchmark_dscm(preset, size, args.tiny).to(device).eval()
                data = random_batch(max(batches), size)
                x_all, pa_all = data["image"].to(device), data["variables"].to(device)
                seconds: dict[tuple[int, int], float] = {}
                for batch in batches:
                    x, pa = x_all[:batch], pa_all[:batch]
                    for particles in particle_counts:
                        row = {"preset": name, "setting": label, "batch": batch, "particles": particles}

                        def call(x=x, pa=pa, particles=particles) -> None:
                            with autocast(device, device == "cuda"):
                                model.counterfactual(x, pa, target, num_particles=particles)

                        # a many-particle call repeats the one-particle call's shapes: after that call
                        # (same batch) it needs no warm-up of its own
                        warm = 0 if particles > 1 and (batch, 1) in seconds else 1
                        guess = predict_call_seconds(seconds, batch, particles)
                        reason = section.skip_reason(None if guess is None else guess * (warm + 1))
                        if reason:
                            rows.append(dict(row, note=reason))
                            continue
                        print(f"[inference] {name} {label} batch {batch} particles {particles}", file=sys.stderr)
                        times = time_calls(call, device, warmup=warm, budget_s=budget, min_repeats=1)
                        seconds[(batch, particles)] = sec = median(times)
                        rows.append(dict(row, seconds=sec, repeats=len(times), ms_per_image=1000.0 * sec / batch))
    return rows


def bench_inference(args: argparse.Namespace) -> str:
    """Counterfactual inference latency per image (``DeepSCM.counterfactual``)."""
    return run_section(inference_measurements, inference_markdown, args)


def inference_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``inference`` section's markdown for the rows of :func:`inference_measurements`."""
    table = table_rows(
        rows,
        lambda r: [r["preset"], r["setting"], r["batch"], r["particles"], fmt(r["ms_per_image"], 1),
                   fmt(1000.0 * r["seconds"], 1), r["repeats"]],
        lambda r: [r["preset"], r["setting"], r.get("batch", ""), r.get("particles", ""), r["note"], "", ""])
    header = ["preset", "device", "batch", "particles", "ms / image", "ms / call (median)", "timed calls"]
    return (
        f"`{command_line(args, 'inference')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        "`DeepSCM.counterfactual(x, parents, {'lumen_mid': value}, num_particles=k)` of a randomly initialised "
        "DSCM (HVAE preset of the same name; the speed does not depend on the weights) in eval mode: "
        "normalisation, abduction of the parents' noise and counterfactual parents through the flows, then "
        "per particle one HVAE pass (posterior latents) and one decoding with the counterfactual parents; "
        "the particles' mean (and standard deviation when k > 1). ms / image = median seconds per call / "
        "batch. Calls are repeated until they took "
        f"{args.repeat_budget:g} s (at least once) after one untimed warm-up call; on the CPU a many-particle "
        "run directly follows the one-particle run of the same batch, which warms its shapes up. Configurations "
        "predicted (proportionally to batch and particles from a smaller configuration) not to fit the "
        "time limits are skipped and say so. CUDA rows: bfloat16 autocast, inputs already on the GPU."
        + thread_scaling_note(rows, ("preset", "batch", "particles"), args.threads)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference section")
    group.add_argument("--inference-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--inference-batches", nargs="+", type=int, default=[1, 32])
    group.add_argument("--particles", nargs="+", type=int, default=[1, 8])
