"""Every ```python block of README.md and of the documentation pages runs, so that no page can rot.

A page's blocks run in order in one namespace, as a reader would paste them into one session,
with a scratch folder as the working directory (``examples/`` and ``recipes/`` are linked into
it, so the paths the pages use resolve). A block that cannot run here (a data set, GPUs,
``torchrun``, the network) is marked in the Markdown, on the line right before its fence::

    <!-- not-run: needs the Cityscapes data set -->
    ```python
    ...

The marker needs a reason. A block in a Python-like fence that the runner would not run
(```py, ```pycon, ...) without a marker is a failure, as is a marker that marks no Python block.
The API reference pages (docs/api/) hold no examples of their own; their one import block runs too.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md"] + list(DOCS.rglob("*.md")))

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")
_MARKER = re.compile(r"^\s*<!--\s*not-run:(?P<reason>.*?)-->\s*$")
#: fence languages that hold Python; only ``python`` is run, the others need a marker
_PYTHONISH = {"python", "py", "python3", "py3", "pycon", "ipython"}
#: directories the pages refer to by relative path (``examples/configs/digits.yaml``, ``recipes/...``)
_LINKED = ("examples", "recipes")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: Optional[str]  # the marker's reason, or None


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def read_blocks(page: Path) -> List[Block]:
    """The fenced code blocks of ``page``, with the not-run marker of the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = match.group("indent"), match.group("fence")
        lang = match.group("info").strip().split(" ")[0].strip("{}.").lower()
        marker = _MARKER.match(lines[i - 1]) if i > 0 else None
        body: List[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence[0] * len(fence))
                                      and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        reason = marker.group("reason").strip() if marker else None
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", reason))
        i = j + 1
    return blocks


def _markers(page: Path) -> List[int]:
    return [n + 1 for n, line in enumerate(page.read_text(encoding="utf-8").splitlines()) if _MARKER.match(line)]


def _runnable(page: Path) -> List[Block]:
    return [b for b in read_blocks(page) if b.lang == "python" and b.not_run is None]


RUN_PAGES = [page for page in PAGES if _runnable(page)]


def test_the_pages_are_found():
    assert ROOT / "README.md" in RUN_PAGES and DOCS / "getting-started.md" in RUN_PAGES
    for folder in ("tutorials", "how-to"):
        assert any(p.parent == DOCS / folder for p in PAGES), folder


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_python_block_runs_or_is_marked_with_a_reason(page):
    """No Python block is skipped silently: a block the runner does not run carries a marker."""
    blocks = read_blocks(page)
    problems = []
    for b in blocks:
        if b.not_run is not None and not b.not_run:
            problems.append(f"line {b.line}: a not-run marker needs a reason: <!-- not-run: needs ... -->")
        if b.lang in _PYTHONISH and b.lang != "python" and b.not_run is None:
            problems.append(f"line {b.line}: a ```{b.lang} block would be skipped; make it ```python or mark it "
                            f"<!-- not-run: reason -->")
    for line in _markers(page):
        block = next((b for b in blocks if b.line - 1 == line), None)
        if block is None:
            problems.append(f"line {line}: a not-run marker must be on the line right before a ```python fence")
        elif block.lang not in _PYTHONISH:
            problems.append(f"line {line}: a not-run marker on a ```{block.lang} block (only Python blocks run)")
    assert not problems, f"{_rel(page)}:\n" + "\n".join(problems)


#: what a page's code must have left behind, beyond running without an error
CHECKS = {
    "docs/classification.md": lambda ns: ns["pred"].exits.shape == (64,) and ns["model"].num_exits == 8,
    "docs/getting-started.md": lambda ns: ns["model"].num_exits == 4,
    "docs/tutorials/deadlines.md": lambda ns: len(ns["reached"]) == 8,
}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty working directory with the repository's examples/ and recipes/ linked in, and one
    torch thread: the pages' inputs are tiny, and on a shared 2-core machine a second thread
    mostly waits for the first (training steps ran several times slower with two)."""
    import torch

    for name in _LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(sys, "argv", ["docs"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def _run_page(page: Path) -> Dict[str, object]:
    namespace: Dict[str, object] = {"__name__": "__docs__"}
    for b in _runnable(page):
        # padded to the block's place in the page: tracebacks name the page and its line numbers
        source = "\n" * b.line + b.code
        try:
            exec(compile(source, str(page), "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the block at {_rel(page)} line {b.line} failed: {type(err).__name__}: {err}") from err
    return namespace


@pytest.mark.parametrize("page", RUN_PAGES, ids=_rel)
def test_the_pages_code_runs(page, scratch):
    """Every unmarked ```python block of the page, in order, in one namespace."""
    namespace = _run_page(page)
    check = CHECKS.get(_rel(page))
    if check is not None:
        assert check(namespace), f"{_rel(page)}: the page's code ran but left an unexpected result"


def test_not_run_blocks_are_counted(capsys):
    """How many blocks each page leaves out, and why (printed with ``pytest -s``); at most a few."""
    skipped = {_rel(p): [b.not_run for b in read_blocks(p) if b.not_run] for p in PAGES}
    skipped = {page: reasons for page, reasons in skipped.items() if reasons}
    ran = sum(len(_runnable(p)) for p in PAGES)
    with capsys.disabled():
        print(f"\ndocs: {ran} python blocks run, {sum(map(len, skipped.values()))} marked not-run:")
        for page, reasons in skipped.items():
            for reason in reasons:
                print(f"  {page}: {reason}")
    for page, reasons in skipped.items():
        # a page that cannot run most of its code should say so in a smaller example that can
        assert len(reasons) <= max(3, len([b for b in read_blocks(ROOT / page) if b.lang == "python"]) // 2), page
