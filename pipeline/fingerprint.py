"""Content fingerprints of external inputs (manifests, checkpoints), cheap to recompute.

A file's sha256 is remembered by (absolute path, size, mtime) in a small JSON
database in the cache folder, as DVC's state DB does: `kdpipe status` on
multi-GB checkpoints then costs a stat, not a re-hash.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import inspect
import json
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

from kdpipe import atomic

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def source_hash(objects: tuple[ModuleType | Any, ...]) -> str:
    """Hash of the code of modules or functions (and the kdpipe modules they import): what a stage's outputs
    depend on.

    Comments, docstrings and layout are left out, so rewording or reformatting the library
    (or upgrading to a release that only did that) does not rebuild days of training.
    """
    return sha256_text("\n".join(code_only(inspect.getsource(obj)) for obj in code_closure(objects)))


# Modules that never shape a stage's outputs: what is printed, how processes start, and the
# stage machinery itself (settings reach keys as parameters, not as the code that reads them).
NOT_RESULTS = frozenset({"kdpipe.cli", "kdpipe.console", "kdpipe.torch_stack", "kdpipe.processes", "kdpipe.config",
                         "kdpipe.stage", "kdpipe.stage_names", "kdpipe.runner", "kdpipe.cache", "kdpipe.fingerprint",
                         "kdpipe.verify", "kdpipe.errors", "kdpipe.stages"})


def code_closure(objects: tuple[ModuleType | Any, ...]) -> tuple[ModuleType | Any, ...]:
    """`objects` plus every kdpipe module they import, transitively (a stage's code, derived).

    The modules of listed functions are followed for their imports but not hashed whole (the
    functions stand for them), so a stage module holding two stages keys each on its own code.
    """
    functions_from = {inspect.getmodule(obj) for obj in objects if not inspect.ismodule(obj)}
    todo = [obj for obj in objects if inspect.ismodule(obj)] + list(functions_from)
    seen: dict[str, ModuleType] = {}
    while todo:
        module = todo.pop()
        if module.__name__ in seen or module.__name__ in NOT_RESULTS:
            continue
        seen[module.__name__] = module
        todo.extend(importlib.import_module(name) for name in kdpipe_imports(module) if name not in seen)
    derived = [module for name, module in sorted(seen.items())
               if module not in functions_from and module not in objects and name not in NOT_RESULTS]
    return (*objects, *derived)


def kdpipe_imports(module: ModuleType) -> set[str]:
    """Names of the kdpipe modules `module` imports anywhere in its source (also inside functions)."""
    found = set()
    for node in _import_nodes(inspect.getsource(module)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "kdpipe")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kdpipe":
            parent = importlib.import_module(node.module)
            for alias in node.names:
                imported = getattr(parent, alias.name, None)
                found.add(imported.__name__ if inspect.ismodule(imported) else node.module)
    found.discard("kdpipe")  # the package's __init__ holds only its version and lazy names
    return found


@functools.lru_cache(maxsize=256)
def _import_nodes(source: str) -> tuple[ast.Import | ast.ImportFrom, ...]:
    return tuple(node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom)))


@functools.lru_cache(maxsize=512)
def code_only(source: str) -> str:
    """Python source reduced to its code: parsed, bare string statements dropped, printed back."""
    tree = _DropBareStrings().visit(ast.parse(textwrap.dedent(source)))
    return ast.unparse(tree)


class _DropBareStrings(ast.NodeTransformer):
    """Removes docstrings and other string literals used as statements; they do nothing when run."""

    def visit_Expr(self, node: ast.Expr) -> ast.Expr | None:
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None
        return node

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        if not isinstance(node, ast.Module) and getattr(node, "body", None) == []:
            node.body = [ast.Pass()]  # a def or class that held only a docstring
        return node


class FingerprintDB:
    """sha256 of files, cached by path + size + mtime in one JSON file."""

    def __init__(self, db_path: Path, remember: bool = True):
        self.db_path = db_path
        self.remember = remember  # False: hashes found are used, never written (read-only commands)
        self._entries: dict[str, dict[str, Any]] | None = None

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        entries = self._load()
        entry = entries.get(str(path))
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = sha256_file(path)
        entries[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        if self.remember:
            self._save()
        return digest

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            try:
                self._entries = json.loads(self.db_path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                self._entries = {}
        return self._entries

    def _save(self) -> None:
        """Atomic replace: a concurrent writer can at worst drop an entry, never corrupt the file."""
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.db_path, json.dumps(self._entries, indent=0, sort_keys=True))
