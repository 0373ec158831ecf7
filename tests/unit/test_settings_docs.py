"""Every settings field documents itself: its attribute docstring is the field's description
(``use_attribute_docstrings`` on :class:`raykd.config.Strict`), shown by ``raykd config --schema``
and in the generated config reference."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from pydantic import BaseModel

import raykd

PACKAGE = Path(raykd.__file__).parent


def settings_modules() -> list[str]:
    """Modules of raykd that define a pydantic model (a class based on ``Strict`` or ``BaseModel``)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        bases = {getattr(b, "id", getattr(b, "attr", None)) for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
                 for b in node.bases}
        if bases & {"Strict", "BaseModel"}:
            rel = path.relative_to(PACKAGE.parent).with_suffix("")
            found.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return found


def settings_models() -> list[type[BaseModel]]:
    """Every pydantic model class raykd defines, after importing the modules that define them."""
    for name in settings_modules():
        importlib.import_module(name)
    models, todo = [], [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("raykd.") and sub not in models:
                models.append(sub)
    return models


def test_the_settings_modules_are_found():
    names = settings_modules()
    assert "raykd.config.distill" in names and "raykd.config.teacher" in names and "raykd.recipes.muki.config" in names and "raykd.teacher.schemas" in names


def test_every_settings_field_has_a_description():
    models = settings_models()
    assert len(models) > 40
    missing = [f"{m.__module__}.{m.__qualname__}.{name}" for m in models for name, field in m.model_fields.items()
               if not (field.description or "").strip()]
    assert not missing, ("settings fields without a description (write an attribute docstring under each, with its "
                         "unit or range):\n  " + "\n  ".join(missing))
