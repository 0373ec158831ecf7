"""raykd neither uses, replaces nor deletes a Serve application it did not deploy (shared local Ray)."""

from __future__ import annotations

import pytest
from ray import serve

from raykd.config import TeacherConfig
from raykd.teacher.deployment import DEPLOYMENT_NAME
from raykd.teacher.apps import ForeignAppError, running_teacher, start_teacher
from raykd.teacher.service import teacher_down, teacher_status

pytestmark = pytest.mark.ray

NAME = "foreign-app"


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0})
class NotATeacher:
    """Named like raykd's teacher deployment, deployed by someone else."""

    def info(self) -> dict:
        return {"owner": "someone else"}


def test_an_app_raykd_did_not_deploy_is_left_alone(ray_start, tiny_model):
    serve.start(proxy_location="Disabled")  # as a run's own teacher does: no HTTP port taken
    handle = serve.run(NotATeacher.bind(), name=NAME, route_prefix=None)
    try:
        with pytest.raises(ForeignAppError, match=f"'{NAME}' on this cluster was not deployed by raykd"):
            running_teacher(NAME)
        with pytest.raises(ForeignAppError):  # a run whose teacher has that name stops before deploying
            start_teacher(TeacherConfig(name=NAME, model=str(tiny_model), num_cpus=0.5), str(tiny_model))
        with pytest.raises(ForeignAppError, match="raykd leaves it alone"):
            teacher_down(NAME)
        assert NAME not in {row["name"] for row in teacher_status()}
        assert handle.info.remote().result(timeout_s=60) == {"owner": "someone else"}  # still the same app, serving
    finally:
        serve.delete(NAME)
