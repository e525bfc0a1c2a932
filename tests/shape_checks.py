"""Runtime checking of circuitdyn's annotations while the tests run (installed by conftest.py).

An import hook, like jaxtyping's own ``install_import_hook``, that compiles every module of the
package with ``@jaxtyped(typechecker=beartype)`` on each module-level function, each class
(dataclass fields are checked in ``__init__``) and each method: every call checks its tensor
annotations (``Float[Tensor, "batch pos"]``, each dimension name bound once per call across the
arguments and the return value) and its other annotations. Unlike jaxtyping's hook it leaves
nested functions alone: circuitdyn's nested functions are the TransformerLens hooks of
attribution and patching, which carry no shape annotations, run thousands of times per test and
would be re-decorated (a compile each) every time their enclosing function runs; checking them
made the in-process tests 3.3x slower instead of ~1.3x. Public APIs only (importlib, ast,
jaxtyping.jaxtyped, beartype); the instrumented code is compiled from source on every import and
never written to ``__pycache__``.
"""

from __future__ import annotations

import ast
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder, SourceFileLoader

# int is accepted where float is annotated (PEP 484's numeric tower), as type checkers do.
DECORATOR = (
    "__import__('jaxtyping').jaxtyped(typechecker=__import__('beartype').beartype("
    "conf=__import__('beartype').BeartypeConf(is_pep484_tower=True)))"
)


def _no_type_check(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    return any("no_type_check" in ast.unparse(d) for d in node.decorator_list)


class _Instrument(ast.NodeTransformer):
    """Decorate the module-level functions and classes, and the methods of those classes."""

    def visit_Module(self, node: ast.Module) -> ast.Module:
        for statement in node.body:
            self._decorate(statement)
        return node

    def _decorate(self, node: ast.stmt) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _no_type_check(node):
            # Innermost, so that classmethod / property / cached_property wrap the checked
            # function and the annotations are still there to read.
            node.decorator_list.append(self._decorator(node))
        elif isinstance(node, ast.ClassDef) and not _no_type_check(node):
            # Outermost, so that @dataclass has made __init__ before it is wrapped.
            node.decorator_list.insert(0, self._decorator(node))
            for statement in node.body:
                self._decorate(statement)

    @staticmethod
    def _decorator(node: ast.AST) -> ast.expr:
        return ast.copy_location(ast.parse(DECORATOR, mode="eval").body, node)


class _Loader(SourceFileLoader):
    def source_to_code(self, data, path, *, _optimize=-1):  # type: ignore[override]
        tree = ast.parse(data, filename=path)
        tree = ast.fix_missing_locations(_Instrument().visit(tree))
        return compile(tree, path, "exec", dont_inherit=True, optimize=_optimize)

    def get_code(self, fullname):  # type: ignore[override]
        # Always from source: never read or write the (unchecked) bytecode cache.
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class _Finder(MetaPathFinder):
    def __init__(self, package: str) -> None:
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.package and not fullname.startswith(self.package + "."):
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, SourceFileLoader):
            return None
        spec.loader = _Loader(spec.loader.name, spec.loader.path)
        return spec


def install(package: str) -> None:
    """Check `package` (and its subpackages) from its next import on."""
    if package in sys.modules:
        raise RuntimeError(f"{package} is already imported: it can no longer be checked")
    sys.meta_path.insert(0, _Finder(package))
