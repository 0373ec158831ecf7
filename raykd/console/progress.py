"""Progress bars on the driver, fed from Ray tasks and actors through a tiny counter actor."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


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

    def close(self, final: dict[str, Any] | None = None, done: float | None = None, settle: bool = False) -> None:
        """Stop polling, show the last counts (``done``: the final count, known to the caller,
        since a worker's last report may still be on its way) and ``final`` numbers; ``settle``:
        the total was an estimate, and the bar ends at the count reached."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.sink.tally is not None:
            self.refresh()
        if done is not None and done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if settle:
            self.bar.total = self.bar.n
        if final:
            self.bar.set_postfix_str(self.postfix(final), refresh=False)
        self.bar.close()


_open_bars: list[_Bar] = []
_named_bars: dict[str, _Bar] = {}


@contextmanager
def progress(desc: str, total: float | None, unit: str, rate_of: str | None = None,
             estimate: bool = False) -> Iterator[ProgressSink]:
    """A progress bar on the driver for the block; yields the sink that Ray workers report to.

    Inside another :func:`progress` block, no second bar opens: the outer bar is re-labelled
    ``desc`` and the sink counts into it (e.g. both splits of a labeling run on one bar).

    Args:
        desc: what is counted, shown before the bar.
        total: the count when done (None: unknown).
        unit: the unit shown (``doc``, ``step``).
        rate_of: an extra number reported with the counts whose rate per second to show too.
        estimate: ``total`` is an expectation (e.g. the documents a hash split keeps): when the
            block finishes, the bar ends at the count reached instead.
    """
    if _open_bars:
        outer = _open_bars[-1]
        outer.bar.set_description_str(desc)
        yield outer.sink
        return
    bar = _Bar(desc, total, unit)
    bar.rate_of = rate_of
    _open_bars.append(bar)
    finished = False
    try:
        yield bar.sink
        finished = True  # everything was counted
    finally:
        _open_bars.remove(bar)
        bar.close(done=total if finished and not estimate else None, settle=finished and estimate)


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


def progress_count(name: str) -> float | None:
    """The count shown by the bar :func:`train_progress` opened for ``name`` (None: no such bar)."""
    bar = _named_bars.get(name)
    return None if bar is None else bar.bar.n


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
