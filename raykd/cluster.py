"""Connecting to Ray: a running cluster when one is named, else a local one."""

from __future__ import annotations

import os

from raykd.config import RayConfig


def connect(cfg: RayConfig) -> bool:
    """Initialise Ray once per process.

    Joins ``cfg.address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``) when given, else starts a
    local Ray.

    Returns:
        True if this call started a new local Ray (the caller owns and may shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return False
    # Ray Train's worker print patch echoes every line twice on a local cluster.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The dashboard also serves the state API that Ray Train's controller polls; on a busy small
    # machine it can take longer than Ray's default 60 s to start.
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=True)
    return True
