"""Where output goes: raykd's INFO log and Ray's driver-side logs to ``<output-dir>/logs/raykd.log``,
warnings to the console, Ray's own session logs linked (and at the end copied) to
``<output-dir>/logs/ray``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_FILE = "raykd.log"
RAY_LOGS = "ray"
"""Under the log folder, one folder per Ray session: Ray's own logs (workers' stdout/stderr,
Serve, Ray Data, Ray Train, raylet, GCS)."""



# ---------------------------------------------------------------------------------------------
# logging


@dataclass
class _Settings:
    verbose: bool
    log_dir: Path | None
    handlers: list[logging.Handler] = field(default_factory=list)
    env: dict[str, str | None] = field(default_factory=dict)
    ray_owner: bool = False
    """True when this process started the local Ray whose logs are linked under ``log_dir``."""
    ray_logs: Path | None = None
    """``<log dir>/ray/<Ray session>``: a link to Ray's session logs while Ray runs."""
    restore: list[Callable[[], None]] = field(default_factory=list)
    """Undo what was changed in Ray's logging and Ray Data's context (a Ray that outlives the
    command, e.g. a test's, gets its settings back)."""


active: _Settings | None = None
"""Set by :func:`run` for the duration of one command; None for library use."""


FILE_ONLY = ("ray.data._internal.progress",)
"""Loggers whose warnings go to the log file only: Ray Data's notes about its own progress bars,
which the CLI turns off (raykd shows its own)."""

ADVISORIES = ("of memory per worker", "To disable issue detection")
"""Ray Data's periodic advisories (every 30 s, a dozen lines each: the labelers' memory use, and
the line that counts them): log file only. Warnings about the user's run still show."""

RAY_INTERNAL = ("`ExecutionOptions.exclude_resources` is deprecated",)
"""Deprecation warnings that Ray's own code raises against Ray (Ray Train sets Ray Data's
``exclude_resources`` for its ingest): nothing a user can change, so log file only."""


class _ConsoleHandler(logging.Handler):
    """Writes records to stderr through ``tqdm.write``, so open progress bars stay intact. Unless
    verbose, each warning shows once: repeats (the same text but for its numbers) go to the log
    file only."""

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        if self.verbose:
            return super().filter(record)
        message = record.getMessage()
        if record.name.startswith(FILE_ONLY) or any(a in message for a in (*ADVISORIES, *RAY_INTERNAL)):
            return False
        key = (record.name, re.sub(r"\d+(\.\d+)?", "#", message))
        if key in self.seen:
            return False
        self.seen.add(key)
        return super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record).rstrip(), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _LogFile(logging.FileHandler):
    """``raykd.log``, created (with its folder) by the first record, so a command that fails
    on its config leaves no folder behind."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    @property
    def opened(self) -> bool:
        return self.stream is not None


def _setup_logging(verbose: bool, log_dir: Path | None) -> _Settings:
    settings = _Settings(verbose=verbose, log_dir=log_dir)
    console = _ConsoleHandler(verbose)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"))
    settings.handlers.append(console)
    if log_dir is not None:
        file = _LogFile(log_dir / LOG_FILE)
        file.setLevel(logging.INFO)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        settings.handlers.append(file)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in settings.handlers:
        root.addHandler(h)
    logging.captureWarnings(True)  # Python warnings through the same handlers: shown, and in the file
    if not verbose:
        _hide_hf_progress_bars(settings)
        _filter_raylet_notes(settings)
    return settings


RAYLET_NOTES = ("worker processes have been started on node",)
"""Raylet warnings Ray prints on the driver's stdout (``(raylet) ...``) that raykd causes on
purpose: fractional-CPU Ray Data tasks start more workers than the node's cores (Ray's own
advice for that note: ray-project/ray#3644). Log file only; other raylet messages still show."""


class _NoteFilter:
    """``sys.stdout`` without the lines of :data:`RAYLET_NOTES` (they go to the log file)."""

    def __init__(self, stream):
        self._stream = stream
        self._dropped = False

    def write(self, text: str) -> int:
        if any(note in text for note in RAYLET_NOTES) or (self._dropped and text == "\n"):  # print(): text, then "\n"
            self._dropped = text != "\n"
            if self._dropped:
                log.info("raylet: %s", text.strip(), extra={"console": False})
            return len(text)
        self._dropped = False
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _filter_raylet_notes(settings: _Settings) -> None:
    real = sys.stdout
    sys.stdout = _NoteFilter(real)

    def undo() -> None:
        if isinstance(sys.stdout, _NoteFilter):
            sys.stdout = real

    settings.restore.append(undo)


def _hide_hf_progress_bars(settings: _Settings) -> None:
    """transformers' and huggingface_hub's bars (loading and writing weights): through the
    environment for what imports them later (Ray workers started here too), and through their
    switches where they are already imported."""
    _setenv(settings, "HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            settings.restore.append(hf_logging.enable_progress_bar)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            settings.restore.append(enable_progress_bars)


def _setenv(settings: _Settings, name: str, value: str) -> None:
    if name not in os.environ:
        settings.env[name] = None
        os.environ[name] = value


def _teardown_logging(settings: _Settings) -> None:
    for undo in reversed(settings.restore):
        undo()
    root = logging.getLogger()
    for h in settings.handlers:
        root.removeHandler(h)
        h.close()
    logging.captureWarnings(False)
    for name, old in settings.env.items():
        if old is None:
            os.environ.pop(name, None)


RAY_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune")
"""Driver-side Ray loggers that print to the console by themselves (own handlers, no propagation)."""


def _route_ray_loggers(settings: _Settings) -> None:
    """Send Ray's driver-side log records through raykd's handlers (file: INFO, console:
    warnings) instead of Ray's own console handlers; Ray's file handlers are kept."""
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        streams = [h for h in logger.handlers
                   if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
        if not streams and logger.propagate:
            continue
        settings.restore.append(_undo_routing(logger, streams, logger.propagate))
        for h in streams:
            logger.removeHandler(h)
        logger.propagate = True


def _undo_routing(logger: logging.Logger, streams: list[logging.Handler], propagate: bool) -> Callable[[], None]:
    def undo() -> None:
        for h in streams:
            logger.addHandler(h)
        logger.propagate = propagate

    return undo


# ---------------------------------------------------------------------------------------------
# Ray


def ray_init_options() -> dict[str, Any]:
    """Extra ``ray.init`` arguments; call right before ``ray.init``. Under the quiet CLI:
    ``log_to_driver=False`` (workers' output stays in Ray's session logs), and Ray's driver
    logger already routed (its start-up lines go to the log file); nothing otherwise."""
    if active is None or active.verbose:
        return {}
    _route_ray_loggers(active)
    return {"log_to_driver": False}


def ray_connected(started: bool) -> None:
    """Called once Ray is initialised (by :func:`raykd.cluster.connect`): under the quiet CLI,
    route Ray's driver-side loggers, turn Ray Data's progress bars off, and link Ray's session
    logs to ``<log dir>/ray`` (``started``: this process owns that local Ray, so the logs are
    copied there at the end of the command)."""
    s = active
    if s is None:
        return
    s.ray_owner = s.ray_owner or started
    if not s.verbose:
        import ray.data

        try:
            import ray.serve  # noqa: F401 - configures its driver logger on import; route it too
        except ImportError:  # Serve's extra is not installed
            pass
        ctx = ray.data.DataContext.get_current()
        s.restore.append(lambda enabled=ctx.enable_progress_bars: setattr(ctx, "enable_progress_bars", enabled))
        ctx.enable_progress_bars = False
        _route_ray_loggers(s)
    if s.log_dir is not None and (logs := _ray_logs_dir()) is not None:
        s.ray_logs = s.log_dir / RAY_LOGS / logs.parent.name  # logs/ray/session_<date>_<pid>
        s.ray_logs.parent.mkdir(parents=True, exist_ok=True)
        if not s.ray_logs.exists() and not s.ray_logs.is_symlink():
            s.ray_logs.symlink_to(logs, target_is_directory=True)
        log.info("Ray's session logs: %s (linked as %s)", logs, s.ray_logs)


def _ray_logs_dir() -> Path | None:
    """The local Ray session's log folder, None when Ray runs elsewhere (a Ray Client address)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # what Ray Data uses for its own log folder
    path = Path(node.get_logs_dir_path()) if node is not None else None
    return path if path is not None and path.is_dir() else None


def _keep_ray_logs(settings: _Settings) -> None:
    """Replace the link to Ray's session logs by a copy when this process started that Ray (its
    session folder under /tmp is not kept for good); stops that Ray first so the logs are complete."""
    link = settings.ray_logs
    if link is None or not settings.ray_owner or not link.is_symlink():
        return
    import ray

    target = link.resolve()
    ray.shutdown()
    try:
        link.unlink()
        shutil.copytree(target, link, symlinks=True, ignore_dangling_symlinks=True)
    except (OSError, shutil.Error) as e:
        log.warning("could not copy Ray's logs from %s to %s: %s", target, link, e)


CORE_WORKER_NOISE = re.compile(
    rb"\[[0-9-]+ [0-9:,]+ [EW] \d+ \d+\] core_worker\.cc:\d+: Actor with class name: '[^']*' and ID: '[0-9a-f]+' "
    rb"has constructor arguments in the object store and max_restarts > 0\.[^\n]*\n")
"""The line Ray's C++ core worker writes to this process's stderr when Ray Data starts an actor
pool (its map function goes to the object store and its actors restart by default): nothing a
user can change (ray-project/ray#53727)."""


@contextmanager
def core_worker_noise_filtered() -> Iterator[None]:
    """Inside the block, drop :data:`CORE_WORKER_NOISE` from what this process writes to file
    descriptor 2 (C++ code included) and pass everything else on at once (progress bars too).
    Only under the quiet CLI; a no-op for library use and with ``--verbose``.

    A thread copies a pipe to the real stderr; on exit stderr is the real one again and the
    pipe is drained. Raykd starts no child process inside these blocks (Ray's workers are the
    raylet's children, with their own log files), so nothing outlives the pipe.
    """
    if active is None or active.verbose:
        yield
        return
    sys.stderr.flush()
    real = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def copy() -> None:
        with os.fdopen(read, "rb", buffering=0) as src:
            while chunk := src.read(65536):
                try:
                    kept = CORE_WORKER_NOISE.sub(b"", chunk)
                    if kept != chunk:
                        log.debug("dropped from stderr: %s", chunk.decode(errors="replace").strip(), extra={"console": False})
                except Exception:  # noqa: BLE001 - never lose stderr over a filter
                    kept = chunk
                os.write(real, kept)

    thread = threading.Thread(target=copy, name="raykd-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer is gone: the thread drains it and ends
        thread.join(timeout=10)
        os.close(real)
