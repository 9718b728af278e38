"""What `pip install -e ".[test,docs]"` pulls in: no Python-2-era backports."""
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement

#: backports of modules that are in the standard library of every Python anytimeify supports
STDLIB_BACKPORTS = {"typing", "enum34", "futures", "pathlib", "argparse", "dataclasses"}


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def _closure(name: str, extras=()) -> set:
    """The installed distributions ``name[extras]`` requires, transitively."""
    seen, todo = set(), [(name, tuple(extras))]
    while todo:
        dist, wanted = todo.pop()
        key = _name(dist)
        if (key, wanted) in seen:
            continue
        seen.add((key, wanted))
        try:
            requires = metadata.distribution(dist).requires or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        for line in requires:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + wanted):
                todo.append((req.name, tuple(req.extras)))
    return {name for name, _ in seen}


@pytest.mark.parametrize("extras", [(), ("test", "docs")], ids=["plain", "test,docs"])
def test_no_standard_library_backport_is_required(extras):
    needed = _closure("anytimeify", extras)
    assert "torch" in needed  # the walk does reach the dependencies
    assert not needed & STDLIB_BACKPORTS, sorted(needed & STDLIB_BACKPORTS)
