"""A venv that links a layer: how one is made, and which layer one links.

A venv is its pyvenv.cfg and bin/python: Python finds pyvenv.cfg beside its
executable's folder and takes the venv as its prefix.  An agent's venv is such
a small venv whose `lib/pythonX.Y/site-packages` is a symlink to its layer's.
"""

from __future__ import annotations

import os
from pathlib import Path


def link_layer(venv: Path, layer: Path, prompt: str) -> None:
    """Make `venv` (an empty folder) a venv of the layer's interpreter whose
    site-packages is the layer's.

    The interpreter links are copied from the layer (they point at the base
    interpreter); the layer's console scripts are linked, so they run (with the
    layer's python) from here too; activate scripts name the layer, so they are
    left out.
    """
    cfg_lines = [line for line in (layer / "pyvenv.cfg").read_text().splitlines()
                 if not line.replace(" ", "").startswith(("prompt=", "command="))]
    (venv / "pyvenv.cfg").write_text("\n".join([*cfg_lines, f"prompt = {prompt}"]) + "\n")
    (venv / "bin").mkdir(mode=0o755)
    for entry in sorted((layer / "bin").iterdir()):
        target = venv / "bin" / entry.name
        if entry.is_symlink():
            target.symlink_to(os.readlink(entry))  # python, python3, python3.X
        elif entry.name.startswith("python"):
            os.link(entry, target)  # an interpreter copied rather than linked
        elif not entry.name.lower().startswith(("activate", "deactivate")):
            target.symlink_to(entry)
    for site in sorted(layer.glob("lib/python*/site-packages")):
        own = venv / site.relative_to(layer)
        own.parent.mkdir(mode=0o755, parents=True)
        own.symlink_to(site)
    if (layer / "lib64").is_symlink():
        (venv / "lib64").symlink_to(os.readlink(layer / "lib64"))


def linked_layer(venv: Path) -> Path | None:
    """The layer whose packages `venv` links (its site-packages link), or None."""
    try:
        for site in venv.glob("lib/python*/site-packages"):
            if site.is_symlink():
                target = site.parent / os.readlink(site)  # absolute as written: kept as is
                return target.parent.parent.parent  # <layer>/lib/pythonX.Y/site-packages
    except OSError:
        pass  # deleted meanwhile (another removal): it links nothing any more
    return None


def same_path(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name the same file once symlinks are resolved."""
    return os.path.realpath(a) == os.path.realpath(b)
