"""Connecting to Ray (a running cluster when one is named, else a local one) and starting Ray nodes
that run raykd's own Python environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping

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


def node_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a Ray node started by raykd runs in: ``env`` (default: this process's)
    with the folder of this Python interpreter first on ``PATH``.

    A node's raylet, and through it every job driver, inherits the environment of the ``ray start``
    that launched it. ``ray job submit -- python script.py`` runs ``python`` found on that ``PATH``,
    so without this a cluster started by ``.venv/bin/raykd`` (virtualenv not activated) runs its jobs
    in whatever ``python`` comes first on the user's ``PATH`` (e.g. a system Python without torch).
    ``VIRTUAL_ENV`` is set too when this interpreter runs in a virtualenv.
    """
    out = dict(os.environ if env is None else env)
    bindir = os.path.dirname(sys.executable)
    out["PATH"] = os.pathsep.join([bindir, *(p for p in out.get("PATH", "").split(os.pathsep) if p and p != bindir)])
    if sys.prefix != sys.base_prefix:
        out["VIRTUAL_ENV"] = sys.prefix
    return out


def ray_start_command(*args: str) -> list[str]:
    """``ray start ARGS`` run by this Python interpreter (not the first ``ray`` on ``PATH``), so the
    node's workers run the same interpreter and packages as raykd."""
    return [sys.executable, "-m", "ray.scripts.scripts", "start", "--disable-usage-stats", *args]


def start_node(*args: str, env: Mapping[str, str] | None = None, timeout_s: float = 300.0) -> int:
    """Start a Ray node (``ray start ARGS``, e.g. ``--head`` or ``--address=HOST:PORT``) that runs
    jobs and workers in raykd's own environment (see :func:`ray_start_command`, :func:`node_env`).

    The node's processes outlive this call and this process; they share one new process group.

    Args:
        *args: ``ray start`` options (``--head``, ``--num-cpus=2``, ``--resources={"x": 1}``, ports).
        env: base environment of the node (default: this process's); ``PATH`` is fixed up as in
            :func:`node_env`.
        timeout_s: seconds ``ray start`` may take before it is given up (it returns once the
            node's processes are up, usually in 5-30 s).

    Returns:
        The id of the node's process group: ``os.killpg(pgid, signal.SIGTERM)`` stops this node
        only (``ray stop`` stops every Ray node of the user on this machine).

    Raises:
        RuntimeError: ``ray start`` failed or timed out (the message holds the end of its output,
            e.g. a port already in use: pass other ports, or join the running cluster instead).
    """
    cmd = ray_start_command(*args)
    try:
        proc = subprocess.Popen(cmd, env=node_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {timeout_s:g} s; its output ends:\n{out[-2000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); its output ends:\n{out[-2000:]}")
    return proc.pid
