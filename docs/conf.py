"""Sphinx configuration of agkd's documentation site: the guide pages (Markdown, through
MyST) and the API reference, built from the docstrings. Build it with

    sphinx-build -W -b html docs docs/_build/html

Sphinx rather than MkDocs: the docstrings are Google style with reStructuredText math and
cross-references (``.. math::``, ``:func:``), which autodoc and napoleon render as they are.
"""
import importlib.util

project = "agkd"
author = "the agkd developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# The results/ pages are data written by `agkd compare`; the guide cites them by path.
exclude_patterns = ["_build", "results"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "furo" if importlib.util.find_spec("furo") else "alabaster"
html_title = "agkd"


def _settings_table(app, what, name, obj, options, lines):
    """A settings class's docstring gains its fields as the configuration names them
    (``section.key``), each with its default and meaning, declared once in the class."""
    import dataclasses

    from agkd_models.settings import Settings

    if what != "class" or not (isinstance(obj, type) and issubclass(obj, Settings)) or obj is Settings:
        return
    section = getattr(obj, "section", "")
    lines += ["", f"Settings (the ``{section}`` section of the configuration):" if section else "Settings:", ""]
    for field in dataclasses.fields(obj):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"* ``{section + '.' if section else ''}{field.name}`` (default ``{default!r}``): "
                     f"{field.metadata['rule'].help}")
    lines.append("")


def setup(app):
    app.connect("autodoc-process-docstring", _settings_table)
