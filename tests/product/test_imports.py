"""The package's shape: every module imports on its own in a fresh interpreter; the graphs
of imports between flaxcnn's modules and between its sub-packages (function-level imports
included) have no cycle; the layers declared for import-linter hold (`lint-imports`) and are
the ones README's "Code layout" states."""

import ast
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = REPO / "flaxcnn"


def module_names() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_modules(module: str, known: set[str]) -> set[str]:
    """The flaxcnn modules `module` imports anywhere in its code: `import a.b`, `from a
    import b` (b a module, or a name of module a)."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                targets.add(child if child in known else node.module)
    return {t for t in targets if t in known and t != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done.
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    known = set(module_names())
    # A package's own __init__ may import its submodules; those edges go down, not around.
    return {m: {t for t in imported_modules(m, known) if not m.startswith(f"{t}.")} for m in known}


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_is_acyclic():
    graph = import_graph()
    assert graph["flaxcnn.runner.loop"]  # The graph sees the loop's imports.
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """`graph` between flaxcnn's direct children (sub-packages and top-level modules): an
    edge wherever a module of one imports a module of another."""

    def top(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else None  # None: the package's own __init__.

    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if (source := top(module)) is not None:
            edges = packages.setdefault(source, set())
            edges.update(t for t in map(top, targets) if t not in (None, source))
    return packages


def test_package_graph_is_acyclic():
    packages = package_graph(import_graph())
    assert "tasks" in packages["runner"]  # The graph sees the runner's imports.
    cycle = find_cycle(packages)
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_package_graph_finds_a_cycle_between_packages():
    graph = {"flaxcnn.a.x": {"flaxcnn.b.y"}, "flaxcnn.b.y": set(), "flaxcnn.b.z": {"flaxcnn.a"}}
    assert find_cycle(package_graph(graph)) == ["a", "b", "a"]


def contract_layers() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="not on this platform: Python 3.10")
    with open(REPO / "pyproject.toml", "rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers"]
    return layers


def test_readme_code_layout_states_the_contract_s_layers():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    section = section.replace("\\|", "|")  # A table cell's escaped bar.
    for layer in contract_layers():
        assert f"`{layer}`" in section, f"README's Code layout lacks the layer {layer!r}"


@pytest.mark.skipif(not shutil.which("lint-imports"), reason="import-linter is not installed")
def test_lint_imports_keeps_the_layers():
    result = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_module_imports_in_a_fresh_interpreter():
    """Each module alone, in a child forked before any flaxcnn module was imported (the
    heavy third-party imports done once, before the fork): none relies on another module
    having been imported first."""
    result = subprocess.run(
        [sys.executable, "-c", EACH_MODULE_ALONE, *module_names()],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["imported", str(len(module_names()))]


EACH_MODULE_ALONE = """
import importlib, os, sys, warnings
import flax, jax, numpy, optax, tensorflow_datasets  # noqa: F401
warnings.simplefilter("ignore")  # jax's warning that a fork follows its threads.
assert not [m for m in sys.modules if m.startswith("flaxcnn")]
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1]:
        failed.append(name)
print("failed", *failed) if failed else print("imported", len(sys.argv) - 1)
sys.exit(1 if failed else 0)
"""
