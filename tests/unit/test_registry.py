"""The one registry class (no torch, no Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raykd.registry import Registry, UnknownNameError


def test_entries_are_found_by_name_in_the_order_added_and_a_name_is_taken_once():
    reg: Registry[int] = Registry("widget")
    assert reg.add("b", 2) == 2 and reg.add("a", 1) == 1
    assert reg.get("a") == 1 and "b" in reg and "c" not in reg and len(reg) == 2
    assert list(reg) == ["b", "a"] and reg.entries() == {"b": 2, "a": 1}
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.add("a", 3)


def test_an_unknown_name_lists_the_valid_ones_sorted_as_a_key_and_a_value_error():
    class UnknownWidget(UnknownNameError):
        pass

    reg: Registry[int] = Registry("teacher widget", error=UnknownWidget)
    reg.add("zeta", 0)
    reg.add("alpha", 1)
    for caught in (KeyError, ValueError, UnknownWidget):
        with pytest.raises(caught) as info:
            reg.get("beta")
        assert str(info.value) == "unknown teacher widget 'beta'; valid teacher widgets: alpha, zeta"


def test_the_registry_module_imports_neither_torch_nor_ray():
    code = "import sys, raykd.registry; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
