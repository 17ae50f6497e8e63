"""The declared dependencies are what the package imports: a new import without a
declaration, or a declaration nothing imports, fails here."""

import ast
import importlib.metadata
import pathlib
import re
import sys

import tomllib
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[2]

# Declared, never imported by flaxcnn, and why each is needed all the same.
NOT_IMPORTED = {
    "importlib-resources": "tensorflow-datasets imports it without declaring it",
    "onednn-cpu-gomp": "oneDNN's library, which the handlers built by setup.py call",
    "ml-dtypes": "jax's: held below 0.7.0, whose import adds 0.6 s to every command",
}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(here_only: bool = True) -> set[str]:
    """The distributions pyproject.toml depends on (`here_only`: on this platform)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    return {
        normalise(r.name)
        for r in requirements
        if not here_only or not r.marker or r.marker.evaluate()
    }


def imported_modules(package: pathlib.Path) -> set[str]:
    """Top-level names of every absolute import in `package`, in functions too."""
    names = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {package.name}


def imported_distributions() -> set[str]:
    by_module = importlib.metadata.packages_distributions()
    modules = imported_modules(REPO / "flaxcnn")
    unknown = sorted(m for m in modules if m not in by_module)
    assert not unknown, f"imported, but no installed distribution provides: {unknown}"
    return {normalise(d) for m in modules for d in by_module[m]}


def test_every_import_is_declared_and_every_declaration_imported():
    imported = imported_distributions()
    assert sorted(imported - declared()) == []
    assert sorted(declared() - imported - set(NOT_IMPORTED)) == []
    assert set(NOT_IMPORTED) <= declared(here_only=False)


def test_tensorflow_datasets_still_needs_importlib_resources_undeclared():
    """Once tensorflow-datasets declares it (or stops importing it), drop it from ours."""
    tfds = importlib.metadata.distribution("tensorflow-datasets")
    requirements = [Requirement(r) for r in tfds.requires or []]
    requires = {normalise(r.name) for r in requirements if not r.marker or r.marker.evaluate()}
    assert "importlib-resources" not in requires  # It asks for it on Python < 3.9 only.
    sources = (pathlib.Path(f.locate()) for f in tfds.files if str(f).endswith(".py"))
    assert any("importlib_resources" in p.read_text(errors="ignore") for p in sources)


def test_the_test_finds_an_undeclared_import(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "m.py").write_text("import os\ndef f():\n    import yaml\n    from . import x\n")
    assert imported_modules(package) == {"yaml"}
