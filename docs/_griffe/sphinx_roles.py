"""A griffe extension for the API reference: the docstrings' reST roles as Markdown links.

anytimeify's docstrings are Google style with Sphinx roles for cross-references
(``:func:`convert```, ``:class:`~anytimeify.AnytimeModel```, ``:meth:`AnytimeModel.predict```).
mkdocstrings renders Markdown, where those roles would show as raw text. This extension, loaded by
mkdocs.yml (``extensions: - docs/_griffe/sphinx_roles.py``), rewrites each role into an optional
cross-reference: the name is resolved in the scope of the object whose docstring holds it (its
members, its parents' members and its module's imports, as Python would) and becomes a link where
the API reference documents the target, plain code elsewhere (``optional``: an unresolved target is
not a warning). A literal-block marker ``::`` at the end of a line becomes ``:``.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import griffe

_ROLE = re.compile(r":(?:py:)?(?P<role>func|class|meth|mod|data|attr|obj|exc|const):`(?P<target>[^`]+)`")
_LITERAL = re.compile(r"(\S)::$", re.M)


def _resolve(obj: griffe.Object, name: str) -> Optional[str]:
    """The full path ``name`` means in ``obj``'s docstring, or None."""
    if name.startswith("anytimeify."):
        return name
    head, _, rest = name.partition(".")
    scope: Optional[griffe.Object] = obj
    while scope is not None:
        try:
            path = scope.resolve(head)
        except Exception:  # griffe.NameResolutionError and friends: try the parent's scope
            scope = scope.parent
            continue
        return f"{path}.{rest}" if rest else path
    return None


def _unshadow(obj: griffe.Object, path: str, role: str) -> str:
    """``anytimeify.convert`` names both a module and the function it defines (``convert``,
    ``flops``, ``train.evaluate``): a function or class role means the function or class."""
    if role not in ("func", "meth", "class"):
        return path
    try:
        target = obj.modules_collection.get_member(path)
    except Exception:
        return path
    last = path.rsplit(".", 1)[-1]
    if getattr(target, "is_module", False) and last in target.members:
        return f"{path}.{last}"
    return path


def _rewrite(obj: griffe.Object, text: str) -> str:
    def link(match: re.Match) -> str:
        target = match.group("target").strip()
        short = target.startswith("~")
        target = target.lstrip("~.")
        if match.group("role") in ("func", "meth"):
            target = target.removesuffix("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        if match.group("role") in ("func", "meth"):
            shown += "()"
        path = _resolve(obj, target)
        if path is None:
            return f"`{shown}`"
        path = _unshadow(obj, path, match.group("role"))
        return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'

    return _LITERAL.sub(r"\1:", _ROLE.sub(link, text))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        seen = set()

        def visit(obj: griffe.Object) -> None:
            if id(obj) in seen:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)

        visit(pkg)
