"""Imports only run down the package's layers (README, Layout): no module imports one of a higher layer, at the top
of a file or inside a function, and no two modules import each other."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "diffusion_align"
# lowest first; a module's layer is that of its longest listed prefix
LAYERS = [
    ["diffusion_align", "diffusion_align.files", "diffusion_align.images", "diffusion_align.config",
     "diffusion_align.devices", "diffusion_align.progress"],
    ["diffusion_align.models"],
    ["diffusion_align.data"],
    ["diffusion_align.objectives"],
    ["diffusion_align.evaluation", "diffusion_align.toy.world", "diffusion_align.toy.oracle"],  # the toy world's
    ["diffusion_align.rewards"],                                                                # pure leaves
    ["diffusion_align.training"],
    ["diffusion_align.toy"],
    ["diffusion_align.cli", "diffusion_align.__main__"],
]


def layer(module: str) -> int:
    prefixes = [(len(p), i) for i, names in enumerate(LAYERS) for p in names
                if module == p or module.startswith(p + ".")]
    return max(prefixes)[1]


def imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports (relative imports, resolved)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1]  # what a relative import starts from, for a module and an __init__ alike
        module = ".".join(package if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{alias.name}" for alias in node.names]  # `from . import x` may name modules
                targets |= {name for name in names if _is_module(name)} or {target}
        graph[module] = targets
    return graph


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_imports_only_run_down():
    upward = [f"{a} -> {b}" for a, targets in imports().items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def test_no_two_modules_import_each_other():
    graph = imports()
    mutual = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                     if a != b and a in graph.get(b, ())})
    assert not mutual, f"modules that import each other: {mutual}"
