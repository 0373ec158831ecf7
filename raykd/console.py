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
import re
import shutil
import sys
import threading
import traceback
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
# user errors


class UserError(Exception):
    """Bad input the user can fix; ``raykd`` prints ``error: <message>`` and exits 2."""


USER_ERROR_TYPES = (
    "raykd.config:ConfigError",
    "raykd.soft_labels.cache:CacheError",
    "raykd.soft_labels.schema:SchemaError",
    "raykd.soft_labels.join:CacheJoinError",
    "raykd.students.build:VocabularyMismatchError",
    "raykd.train.trainer:InsufficientResourcesError",
    "raykd.methods:UnknownMethodError",
    "raykd.losses.registry:UnknownLossError",
)
"""``module:class`` of the exceptions that are always user errors, wherever they are raised.
Plain ``ValueError`` / ``FileNotFoundError`` are user errors only where :func:`user_errors`
marks them (the plan, before any compute), so a bug deep in training still shows as one."""

_MARK = "raykd_user_error"


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Only modules already imported can have raised their errors: nothing is imported here.
    types: list[type[BaseException]] = [UserError]
    for spec in USER_ERROR_TYPES:
        module, _, name = spec.partition(":")
        if module in sys.modules and isinstance(t := getattr(sys.modules[module], name, None), type):
            types.append(t)
    return tuple(types)


def is_user_error(e: BaseException) -> bool:
    """True for a :data:`USER_ERROR_TYPES` error, a :class:`UserError`, or an error marked by
    :func:`user_errors`."""
    return getattr(e, _MARK, False) or isinstance(e, _user_error_types())


@contextmanager
def user_errors(*types: type[BaseException]) -> Iterator[None]:
    """Mark exceptions of ``types`` raised inside the block as user errors (type and message
    unchanged, so callers that catch e.g. ``ValueError`` still do)."""
    try:
        yield
    except types as e:
        setattr(e, _MARK, True)
        raise


def error_message(e: BaseException) -> str:
    """What ``error:`` says: the message (KeyError's without its quotes), else the type's name."""
    text = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return text.strip() or type(e).__name__


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


_settings: _Settings | None = None
"""Set by :func:`run` for the duration of one command; None for library use."""


FILE_ONLY = ("ray.data._internal.progress",)
"""Loggers whose warnings go to the log file only: Ray Data's notes about its own progress bars,
which the CLI turns off (raykd shows its own)."""

ADVISORIES = ("of memory per worker", "To disable issue detection")
"""Ray Data's periodic advisories (every 30 s, a dozen lines each: the labelers' memory use, and
the line that counts them): log file only. Warnings about the user's run still show."""


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
        if record.name.startswith(FILE_ONLY) or any(a in message for a in ADVISORIES):
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
    return settings


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
    if _settings is None or _settings.verbose:
        return {}
    _route_ray_loggers(_settings)
    return {"log_to_driver": False}


def ray_connected(started: bool) -> None:
    """Called once Ray is initialised (by :func:`raykd.cluster.connect`): under the quiet CLI,
    route Ray's driver-side loggers, turn Ray Data's progress bars off, and link Ray's session
    logs to ``<log dir>/ray`` (``started``: this process owns that local Ray, so the logs are
    copied there at the end of the command)."""
    s = _settings
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


# ---------------------------------------------------------------------------------------------
# progress bars


class _Tally:
    """Ray actor: counts per key, plus the latest extra numbers, for the driver's bars."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.extra: dict[str, dict[str, float]] = {}

    def add(self, key: str, n: float, extra: dict[str, float]) -> None:
        self.counts[key] = self.counts.get(key, 0) + n
        sums = self.extra.setdefault(key, {})
        for k, v in extra.items():
            sums[k] = sums.get(k, 0) + v

    def set(self, key: str, n: float, extra: dict[str, float]) -> None:
        self.counts[key] = n
        if extra:
            self.extra[key] = dict(extra)

    def read(self, key: str) -> tuple[float, dict[str, float]]:
        return self.counts.get(key, 0), self.extra.get(key, {})


_tally: tuple[Any, Any] | None = None  # (Ray job id, actor handle)


def _tally_actor() -> Any:
    """The counter actor of this Ray job (started on first use, 0 CPUs), None without Ray."""
    global _tally
    import ray

    if not ray.is_initialized():
        return None
    job = ray.get_runtime_context().get_job_id()
    if _tally is None or _tally[0] != job:
        _tally = (job, ray.remote(num_cpus=0, max_concurrency=4)(_Tally).remote())
    return _tally[1]


@dataclass(frozen=True)
class ProgressSink:
    """Where Ray tasks and actors report progress to a bar on the driver (picklable; calls
    return at once). A sink without a bar does nothing."""

    tally: Any
    key: str

    def add(self, n: float = 1, **extra: float) -> None:
        """Count ``n`` more units (and add ``extra`` numbers, e.g. ``tokens=...``)."""
        if self.tally is not None:
            self.tally.add.remote(self.key, n, extra)

    def set(self, n: float, **extra: float) -> None:
        """Set the count to ``n`` (and show ``extra``, e.g. the latest loss)."""
        if self.tally is not None:
            self.tally.set.remote(self.key, n, extra)


class _Bar:
    """A tqdm bar on stderr and a thread that polls its :class:`ProgressSink`'s counts."""

    POLL_S = 1.0

    def __init__(self, desc: str, total: float | None, unit: str):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=tty, leave=True,
                        mininterval=0.5 if tty else 10.0, smoothing=0.1)
        self.sink = ProgressSink(_tally_actor(), f"{desc}-{id(self)}")
        self.rate_of: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"raykd-progress-{desc}", daemon=True)
        if self.sink.tally is not None:
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self.refresh()

    def refresh(self) -> None:
        import ray

        try:
            n, extra = ray.get(self.sink.tally.read.remote(self.sink.key), timeout=30)
        except Exception:  # noqa: BLE001 - Ray shutting down or busy: the bar just waits
            return
        self.show(n, extra)

    def show(self, n: float, extra: dict[str, Any]) -> None:
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        if extra:
            self.bar.set_postfix_str(self.postfix(extra), refresh=False)

    def postfix(self, extra: dict[str, Any]) -> str:
        parts = []
        for k, v in sorted(extra.items(), key=lambda kv: kv[0] != "loss"):  # the total loss first
            if isinstance(v, float) and not v.is_integer():
                parts.append(f"{k}={v:.4g}")
            else:
                parts.append(f"{k}={int(v):,}")
            if k == self.rate_of:
                parts[-1] += f" ({v / max(self.bar.format_dict['elapsed'], 1e-9):,.0f}/s)"
        return " ".join(parts)

    def close(self, final: dict[str, Any] | None = None, done: float | None = None) -> None:
        """Stop polling, show the last counts (``done``: the final count, known to the caller,
        since a worker's last report may still be on its way) and ``final`` numbers."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.sink.tally is not None:
            self.refresh()
        if done is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if final:
            self.bar.set_postfix_str(self.postfix(final), refresh=False)
        self.bar.close()


_open_bars: list[_Bar] = []
_named_bars: dict[str, _Bar] = {}


@contextmanager
def progress(desc: str, total: float | None, unit: str, rate_of: str | None = None) -> Iterator[ProgressSink]:
    """A progress bar on the driver for the block; yields the sink that Ray workers report to.

    Inside another :func:`progress` block, no second bar opens: the outer bar is re-labelled
    ``desc`` and the sink counts into it (e.g. both splits of a labeling run on one bar).

    Args:
        desc: what is counted, shown before the bar.
        total: the count when done (None: unknown).
        unit: the unit shown (``doc``, ``step``).
        rate_of: an extra number reported with the counts whose rate per second to show too.
    """
    if _open_bars:
        outer = _open_bars[-1]
        outer.bar.set_description_str(desc)
        yield outer.sink
        return
    bar = _Bar(desc, total, unit)
    bar.rate_of = rate_of
    _open_bars.append(bar)
    done = None
    try:
        yield bar.sink
        done = total  # the block finished: everything was counted
    finally:
        _open_bars.remove(bar)
        bar.close(done=done)


def train_progress(name: str, total_steps: int) -> Any:
    """Open the bar of student ``name``'s training and return the Ray Train callback that feeds
    it from the metrics workers report (``ray.train.report``: ``step`` and loss terms); close it
    with :func:`finish_progress`."""
    from ray.train import UserCallback

    finish_progress(name)
    bar = _named_bars[name] = _Bar(name, total_steps, "step")
    sink = bar.sink

    class StepProgress(UserCallback):  # runs on the Ray Train controller
        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = metrics[0] if metrics else {}
            if "step" in row:
                terms = {k: float(v) for k, v in row.items()
                         if k not in ("step", "done", "lr", "temperature") and isinstance(v, (int, float))}
                sink.set(row["step"], **terms)

    return StepProgress()


def finish_progress(name: str, final: dict[str, Any] | None = None, steps: int | None = None) -> bool:
    """Close the bar :func:`train_progress` opened for ``name``, at ``steps`` and showing
    ``final`` numbers; False when there was none."""
    bar = _named_bars.pop(name, None)
    if bar is None:
        return False
    bar.close(final, done=steps)
    return True


def _close_bars() -> None:
    for bar in [*_open_bars, *_named_bars.values()]:
        bar.close()
    _open_bars.clear()
    _named_bars.clear()


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
    global _settings
    if _settings is not None:  # a command inside a command (a test calling cli() from a cli run)
        return _guarded(command, _settings)
    settings = _settings = _setup_logging(verbose, log_dir)
    try:
        return _guarded(command, settings)
    finally:
        _close_bars()
        try:
            _keep_ray_logs(settings)
        finally:
            _teardown_logging(settings)
            _settings = None


def _guarded(command: Callable[[], int | None], settings: _Settings) -> int:
    try:
        return command() or 0
    except KeyboardInterrupt:
        _close_bars()
        print("error: interrupted", file=sys.stderr)
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
        print(f"error: {type(e).__name__}: {error_message(e)}\n(traceback: {where})", file=sys.stderr)
        return 1
