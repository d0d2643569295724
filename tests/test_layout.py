"""The package layout: sub-packages by concern, every import pointing down, no import cycles.

Function-level imports count too: a cycle hidden inside a function is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import dalle_pytorch

PACKAGE_ROOT = Path(dalle_pytorch.__file__).parent

# A module may import its own sub-package and sub-packages of a lower level, never a higher or equal one.
LEVELS = {
    "_version": 0,
    "io": 1,
    "kernels": 1,
    "text": 1,
    "attention": 2,
    "image_tokenizers": 2,
    "data": 2,
    "models": 3,
    "diffusion": 4,
    "convert": 4,
    "generation": 5,
    "training": 5,
    "demo": 6,
    "cli": 7,
}
TOP_LEVEL = 8  # __init__ and the compatibility modules beside it


def _module_name(path: Path) -> str:
    parts = ("dalle_pytorch", *path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}


def _imports(name: str, source: str | None = None) -> set[str]:
    """Every dalle_pytorch module that module `name` imports, anywhere in its body (functions included)."""
    path = MODULES.get(name)
    is_package = path is not None and path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .x import y` inside package p is `from p.x import y`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from package import module` imports the module; `from module import name` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def _level(name: str) -> int:
    parts = name.split(".")
    return LEVELS.get(parts[1], TOP_LEVEL) if len(parts) > 1 else TOP_LEVEL


def _subpackage(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVELS else "<top>"


def test_every_subpackage_has_a_level():
    subpackages = {path.parent.name for path in PACKAGE_ROOT.glob("*/__init__.py")} - {"assets"}
    assert subpackages <= set(LEVELS), f"give these sub-packages a level: {sorted(subpackages - set(LEVELS))}"


def test_imports_point_down():
    upward = []
    for name in MODULES:
        for target in _imports(name):
            if _subpackage(target) != _subpackage(name) and _level(target) >= _level(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: _imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            # a package's __init__ importing its own modules is how packages work, not a cycle
            if name != "dalle_pytorch" and target.startswith(name + "."):
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_function_level_and_relative_imports():
    source = (
        "from . import checkpoint\n"
        "def load():\n"
        "    from dalle_pytorch.models.clip import CLIP\n"
        "    import dalle_pytorch.text.tokenizer\n"
        "    from ..kernels import dropout_attention\n"
    )
    assert _imports("dalle_pytorch.io.example", source) == {
        "dalle_pytorch.io.checkpoint",
        "dalle_pytorch.models.clip",
        "dalle_pytorch.text.tokenizer",
        "dalle_pytorch.kernels.dropout_attention",
    }
