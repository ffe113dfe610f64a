"""Import compressai without the eager imports of its package ``__init__``.

wsicodec uses three parts of compressai: its entropy models, its GDN layer and its
rANS coder.  compressai 1.2.8's ``__init__`` imports every subpackage up front
(datasets, zoo, point-cloud transforms), and through them torch_geometric and
torch._dynamo: half of what loading the learned codec costs a fresh process (10.9 s
without this, 5.5 s with it, on the idle 2-core development machine), paid by every
``wsicodec compress`` / ``decompress`` / ``serve`` and every first ``wsicodec.decode``.

:func:`load` runs that ``__init__`` without its one ``from compressai import (...)``
statement and makes those subpackages lazy (PEP 562 module ``__getattr__``), so
``import compressai; compressai.zoo`` and ``from compressai import datasets`` still work
in the same process, each importing its subpackage on first use.  If compressai was
already imported, or its ``__init__`` is not the shape expected, the normal import runs.

Its ``entropy_models`` module imports ``scipy.stats`` at the top (~0.6 s, a third of
importing the learned codec) for ``GaussianConditional.update()`` alone, which builds the
CDF tables: shipped weights carry them frozen, so encoding and decoding never call it.
:func:`load` runs that module with ``import scipy`` in its place; SciPy loads ``stats`` on
first use of ``scipy.stats`` (its lazy submodules), so ``update()`` works as before
(``wsicodec export``, training).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types


def load() -> types.ModuleType:
    """The ``compressai`` package module, imported lazily where possible."""
    if "compressai" in sys.modules:
        return sys.modules["compressai"]
    spec = importlib.util.find_spec("compressai")
    if spec is None or spec.origin is None or not spec.origin.endswith("__init__.py"):
        return importlib.import_module("compressai")   # raises the usual ImportError
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    eager = [n for n in tree.body if isinstance(n, ast.ImportFrom)
             and n.module == "compressai" and n.level == 0]
    if len(eager) != 1 or any(a.asname for a in eager[0].names):
        return importlib.import_module("compressai")
    lazy = frozenset(a.name for a in eager[0].names)
    tree.body.remove(eager[0])
    module = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):   # noqa: N807 - the PEP 562 hook
        if name in lazy:
            return importlib.import_module(f"compressai.{name}")
        raise AttributeError(f"module 'compressai' has no attribute {name!r}")

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["compressai"] = module
    try:
        exec(compile(tree, spec.origin, "exec"), module.__dict__)  # noqa: S102 - compressai's own code
    except BaseException:
        del sys.modules["compressai"]
        raise
    _entropy_models_with_lazy_scipy(os.path.dirname(spec.origin))
    return module


def _entropy_models_with_lazy_scipy(package_dir: str) -> None:
    """``compressai.entropy_models`` with its ``entropy_models`` module run from its source
    with ``import scipy.stats`` as ``import scipy`` (module docstring); the normal import
    where that module's top is not the shape expected."""
    name = "compressai.entropy_models.entropy_models"
    path = os.path.join(package_dir, "entropy_models", "entropy_models.py")
    if name in sys.modules or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    stats = [n for n in tree.body if isinstance(n, ast.Import)
             and [(a.name, a.asname) for a in n.names] == [("scipy.stats", None)]]
    spec = importlib.util.spec_from_file_location(name, path)
    if len(stats) != 1 or spec is None:
        return
    stats[0].names[0].name = "scipy"
    child = importlib.util.module_from_spec(spec)
    sys.modules[name] = child
    try:
        exec(compile(tree, path, "exec"), child.__dict__)  # noqa: S102 - compressai's own code
        package = importlib.import_module("compressai.entropy_models")
    except BaseException:
        sys.modules.pop(name, None)
        raise
    package.entropy_models = child      # what the import system binds on a first load
