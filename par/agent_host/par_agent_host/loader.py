"""Putting the package on sys.path and resolving `module:function` references.

Every failure becomes a HostError with one line naming the reference, the
module and the error, plus where it happened when that is in the agent's code,
because that line is what `systemctl status` and the journal show.
"""

from __future__ import annotations

import importlib
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

from .exitcodes import EXIT_BAD_ENTRY, EXIT_IMPORT_ERROR, HostError


def _identifier(name: str) -> bool:
    return name.isascii() and name.isidentifier()


class EntryRef(namedtuple("_EntryRef", "what module attr")):
    """A `module:function` reference from the manifest; `what` names it in messages.

    (A namedtuple: see spec.py for why the host has no dataclasses.)
    """

    __slots__ = ()

    @classmethod
    def parse(cls, what: str, ref: str, default_attr: str) -> EntryRef:
        module, _, attr = ref.strip().partition(":")
        attr = attr or default_attr
        if not all(_identifier(part) for part in module.split(".")) or not _identifier(attr):
            raise HostError(EXIT_BAD_ENTRY, f"{what} {ref!r} is not 'module:function'")
        return cls(what, module, attr)

    def __str__(self) -> str:
        return f"{self.module}:{self.attr}"


def add_package_paths(package_root: Path) -> list[str]:
    """Put package_root, then package_root/src, at the front of sys.path."""
    paths = [str(package_root), str(package_root / "src")]
    for path in reversed(paths):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    return paths


def _where(exc: BaseException, package_root: Path | None) -> str:
    """' (at file:line)' for the innermost frame in the agent's own files (below
    `package_root`), else the innermost one outside importlib; '' when none.

    The agent's own frame is what its developer can fix: a JSONDecodeError
    raised in the stdlib's decoder is caused by the agent's call to it."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    import traceback  # only on a failure: every agent's start would pay for it

    frames = [
        f for f in traceback.extract_tb(exc.__traceback__)
        # the first frame is this module's import_module call: not the agent's fault
        if not f.filename.startswith("<frozen") and f.filename != __file__
    ]
    if package_root is not None:
        root = str(package_root).rstrip("/") + "/"
        own = [f for f in frames if f.filename.startswith(root)]
        frames = own or frames
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def import_module(ref: EntryRef, package_root: Path | None = None) -> object:
    try:
        return importlib.import_module(ref.module)
    except Exception as exc:  # any error raised by the agent's module body
        raise HostError(
            EXIT_IMPORT_ERROR,
            f"cannot import {ref.what} module {ref.module!r} ({ref}): "
            f"{type(exc).__name__}: {exc}{_where(exc, package_root)}",
        ) from exc


def load_callable(ref: EntryRef, package_root: Path | None = None) -> Callable[..., object]:
    """Import `ref.module` and return its callable `ref.attr` (`package_root`: where the
    agent's own files are, for naming the line at fault)."""
    module = import_module(ref, package_root)
    func = getattr(module, ref.attr, None)
    if func is None:
        raise HostError(
            EXIT_BAD_ENTRY, f"{ref.what} {ref}: module {ref.module!r} has no {ref.attr!r}"
        )
    if not callable(func):
        kind = type(func).__name__
        raise HostError(EXIT_BAD_ENTRY, f"{ref.what} {ref}: {ref.attr!r} is a {kind}, not callable")
    return func
