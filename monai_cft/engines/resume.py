"""Bit-exact resume of an ignite trainer: the random generators and the position inside the interrupted epoch.

:class:`ExactResumeMixin` gives a trainer the two event handlers and the random-state helpers; the
trainer registers ``_on_epoch_started`` (``Events.EPOCH_STARTED``) and ``_on_get_batch_started``
(``Events.GET_BATCH_STARTED``), stores :meth:`_rng_state` in its resume file and, when it loads one,
sets ``_resume_rng`` (the saved states) and ``_resume_skip`` (batches of the interrupted epoch
already used). On resume the interrupted epoch gets the shuffle it had (torch's state at its start),
its used batches are skipped, and the generators continue exactly as they were at the save, so a
resumed run on the CPU equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

__all__ = ["ExactResumeMixin"]


class ExactResumeMixin:
    """Random-state bookkeeping of an exactly resumable trainer (see the module docstring)."""

    _resume_rng: Mapping[str, Any] | None = None
    _resume_skip: int = 0
    _epoch_rng: torch.Tensor | None = None

    def _on_epoch_started(self, engine: Engine) -> None:
        rng = self._resume_rng
        if rng is not None and self._resume_skip:
            torch.set_rng_state(rng["epoch"])  # the interrupted epoch: the shuffle it had before the interruption
        elif rng is not None:  # resumed at an epoch boundary: the generators as they were at the save
            self._set_rng(rng)
            self._resume_rng = None
        self._epoch_rng = torch.get_rng_state()

    def _on_get_batch_started(self, engine: Engine) -> None:
        if self._resume_rng is None:
            return
        rng, self._resume_rng = self._resume_rng, None
        it = getattr(self, "_dataloader_iter", None)
        for _ in range(self._resume_skip):  # the batches the interrupted run had already used this epoch
            next(it)
        self._resume_skip = 0
        self._set_rng(rng)  # then the generators exactly as they were at the save

    @staticmethod
    def _set_rng(rng: Mapping[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy"][0].numpy().astype(np.uint32), int(rng["numpy"][1]),
                             int(rng["numpy"][2]), float(rng["numpy"][3])))
        random.setstate((int(rng["python"][0]), tuple(int(v) for v in rng["python"][1]),
                         None if rng["python"][2] is None else float(rng["python"][2])))

    def _rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_state = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "epoch": self._epoch_rng,
            "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                      float(np_state[4])],
            "python": [int(py_state[0]), list(py_state[1]), py_state[2]],
        }
