"""MkDocs hooks (mkdocs.yml `hooks:`): the API reference lists every built-in model.

`docs/api.md` holds the marker line `<!-- built-in models -->`; each model registered in
`flaxcnn.models.MODELS` replaces it with a mkdocstrings block at the module path where the
class lives, so a new model, or one moved to another module, is documented without an edit.
"""

MARKER = "<!-- built-in models -->"
OPTIONS = """    options:
      show_if_no_docstring: true
      filters: ["!^_", "!^setup$"]"""


def model_blocks() -> str:
    """One `::: module.Class` block per built-in model, in the registry's order."""
    from flaxcnn.models import MODELS

    paths = [f"{model.__module__}.{model.__qualname__}" for model in MODELS.values()]
    return "\n\n".join(f"::: {path}\n{OPTIONS}" for path in paths)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, model_blocks())
