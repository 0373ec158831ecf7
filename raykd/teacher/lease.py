"""A run's hold on its teacher application: start it (or reuse a running one, checked to be the
run's teacher), keep it up while the run needs it, and stop it afterwards only if the run started it.

The labeling plan (:class:`raykd.soft_labels.plan.Plan`) holds one :class:`TeacherLease`; labeling,
a live fill, on-policy training and recipes that generate with the teacher all go through it, so
who stops the teacher is decided in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from raykd import console
from raykd.config import TeacherConfig
from raykd.teacher.running import check_running_teacher


@dataclass
class TeacherLease:
    """The teacher application of one run, by name, and whether the run started it.

    Attributes:
        cfg: the teacher's settings (``name``, ``start``, ``keep_alive``, resources).
        model_path: the resolved model folder the application serves.
        expect: what a running teacher must match to be reused (``weights_fingerprint``,
            ``tokenizer_fingerprint``, ``engine``, ``dtype``; :func:`check_running_teacher`).
        owns: True once this run has started the teacher (e.g. a recipe's ``prepare`` step did):
            the run then stops it after labeling, so its CPUs/GPUs are free for training.
        hold: the teacher stays up after labeling, e.g. on-policy training scores the student's
            samples with it (:meth:`serving` releases it afterwards).
    """

    cfg: TeacherConfig
    model_path: str
    expect: dict[str, Any]
    owns: bool = False
    hold: bool = False

    def acquire(self, why: str | None = None) -> Any:
        """Start the teacher, or reuse the running application of its name after checking it is
        this run's teacher.

        Args:
            why: what the teacher is needed for; when given, a teacher that may not be started
                (``teacher.start=false``, none running) is refused first, with ``why`` in the error.

        Returns:
            The application's Serve handle.

        Raises:
            raykd.teacher.apps.TeacherNotRunningError: none runs and ``teacher.start`` is false.
            ValueError: the running teacher is not the run's teacher (``error: ...``).
        """
        from raykd.teacher.apps import check_teacher_reachable, start_teacher  # lazy: keeps ray out of import time

        if why is not None:
            with console.user_errors(ValueError):
                check_teacher_reachable(self.cfg, why)
        handle, started = start_teacher(self.cfg, self.model_path)
        self.owns = self.owns or started
        if not self.owns:
            with console.user_errors(ValueError):
                check_running_teacher(handle.info.remote().result(), self.cfg.name, self.expect)
        return handle

    def release(self) -> None:
        """Stop the teacher if this run started it, unless ``teacher.keep_alive`` or :attr:`hold`."""
        if self.owns and not self.cfg.keep_alive and not self.hold:
            from raykd.teacher.apps import stop_teacher  # lazy: keeps ray out of import time

            stop_teacher(self.cfg.name)
            self.owns = False

    @contextlib.contextmanager
    def serving(self) -> Iterator[str]:
        """The teacher up for the block (e.g. on-policy training scores with it); yields its
        application name, then releases it as after labeling (:meth:`release`).

        Raises:
            raykd.teacher.apps.TeacherNotRunningError: none runs and ``teacher.start`` is false.
            ValueError: the running teacher is not the run's teacher.
        """
        try:
            with console.user_errors(ValueError):
                self.acquire()
            yield self.cfg.name
        finally:
            self.hold = False
            self.release()
