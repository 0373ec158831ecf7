"""What the ``raykd`` command shows on the console, and where everything else goes.

- :func:`run`: runs one subcommand. A *user error* (bad config, bad input found by the plan, a
  corrupt cache, a cluster too small; see :func:`is_user_error`) prints ``error: <message>`` on
  stderr and returns exit code 2, with no traceback; any other error prints its message and where
  the traceback is, and returns 1. ``verbose`` shows tracebacks.
- Logging: raykd's INFO log and Ray's driver-side logs go to ``<output-dir>/logs/raykd.log``;
  the console shows warnings only (``verbose``: everything, as Ray prints it).
- Ray: :func:`ray_init_options` and :func:`ray_connected` are the knobs
  :func:`raykd.cluster.connect` turns: workers' output stays in Ray's session logs
  (``log_to_driver=False``), which are linked, and at the end copied, to ``<output-dir>/logs/ray``;
  Ray Data's progress bars are off.
- :func:`progress`: one tqdm bar on the driver, fed from Ray tasks and actors through a
  :class:`ProgressSink` (a tiny counter actor), e.g. documents labeled or training steps reported.

Nothing here changes anything until :func:`run` (the CLI) sets it up, so library calls, tests
and job scripts that do not go through the CLI keep Ray's defaults (progress bars still show).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from raykd.console import logs
from raykd.console.errors import USER_ERROR_TYPES, UserError, error_message, is_user_error, ray_cause, user_errors
from raykd.console.logs import (LOG_FILE, RAY_LOGS, _keep_ray_logs, _Settings, _setup_logging, _teardown_logging,
                                core_worker_noise_filtered, ray_connected, ray_init_options)
from raykd.console.progress import ProgressSink, _close_bars, finish_progress, progress, progress_count, train_progress

__all__ = [
    "LOG_FILE", "RAY_LOGS", "USER_ERROR_TYPES", "ProgressSink", "UserError", "core_worker_noise_filtered", "error_message",
    "finish_progress",
    "is_user_error", "progress", "progress_count", "ray_connected", "ray_init_options", "run", "train_progress", "user_errors",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# one command


def run(command: Callable[[], int | None], *, verbose: bool = False, log_dir: Path | None = None) -> int:
    """Run one CLI command with the console set up; returns the exit code.

    Args:
        command: the subcommand; returns its exit code (None: 0).
        verbose: show everything: Ray's own console output, INFO logs, tracebacks.
        log_dir: where ``raykd.log`` and Ray's logs go (None: no log file; Ray's logs stay in
            its session folder).

    Returns:
        0 on success, 2 for a user error (``error: ...`` on stderr), 1 for any other error,
        130 when interrupted.
    """
    if logs.active is not None:  # a command inside a command (a test calling cli() from a cli run)
        return _guarded(command, logs.active)
    settings = logs.active = _setup_logging(verbose, log_dir)
    try:
        return _guarded(command, settings)
    finally:
        _close_bars()
        try:
            _keep_ray_logs(settings)
        finally:
            _teardown_logging(settings)
            logs.active = None


def _guarded(command: Callable[[], int | None], settings: _Settings) -> int:
    try:
        return command() or 0
    except KeyboardInterrupt:
        _close_bars()
        print("error: interrupted; run the same command again to resume (labeling from its ledger, training from its "
              "last checkpoint)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `raykd methods | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
        _close_bars()
        user = is_user_error(e)
        if settings.verbose:
            traceback.print_exc(file=sys.stderr)
        if user:
            if any(getattr(h, "opened", False) for h in settings.handlers):  # a run that had started: note why it ended
                log.error("%s", error_message(e), extra={"console": False})
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 2
        log.error("unexpected error: %s", error_message(e), exc_info=True, extra={"console": False})  # traceback: raykd.log
        where = f"{settings.log_dir / LOG_FILE}" if settings.log_dir is not None else "--verbose"
        print(f"error: {type(ray_cause(e)).__name__}: {error_message(e)}\n(traceback: {where})", file=sys.stderr)
        return 1
