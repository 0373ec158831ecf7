"""The function Ray Train runs on each worker, as the ``TorchTrainer`` receives it.

A thin entry point: Ray pickles it by reference and Ray Train's controller unpickles it, so its
module imports nothing heavy; the worker loop (:mod:`raykd.train.worker`, torch and the student)
is imported only where it runs, in the Train workers.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Run :func:`raykd.train.worker.train_loop_per_worker` with ``config`` (see there)."""
    # lazy: the Train controller process holds this function and must not import torch for it
    from raykd.train.worker import train_loop_per_worker as run

    run(config)
