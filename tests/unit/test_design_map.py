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
    subpackage = ""
    for line in block.splitlines():
        top = re.match(r"^(\w+)/(\s|$)", line)
        if top:
            package, subpackage = top.group(1), ""
            continue
        # a subpackage is "  name/" under its package, its modules indented by four
        sub = re.match(r"^  (\w+)/(\s|$)", line)
        if sub and package:
            subpackage = f"{package}/{sub.group(1)}"
            continue
        entry = re.match(r"^  (\w+\.(?:py|sql))\s", line)
        if entry and package:
            found.add(f"{package}/{entry.group(1)}")
            subpackage = ""
            continue
        nested = re.match(r"^    (\w+\.(?:py|sql))\s", line)
        if nested and subpackage:
            found.add(f"{subpackage}/{nested.group(1)}")
    return found


def existing() -> set[str]:
    """Modules and SQL files of outbox/ and relay/ and of their subpackages (directories with
    an __init__.py; migrations/ holds SQL only and is named as a whole)."""
    found: set[str] = set()
    for package in ("outbox", "relay"):
        folders = [ROOT / package]
        folders += [d for d in (ROOT / package).iterdir() if (d / "__init__.py").is_file()]
        for folder in folders:
            for path in folder.iterdir():
                # outbox/schema.sql is a link to the root's schema.sql, named on the map's
                # first line
                if (
                    path.suffix in (".py", ".sql")
                    and path.name not in ("__init__.py", "__main__.py")
                    and not path.is_symlink()
                ):
                    found.add(path.relative_to(ROOT).as_posix())
    return found


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
