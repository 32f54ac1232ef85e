"""Benchmark section ``training``: DSCM and CFT training throughput and peak memory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .harness import (
    NO_GPU, PeakMemory, TimeBudget, _device_settings, _per_iteration_times, _settings_label, _threads_or_null,
    build_benchmark_dscm, command_line, count_parameters, cuda_available, estimate_from_other_setting, fmt,
    machine_description, markdown_table, median, preset_geometry, random_batch, run_section, table_rows,
    thread_scaling_note, variables_and_ranges,
)

# --------------------------------------------------------------------------------------------
# section: training throughput
# --------------------------------------------------------------------------------------------


def build_guidance_loss(mode: str, img_size: Sequence[int], spacing: float, variables: Any, tiny: bool = False):
    """The CFT guidance loss of ``mode`` from the package's factory
    (:func:`monai_cft.engines.guidance.build_guidance_loss`, as ``finetune.json`` builds it), around
    randomly initialised guidance networks (the bundle's UNet segmentor and parent regressor) instead
    of trained checkpoints; ``tiny`` makes them small for the tests."""
    import torch

    from monai_cft.engines.guidance import build_guidance_loss as package_guidance_loss
    from monai_cft.networks.predictors import ParentRegressor, build_segmentor
    from monai_cft.transforms.regions import RegionMasks
    from monai_cft.variables import DEFAULT_STRUCTURES

    names, ranges = variables_and_ranges()
    regressor = ParentRegressor(2, 1, len(names), **({"block_inplanes": (4, 8, 8, 8)} if tiny else {}))
    segmentor = build_segmentor(2, "unet", 1, len(DEFAULT_STRUCTURES) + 1, channels=(4, 8, 16, 16) if tiny else None,
                                img_size=tuple(img_size))
    return package_guidance_loss(
        mode, structures=DEFAULT_STRUCTURES, variables=names, ranges=ranges,
        region_masks=torch.as_tensor(RegionMasks()(torch.zeros(1, *img_size))), element_size=spacing**2,
        train_variables=variables, segmentor_network=segmentor, regressor_network=regressor)


def _train_run(kind: str, preset: str, batch: int, device: str, threads: int | None, warmup: int, iters: int,
               tiny: bool, cap_s: float = float("inf")) -> dict[str, Any]:
    """Time ``warmup + iters`` iterations of a ``DSCMTrainer`` (``kind="dscm"``) or ``CFTTrainer``
    (``kind`` a CFT mode) on one random batch (fewer, but at least two, once the timed ones took ``cap_s``);
    returns the median seconds per timed iteration, their number, peak memory and parameter counts."""
    import torch
    from ignite.engine import Events

    from monai_cft.engines.cft_trainer import CFTTrainer
    from monai_cft.engines.dscm_trainer import DSCMTrainer

    spacing, size = preset_geometry(preset, tiny)
    data = random_batch(batch, size)
    batches = [data] * (warmup + iters)
    amp = device == "cuda"
    with _threads_or_null(threads), PeakMemory(device) as mem:
        torch.manual_seed(0)
        dscm = build_benchmark_dscm(preset, size, tiny)
        if kind == "dscm":
            trainer = DSCMTrainer(device, 1, batches, dscm, epoch_length=len(batches), lr_warmup_steps=0,
                                  grad_skip=None, flow_grad_skip=None, amp=amp)
            params = {"trainable": count_parameters(dscm), "frozen": 0}
        else:
            guidance = build_guidance_loss(kind, size, spacing, data["variables"], tiny)
            trainer = CFTTrainer(device, 1, batches, dscm, kind, guidance, epoch_length=len(batches),
                                 elbo_target=1.0, grad_skip=None, checkpoint_dir=None, amp=amp)
            params = {"trainable": count_parameters(trainer.hvae), "frozen": count_parameters(guidance.network)}
        times = _per_iteration_times(trainer, device, warmup, min(2, iters), cap_s)
        skipped: list[bool] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: skipped.append(bool(e.state.output["skipped"])))
        trainer.run()
    timed = times[warmup:]
    if any(skipped[warmup:]):  # a skipped update would make the iteration cheaper than a real one
        raise RuntimeError(f"{kind} ({preset}): {sum(skipped[warmup:])} timed update(s) were skipped (non-finite "
                           "loss); the timing would not be that of a full iteration.")
    return {"seconds": median(timed), "iterations": len(timed), "peak_mib": mem.peak_mib, "memory": mem.method,
            **params}


def training_measurements(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dict per (model, preset, device setting): images/s, peak memory, parameter counts.

    Settings run one after the other (all configurations on the CPU with the first thread count, then
    the next, then CUDA). A configuration's time per iteration under a later setting is predicted from
    its time under the first one and the ratio seen on the configurations before it; one predicted
    not to fit ``--config-cap`` / ``--section-budget`` (warm-up plus two iterations) is skipped and says
    so. Timed iterations stop early (after two) once they took ``3 x --repeat-budget`` seconds.
    """
    tiny = args.tiny
    configs = [("dscm", preset) for preset in args.train_presets]
    configs += [(mode, preset) for preset in args.cft_presets for mode in args.cft_modes]
    settings = _device_settings(args)
    reference = _settings_label(*settings[0])
    budget = TimeBudget(args.section_budget, args.config_cap)
    measured: dict[Any, dict[str, float]] = {}
    rows = []
    for device, threads in settings:
        label = _settings_label(device, threads)
        if device == "cpu" or cuda_available():
            for kind, preset in dict.fromkeys(configs):  # untimed toy runs: one-time initialisations (thread
                _train_run(kind, preset, 2, device, threads, 0, 1, tiny=True)  # pools, kernels) stay out of the rows
        for kind, preset in configs:
            batch = args.train_batch if preset == "quick" else args.train_batch_paper
            batch = min(batch, 4) if tiny else batch
            row = {"model": "DSCM" if kind == "dscm" else f"CFT `{kind}`", "kind": kind,
                   "preset": f"{preset} (tiny)" if tiny else preset, "batch": batch, "setting": label,
                   "order": (configs.index((kind, preset)), settings.index((device, threads)))}
            if device == "cuda" and not cuda_available():
                rows.append(dict(row, note=NO_GPU))
                continue
            if device == "cuda":
                warmup, iters = args.cuda_warmup, args.cuda_iters
            else:
                warmup = args.train_warmup
                iters = args.train_iters if preset == "quick" else args.train_iters_paper
            warmup, iters = (1, 2) if tiny else (warmup, iters)
            guess = estimate_from_other_setting(measured, (kind, preset), label, reference) if device == "cpu" else None
            reason = budget.skip_reason(None if guess is None else guess[0] * (warmup + min(2, iters)))
            if reason:
                if guess is not None:
                    reason += f" ({guess[0]:.1f} s / iteration: {guess[1]:.1f}x its {reference} time)"
                rows.append(dict(row, note=reason))
                continue
            print(f"[training] {row['model']} {preset} batch {batch} {label}: {warmup} + {iters} iterations",
                  file=sys.stderr)
            res = _train_run(kind, preset, batch, device, threads, warmup, iters, tiny, 3.0 * args.repeat_budget)
            measured.setdefault((kind, preset), {})[label] = res["seconds"]
            rows.append(dict(row, **res, images_per_s=batch / res["seconds"]))
    return sorted(rows, key=lambda r: r["order"])


def bench_training(args: argparse.Namespace) -> str:
    """Training throughput (images/s) and peak memory of the DSCM and of the three CFT modes."""
    return run_section(training_measurements, training_markdown, args)


def training_markdown(rows: list[dict[str, Any]], args: argparse.Namespace, machine: str = "") -> str:
    """The ``training`` section's markdown for the rows of :func:`training_measurements`."""
    table = table_rows(
        rows,
        lambda r: [r["model"], r["preset"], r["batch"], r["setting"], fmt(r["images_per_s"]),
                   f"{1000.0 * r['seconds']:.0f}", f"{r['iterations']}", fmt(r["peak_mib"], 0),
                   f"{r['trainable'] / 1e6:.3f} M" + (f" (+{r['frozen'] / 1e6:.3f} M frozen)" if r["frozen"] else "")],
        lambda r: [r["model"], r["preset"], r["batch"], r["setting"], r["note"], "", "", "", ""])
    header = ["model", "preset", "batch", "device", "images/s", "ms / iteration (median)", "timed iterations",
              "peak memory (MiB)", "parameters trained"]
    method = next((r["memory"] for r in rows if r.get("memory") and "CUDA" not in r["setting"]), "")
    return (
        f"`{command_line(args, 'training')}` on {machine or machine_description()}.\n\n"
        f"{markdown_table(header, table)}\n\n"
        "Iterations of the real engines on one random batch (images uniform in [-1, 1], variables uniform "
        "in plausible ranges; the speed does not depend on the values), randomly initialised networks: "
        "**DSCM** = `monai_cft.engines.dscm_trainer.DSCMTrainer` (`schedule='joint'`: flows' NLL and the HVAE's "
        "negative ELBO, backward, gradient clipping, both AdamW steps, EMA update of the whole DeepSCM); "
        "**CFT** = `monai_cft.engines.cft_trainer.CFTTrainer` (factual HVAE pass with latents, one "
        "intervention per image through the frozen flows, counterfactual decoding, the frozen guidance "
        "network on `x_cf`, constrained-ELBO loss, backward into the HVAE, AdamW + Lagrange multiplier "
        "steps, EMA), guidance networks as `finetune.json` builds them (`reg`: `ParentRegressor`; `seg` / "
        "`pos_seg`: the guidance UNet, without / with the three region masks). Gradient skipping is "
        "switched off (`grad_skip=None`) so that every timed iteration does the full update. Each "
        "iteration is timed from Ignite's `ITERATION_STARTED` to `ITERATION_COMPLETED` (batch fetching "
        f"excluded) after {args.train_warmup} untimed warm-up iteration(s) ({args.cuda_warmup} on CUDA); up to "
        f"{args.train_iters} (quick) / {args.train_iters_paper} (paper) / {args.cuda_iters} (CUDA) timed iterations, "
        f"fewer (but two) once they took {3 * args.repeat_budget:g} s; images/s = batch / median seconds per "
        "iteration. CPU rows set `torch.set_num_threads`; configurations predicted (from the ratio to the "
        "first thread count on the rows before them) not to fit the time limits are skipped and say so. "
        f"Peak memory on the CPU: {method or 'peak RSS above entry'} (`ru_maxrss`, after returning free heap "
        "memory to the OS and resetting the high-water mark through `/proc/self/clear_refs`): models, EMA "
        "copy, optimizer states and activations, not the Python / torch runtime. On CUDA: "
        "`torch.cuda.max_memory_allocated` (bfloat16 autocast, as the bundle runs it). Parameters: the "
        "trained ones (DSCM: HVAE + flows; CFT: the HVAE) and the frozen guidance network's."
        + thread_scaling_note(rows, ("kind", "preset"), args.threads)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training section")
    group.add_argument("--train-presets", nargs="+", default=["quick", "paper"], choices=["quick", "paper"])
    group.add_argument("--cft-presets", nargs="*", default=["quick"], choices=["quick", "paper"])
    group.add_argument("--cft-modes", nargs="+", default=["reg", "seg", "pos_seg"], choices=["reg", "seg", "pos_seg"])
    group.add_argument("--train-batch", type=int, default=32, help="batch size of the quick preset (default 32)")
    group.add_argument("--train-batch-paper", type=int, default=8, help="batch size of the paper preset (default 8)")
    group.add_argument("--train-warmup", type=int, default=1, help="untimed iterations on the CPU (default 1)")
    group.add_argument("--train-iters", type=int, default=5, help="timed iterations, quick preset, CPU (default 5)")
    group.add_argument("--train-iters-paper", type=int, default=3,
                       help="timed iterations, paper preset, CPU (default 3)")
    group.add_argument("--cuda-warmup", type=int, default=3, help="untimed iterations on CUDA (default 3)")
    group.add_argument("--cuda-iters", type=int, default=20, help="timed iterations on CUDA (default 20)")
