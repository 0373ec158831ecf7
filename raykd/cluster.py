"""Connecting to Ray: a running cluster when one is named, else a local one."""

from __future__ import annotations

import os

from raykd import console
from raykd.config import RayConfig


def connect(cfg: RayConfig) -> bool:
    """Initialise Ray once per process.

    Joins ``cfg.address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``) when given, else starts a
    local Ray. Under the ``raykd`` command, Ray's own output goes to the run's log folder rather
    than the console (see :mod:`raykd.console`).

    Returns:
        True if this call started a new local Ray (the caller owns and may shut it down).
    """
    import ray

    if ray.is_initialized():
        console.ray_connected(started=False)
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **console.ray_init_options())
        console.ray_connected(started=False)
        return False
    # Ray Train's worker print patch echoes every line twice on a local cluster.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The dashboard also serves the state API that Ray Train's controller polls; on a busy small
    # machine it can take longer than Ray's default 60 s to start.
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, **console.ray_init_options())
    console.ray_connected(started=True)
    return True
