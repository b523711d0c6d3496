"""Family knowledge lives only in ``integrations/transformers/families/``: no other module names a family.

The scan reads the code (not docstrings or comments, which may mention families) of every module of the package --
``vtc/``, ``integrations/``, ``kernels/``, ``eval/``, ``demo/`` -- outside ``families/`` and flags what dispatching
on a family needs: a registered family name as a string (``"llava_next"``), a registered model class or a family
adapter class in code (``isinstance(model, Qwen2VLForConditionalGeneration)``, ``AnyResAdapter``) or in a string
(``type(model).__name__ == "..."``), and imports from the ``families`` package (importing the package itself, which
registers the families, is the registry's one generic use).
"""

from __future__ import annotations

import ast
import os
import pathlib
import sys

import pytest

from vtc.integrations.transformers import FamilyAdapter, supported_families
from vtc.integrations.transformers.adapter import adapter_class

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("vtc", "integrations", "kernels", "eval", "demo")
FAMILIES_DIR = ROOT / "integrations" / "transformers" / "families"

#: modules whose subject is one specific model, built or loaded by its class -- not a dispatch on the family (paths
#: relative to the repository root). Keep this list short and say why for each.
ALLOWED = {
    "eval/bench/prefill.py": "benchmarks a LLaVA-1.5-7B-shaped model it builds from its config",
    "eval/bench/video.py": "benchmarks the video tower of a Qwen2.5-VL-7B-shaped model it builds from its config",
    "eval/default_model/train.py": "trains the embedded default model, which is a LLaVA checkpoint",
}


def _family_vocabulary() -> tuple[set[str], set[str]]:
    """(family names, class names): the registered families' names, their model classes and every adapter class
    defined in ``families/`` (shared bases such as the AnyRes or Qwen-VL adapter included)."""
    names = set(supported_families())
    classes = {c.__name__ for family in names for c in adapter_class(family).model_classes()}
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("vtc.integrations.transformers.families.") and module is not None:
            classes |= {name for name, value in vars(module).items()
                        if isinstance(value, type) and issubclass(value, FamilyAdapter) and value is not FamilyAdapter
                        and value.__module__ == module_name}
    return names, classes


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def family_mentions(source: str, names: set[str], classes: set[str]) -> list[tuple[int, str]]:
    """``(line, what)`` for every place in ``source`` where code names a family (see the module doc)."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in names or node.value in classes:
                found.append((node.lineno, f"string {node.value!r}"))
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append((node.lineno, f"name {node.id}"))
        elif isinstance(node, ast.Attribute) and node.attr in classes:
            found.append((node.lineno, f"attribute .{node.attr}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any("families" in module.split(".") for module in modules):
                found.append((node.lineno, f"import from {modules[0]}"))
            found += [(node.lineno, f"import {alias.name}") for alias in node.names if alias.name in classes]
    return sorted(set(found))


def _source_files() -> list[pathlib.Path]:
    files = set()
    for top in SOURCE_DIRS:
        for folder, dirs, names in os.walk(ROOT / top):  # symlinked folders (a development checkout's) not followed
            files |= {pathlib.Path(folder, name).resolve() for name in names if name.endswith(".py")}
    return sorted(f for f in files if FAMILIES_DIR not in f.parents)


def test_the_scan_sees_the_package():
    files = _source_files()
    assert any(f.name == "geometry.py" for f in files) and any(f.name == "cut.py" for f in files)
    assert not any(f.parent == FAMILIES_DIR for f in files)


@pytest.mark.parametrize("source, expected", [
    ('if family == "llava_next":\n    pass\n', "string 'llava_next'"),
    ("from transformers import Qwen2VLForConditionalGeneration\n", "import Qwen2VLForConditionalGeneration"),
    ("import transformers\nisinstance(m, transformers.LlavaForConditionalGeneration)\n",
     "attribute .LlavaForConditionalGeneration"),
    ("from .families.llava_next import helper\n", "import from families.llava_next"),
    ("ok = isinstance(adapter, AnyResAdapter)\n", "name AnyResAdapter"),
    ('ok = type(model).__name__ == "Qwen3VLForConditionalGeneration"\n', "string 'Qwen3VLForConditionalGeneration'"),
])
def test_the_scan_finds_family_knowledge(source, expected):
    names, classes = _family_vocabulary()
    assert expected in [what for _, what in family_mentions(source, names, classes)]
    assert family_mentions('"""A docstring may say llava_next."""\nx = 1  # and so may "qwen2_vl" comments\n',
                           names, classes) == []


def test_no_module_outside_families_names_a_family():
    names, classes = _family_vocabulary()
    assert {"llava", "qwen2_5_vl"} <= names and {"LlavaForConditionalGeneration", "QwenVLAdapter"} <= classes
    assert all((ROOT / allowed).is_file() for allowed in ALLOWED), "an allowed module moved: update ALLOWED"
    offenders = []
    for path in _source_files():
        if path.relative_to(ROOT).as_posix() in ALLOWED:
            continue
        for line, what in family_mentions(path.read_text(encoding="utf-8"), names, classes):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not offenders, "family knowledge outside families/ (move it into the family's adapter):\n" + "\n".join(
        offenders)
