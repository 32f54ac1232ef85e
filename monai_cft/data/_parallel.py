"""A process pool map with a progress bar, shared by the dataset writer and the preparation step."""

from __future__ import annotations

import functools
import importlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["default_workers", "parallel_map"]

T = TypeVar("T")


def default_workers() -> int:
    """Number of CPU cores this process may use (``sched_getaffinity`` where available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return max(1, os.cpu_count() or 1)


def _init_worker(preload: tuple[str, ...] = ()) -> None:
    """Worker initializer: one intra-op thread per process (the processes provide parallelism),
    then import ``preload`` modules so that every worker pays its start-up cost up front.

    The thread variables are read by OpenMP / BLAS libraries when they load, i.e. by torch when a
    worker first imports it; torch is not imported here unless a preloaded module does.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    for module in preload:
        importlib.import_module(module)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def parallel_map(
    fn: Callable[[Any], T],
    items: Sequence[Any],
    workers: int | None = None,
    desc: str | None = None,
    progress: bool = True,
    chunksize: int = 1,
    preload: tuple[str, ...] = (),
) -> Iterator[T]:
    """Apply ``fn`` to every item, in ``workers`` processes, yielding results in input order.

    ``workers <= 1`` runs in this process (easy debugging, no pickling). Processes are started
    with ``spawn`` (safe with torch and threads); ``fn`` must be importable (module level).

    Args:
        fn: the function; exceptions propagate to the caller (remaining work is cancelled).
        items: the inputs.
        workers: number of processes; ``None`` = :func:`default_workers`.
        desc: progress-bar label.
        progress: show a tqdm progress bar.
        chunksize: items sent to a worker at a time.
        preload: modules every worker imports when it starts.
    """
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}.")
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="case", dynamic_ncols=True)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update(1)
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx,
                                 initializer=functools.partial(_init_worker, tuple(preload))) as ex:
            try:
                results: Iterable[T] = ex.map(fn, items, chunksize=max(1, int(chunksize)))
                for result in results:
                    yield result
                    bar.update(1)
            except BaseException:
                ex.shutdown(wait=False, cancel_futures=True)  # fail fast: drop the queued cases
                raise
    finally:
        bar.close()
