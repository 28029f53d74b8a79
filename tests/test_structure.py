"""The code's shape: subpackages that depend on each other one way only, no import cycles, no
private names imported across modules, no public name defined twice, no class over about 250
lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tl_cli"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported tl_cli module, names) for every import in the file, top level or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("tl_cli")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, []) if sub in modules else (node.module, [alias.name]))
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {
        name: {m for m, _ in _imports(path, modules) if m in modules and m != name} for name, path in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_private_names_imported_across_modules():
    modules = _modules()
    offenders = [
        f"{name} imports {module}.{n}"
        for name, path in modules.items()
        for module, names in _imports(path, modules)
        for n in names
        if n.startswith("_") and not n.endswith("__") and module != name
    ]
    assert not offenders, offenders


def test_no_class_over_about_250_lines():
    big = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 260:
                big.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not big, big


# Each subpackage (or top-level module) may import only those listed: the architecture, from the
# bottom (errors) to the top (the command line). A new dependency is a decision, made here.
LAYERS = {
    "tl_cli": set(),
    "tl_cli.errors": set(),
    "tl_cli.cluster": {"tl_cli.errors"},
    "tl_cli.backbones": {"tl_cli.errors"},
    "tl_cli.data": {"tl_cli.errors", "tl_cli.cluster"},
    "tl_cli.reports": {"tl_cli.errors", "tl_cli.data"},
    "tl_cli.datatools": {"tl_cli.errors", "tl_cli.data"},
    "tl_cli.callbacks": {"tl_cli", "tl_cli.errors", "tl_cli.cluster", "tl_cli.data"},
    "tl_cli.models": {
        "tl_cli",
        "tl_cli.errors",
        "tl_cli.cluster",
        "tl_cli.data",
        "tl_cli.backbones",
        "tl_cli.reports",
        "tl_cli.callbacks",
    },
    "tl_cli.export": {"tl_cli.errors", "tl_cli.data", "tl_cli.datatools", "tl_cli.reports", "tl_cli.models"},
}
LAYERS["tl_cli.cli"] = set(LAYERS) - {"tl_cli.cli"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_subpackages_depend_on_each_other_one_way():
    modules = _modules()
    unknown = sorted({_layer(name) for name in modules} - set(LAYERS))
    assert not unknown, f"add {unknown} to LAYERS (and to the README's Layout section)"
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        for target, _ in _imports(path, modules)
        # tl_cli itself holds only the version and the checkpoint format: anyone may read them
        if _layer(target) not in (_layer(name), "tl_cli") and _layer(target) not in LAYERS[_layer(name)]
    )
    assert not wrong, wrong


def test_no_public_function_or_class_name_is_defined_in_two_modules():
    seen: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                seen.setdefault(node.name, []).append(name)
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_the_readme_layout_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name, path in _modules().items()
        if path.name != "__init__.py" and f"{path.relative_to(PACKAGE.parent).as_posix()}" not in layout
    ]
    assert not missing, missing


def test_every_mutation_of_make_mutate_still_applies_and_names_existing_tests():
    """`make mutate` is not run in CI: its list must not rot as the code and tests move."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mutation_smoke", PACKAGE.parent / "scripts" / "mutation_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    problems = []
    for name, (path, find, _, tests) in smoke.MUTATIONS.items():
        count = (PACKAGE.parent / path).read_text().count(find)
        if count != 1:
            problems.append(f"{name}: its text occurs {count} times in {path}")
        for test in tests:
            file, _, function = test.partition("::")
            source = (PACKAGE.parent / file).read_text() if (PACKAGE.parent / file).is_file() else None
            if source is None or (function and f"def {function.split('[')[0]}(" not in source):
                problems.append(f"{name}: no test {test}")
    assert not problems, problems
