"""`scm_ops.kernels` when scm_ops is imported from a clone instead of an installation.

The wheel installs the repository's top-level ``kernels/`` folder as ``scm_ops.kernels``.
From the root of a clone, ``python``, ``python -m pytest`` and scripts there import the
source folder ``scm_ops/`` first (the current directory leads ``sys.path``), and that folder
has no ``kernels`` subpackage. :func:`attach_source_kernels` registers the clone's
``kernels/`` under that name, so the source tree runs exactly as the installed package does.
It does nothing where ``scm_ops.kernels`` is importable already (a wheel) or where
``scm_ops/`` does not sit in a clone of scm-ops (its parent must hold scm-ops's
``pyproject.toml`` and the ``kernels/`` folder with its ``structured`` package).

``kernels/`` has no ``__init__.py`` (a namespace package): a regular package of that name
at a clone's root would shadow, for everything run there, any installed package named
``kernels`` (transformers imports one), while a namespace folder yields to it.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import sys

NAME = "scm_ops.kernels"


def _clone_kernels(package_dir: pathlib.Path):
    """The clone's kernels/ folder, or None where `package_dir` is not in a clone of scm-ops."""
    root = package_dir.parent
    kernels = root / "kernels"
    try:
        is_clone = 'name = "scm-ops"' in (root / "pyproject.toml").read_text()
    except OSError:
        return None
    return kernels if is_clone and (kernels / "structured" / "__init__.py").is_file() else None


def attach_source_kernels(package) -> None:
    """Make ``scm_ops.kernels`` the clone's ``kernels/`` where it is not importable otherwise;
    `package` is the scm_ops module being imported."""
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return
    kernels = _clone_kernels(pathlib.Path(package.__file__).resolve().parent)
    if kernels is None:
        return
    spec = importlib.machinery.ModuleSpec(NAME, None, is_package=True)
    spec.submodule_search_locations = [str(kernels)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    package.kernels = module
