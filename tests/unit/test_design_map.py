"""docs/design.md's map of the pieces names every module and SQL file of outbox/ and relay/,
and only files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mapped() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text("utf-8")
    block = text.split("## The pieces", 1)[1].split("```", 2)[1]
    found: set[str] = set()
    package = ""
    for line in block.splitlines():
        top = re.match(r"^(\w+)/(\s|$)", line)
        if top:
            package = top.group(1)
            continue
        entry = re.match(r"^  (\w+\.(?:py|sql))\s", line)
        if entry and package:
            found.add(f"{package}/{entry.group(1)}")
    return found


def existing() -> set[str]:
    return {
        f"{path.parent.name}/{path.name}"
        for package in ("outbox", "relay")
        for path in (ROOT / package).iterdir()
        # outbox/schema.sql is a link to the root's schema.sql, named on the map's first line
        if path.suffix in (".py", ".sql")
        and path.name not in ("__init__.py", "__main__.py")
        and not path.is_symlink()
    }


def test_the_design_map_names_every_module_and_only_real_ones():
    assert mapped() - existing() == set(), "named in design.md but missing"
    assert existing() - mapped() == set(), "in the code but not in design.md's map"


def test_the_benchmarks_stand_on_their_own():
    """bench/ is run from a checkout by people who never run the tests: it imports nothing
    from tests/."""
    import re

    leaning = [
        path.name
        for path in (ROOT / "bench").glob("*.py")
        if re.search(r"^\s*(from|import) tests\b", path.read_text("utf-8"), re.M)
    ]
    assert leaning == []
