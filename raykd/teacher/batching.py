"""Batching across callers inside one teacher replica, with a fair share for every caller.

Concurrent calls to a replica (labelers, Train workers, Tune trials, HTTP clients) wait in one
:class:`FairBatcher`. A batch is formed from the calls that can share a forward (the same
*group*: method, ``k``, temperature, ...), taking **one call per caller per round**, round
robin, until a token or row budget is full. So a bulk labeler with 64 calls queued and an
interactive caller with one call share the next batch: the interactive call never waits behind
the labeler's backlog, only behind the batch already running (at most one forward).

How calls merge and split is the business of the :class:`Merge` of each method (see
:mod:`raykd.teacher.merges`); this module is pure asyncio and knows nothing of models.
Serve's own ``@serve.batch`` forms batches first come, first served and cannot group by
arguments or bound a batch by tokens, which is why raykd keeps this small queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One caller's request waiting in a :class:`FairBatcher`.

    Attributes:
        caller: who asked (an HTTP token's name, a run name; fairness is per caller).
        group: calls of equal groups can share one batch (e.g. ``("score", k, temperature)``).
        payload: the method's arguments, opaque to the batcher.
        rows: sequences (or prompts) this call adds to a batch.
        width: tokens per row once padded (a batch costs ``rows * max(width)`` tokens).
        mergeable: False keeps the call in a batch of its own (e.g. seeded sampling, whose
            random draws would change with the batch).
        priority: calls of the highest priority queued form the next batch among themselves
            (round robin between their callers), without bulk calls of lower priority filling
            it up: an interactive caller (an on-policy Train worker, a notebook) then waits for
            at most the batch already running plus its own small one.
    """

    caller: str
    group: Hashable
    payload: Any
    rows: int
    width: int
    mergeable: bool = True
    priority: int = 0
    future: asyncio.Future | None = None
    queued_at: float = field(default_factory=time.monotonic)


class FairBatcher:
    """A per-replica queue that forms batches across callers, round robin between callers.

    Args:
        run_batch: ``run_batch(group, payloads) -> results``, called in a worker thread with the
            payloads of one batch (all of one group); returns one result per payload, in order.
            If it raises, each call of the batch is run again alone, so one bad call fails only
            its own caller.
        max_batch_tokens: most padded tokens (``rows * max(width)``) in one batch; a single call
            larger than this still runs, alone.
        max_batch_rows: most rows in one batch.
        batch_wait_s: how long the first call of a batch waits for others to join (seconds);
            0 runs whatever is queued at once.

    Raises:
        ValueError: a budget below 1 or a negative wait.
    """

    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], *, max_batch_tokens: int,
                 max_batch_rows: int, batch_wait_s: float):
        if max_batch_tokens < 1 or max_batch_rows < 1 or batch_wait_s < 0:
            raise ValueError(f"need max_batch_tokens >= 1, max_batch_rows >= 1 and batch_wait_s >= 0, got "
                             f"{max_batch_tokens}, {max_batch_rows}, {batch_wait_s}")
        self.run_batch = run_batch
        self.max_batch_tokens, self.max_batch_rows, self.batch_wait_s = max_batch_tokens, max_batch_rows, batch_wait_s
        self.queues: OrderedDict[str, deque[Call]] = OrderedDict()  # caller -> its calls, FIFO
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.served: dict[str, int] = {}  # caller -> when one of its calls was last taken (a pop counter)
        self._taken = 0

    def pending(self) -> int:
        """Calls waiting (not yet in a running batch)."""
        return sum(len(q) for q in self.queues.values())

    async def submit(self, call: Call) -> Any:
        """Queue ``call`` and wait for its result.

        Raises:
            Exception: what ``run_batch`` raised for this call alone.
            asyncio.CancelledError: the caller went away; a call not yet in a batch is dropped
                from the queue (its work is never done).
        """
        call.future = asyncio.get_running_loop().create_future()
        self.queues.setdefault(call.caller, deque()).append(call)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())
        try:
            return await call.future
        except asyncio.CancelledError:
            self._drop(call)
            raise

    def _drop(self, call: Call) -> None:
        q = self.queues.get(call.caller)
        if q is not None and call in q:
            q.remove(call)
            if not q:
                del self.queues[call.caller]

    async def _loop(self) -> None:
        while True:
            if not self.pending():
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather()
            batch = self.take()
            if batch:
                await self._run(batch)

    async def _gather(self) -> None:
        """Wait up to ``batch_wait_s`` after the oldest queued call, or until a batch is full."""
        oldest = min(q[0].queued_at for q in self.queues.values())
        while (left := oldest + self.batch_wait_s - time.monotonic()) > 0 and not self._full():
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=left)
            except TimeoutError:
                break

    def _full(self) -> bool:
        rows = sum(c.rows for q in self.queues.values() for c in q)
        return rows >= self.max_batch_rows

    def take(self) -> list[Call]:
        """Remove and return the next batch: one call per caller per round while the budgets
        allow, callers in round-robin order (the one served longest ago first, then the one
        waiting longest); the batch's group is the first caller's.

        A caller whose call did not fit a batch is first in line for the next one, so a bulk
        caller that fills every batch on its own cannot starve another caller. Only callers whose
        next call has the highest priority queued take part (see :class:`Call`).
        """
        top = max(q[0].priority for q in self.queues.values())
        heads = sorted(((c, q) for c, q in self.queues.items() if q[0].priority == top),
                       key=lambda kv: (self.served.get(kv[0], -1), kv[1][0].queued_at))
        first = heads[0][1][0]
        if not first.mergeable:
            return [self._pop(first.caller)]
        group, order = first.group, [caller for caller, _ in heads]
        batch: list[Call] = []
        rows = width = 0
        progress = True
        while progress:
            progress = False
            for caller in order:
                q = self.queues.get(caller)
                if not q or q[0].group != group or not q[0].mergeable or q[0].priority != top:
                    continue
                c = q[0]
                w = max(width, c.width)
                if batch and (rows + c.rows > self.max_batch_rows or (rows + c.rows) * w > self.max_batch_tokens):
                    continue
                batch.append(self._pop(caller))
                rows, width, progress = rows + c.rows, w, True
        return batch

    def _pop(self, caller: str) -> Call:
        self._taken += 1
        self.served[caller] = self._taken
        q = self.queues[caller]
        c = q.popleft()
        if not q:
            del self.queues[caller]
        return c

    async def _run(self, batch: list[Call]) -> None:
        live = [c for c in batch if not c.future.done()]  # a cancelled caller's call is skipped
        if not live:
            return
        self.batches += 1
        if len({c.caller for c in live}) > 1:
            log.debug("batch of %d calls from %s", len(live), ", ".join(sorted({c.caller for c in live})))
        try:
            results = await asyncio.to_thread(self.run_batch, live[0].group, [c.payload for c in live])
        except Exception as e:  # noqa: BLE001 - isolate the call that failed
            if len(live) == 1:
                _settle(live[0], error=e)
                return
            for c in live:
                try:
                    (r,) = await asyncio.to_thread(self.run_batch, c.group, [c.payload])
                    _settle(c, result=r)
                except Exception as e1:  # noqa: BLE001 - this call's own error goes to its caller
                    _settle(c, error=e1)
            return
        for c, r in zip(live, results):
            _settle(c, result=r)


def _settle(call: Call, *, result: Any = None, error: BaseException | None = None) -> None:
    if call.future.done():  # cancelled while its batch ran
        return
    if error is not None:
        call.future.set_exception(error)
    else:
        call.future.set_result(result)
