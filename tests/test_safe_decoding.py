"""Nothing a peer sends can run code: a static scan of butterfly/ with ``ast``.

``ast`` rather than grep, so that ``module.eval()`` (torch's inference mode) is not a false
positive and an aliased import (``import pickle as p``) is not a false negative.
"""

from __future__ import annotations

import ast
from pathlib import Path

import butterfly

PACKAGE = Path(butterfly.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
#: The one place an import path is imported: ``ModelSource``, from ``--model`` on the
#: worker's command line (never from a message: Assign names layers, not models).
IMPORTS_MODELS = {"model/loading.py"}


def _sources() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _findings(name: str, tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"{name}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in UNSAFE_MODULES
            ]
        elif (
            isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES
        ):
            found.append(f"{name}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            called = _dotted(node.func)
            if isinstance(node.func, ast.Name) and called in UNSAFE_BUILTINS:
                found.append(f"{name}:{node.lineno}: {called}()")
            if called in {"torch.load", "numpy.load", "np.load"}:
                found.append(f"{name}:{node.lineno}: {called}()")
            if called.endswith("import_module") and name not in IMPORTS_MODELS:
                found.append(f"{name}:{node.lineno}: {called}()")
    return found


def test_no_module_of_butterfly_can_unpickle_eval_or_import_what_a_peer_sends() -> None:
    sources = _sources()
    assert len(sources) > 50  # the scan sees the package
    assert [f for name, tree in sources for f in _findings(name, tree)] == []


def test_the_scan_finds_each_kind_of_unsafe_code() -> None:
    sample = ast.parse(
        "import pickle as p\nfrom marshal import loads\neval(x)\ntorch.load(f)\n"
        "importlib.import_module(m)\nmodel.eval()\n"
    )
    assert _findings("protocol/codec.py", sample) == [
        "protocol/codec.py: import pickle",
        "protocol/codec.py: from marshal import ...",
        "protocol/codec.py:3: eval()",
        "protocol/codec.py:4: torch.load()",
        "protocol/codec.py:5: importlib.import_module()",
    ]
