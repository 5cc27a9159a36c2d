"""The built-in corpus: documentation that ships with the Python interpreter.

Every machine that runs lm_lab has it, so ``python train.py`` needs no download. It is real
English written by people: the ``pydoc_data`` help topics (the language reference) plus the
docstrings of the standard library's pure-Python modules, read with ``ast`` (nothing is
imported or executed). About 1-2 MB of text, split into one document per topic or module.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path

# Folders of the stdlib that are tests, tooling or vendored code rather than documentation.
_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "pydoc_data",
    "config-3",
    "tkinter",
    "unittest",
}
MIN_DOC_CHARS = 200


def _module_docs(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return None
    parts = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        parts.append(module_doc)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40 and not node.name.startswith("_"):
                parts.append(f"{node.name}: {doc}")
    text = "\n\n".join(parts).strip()
    return text if len(text) >= MIN_DOC_CHARS else None


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel[:-1]):
            continue
        if rel[-1].startswith(("test_", "_")) and rel[-1] != "__init__.py":
            continue
        files.append(p)
    return files


def build_documents() -> list[dict[str, str]]:
    """Return ``[{"title": ..., "text": ...}]`` in a deterministic order."""
    from pydoc_data.topics import topics

    docs = [{"title": f"topic:{name}", "text": topics[name].strip()} for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in stdlib_files():
        text = _module_docs(path)
        if text:
            docs.append({"title": "module:" + ".".join(path.relative_to(root).with_suffix("").parts), "text": text})
    return docs
