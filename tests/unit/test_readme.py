"""The README is a guide (short, its links resolve), and it keeps the command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def test_readme_is_a_guide_of_at_most_400_lines():
    assert len(README.read_text().splitlines()) <= 400, "move detail into docs/ and link it from the README"


def test_readme_keeps_the_commands_ci_and_users_run():
    text = README.read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text() and "make test" in text
    for command in ("make demo", "raykd distill --config jobs/configs/bbc_smollm2.yaml", "raykd config --schema", "make docs"):
        assert command in text, command


def test_every_relative_link_of_the_readme_resolves():
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link.split("#")[0] for link in links if not link.startswith(("http", "#", "mailto:"))]
    assert relative and not [link for link in relative if not (ROOT / link).exists()]
