"""The documentation's shape: a README a newcomer reads in minutes, every guide reachable
from the site's navigation, and every built-in model in the API reference. `.ci/run`
builds the site itself with warnings as errors (`mkdocs build --strict`)."""

import importlib.util
import pathlib

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]

README_MAX_LINES = 300


def nav_pages(nav) -> set[str]:
    """Every page file named in an mkdocs `nav`, sections included."""
    pages = set()
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages |= nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_readme_reads_in_minutes():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_every_guide_is_in_the_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    guides = {p.name for p in (REPO / "docs").glob("*.md")}
    assert sorted(guides - pages) == []
    assert sorted(pages - guides) == []


def test_the_api_reference_lists_every_built_in_model():
    from flaxcnn.models import MODELS

    spec = importlib.util.spec_from_file_location("hooks", REPO / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    api = (REPO / "docs" / "api.md").read_text()
    page = hooks.on_page_markdown(api, None, None, None)
    for model in MODELS.values():
        assert f"::: {model.__module__}.{model.__qualname__}\n" in page
    assert "::: flaxcnn.api.fit" in page and "::: flaxcnn.inference.load_run" in page
    assert "::: flaxcnn.tasks.base" in page
