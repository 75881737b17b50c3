"""Sphinx configuration of the captum_chefer API reference.

Build it with ``python -m sphinx -W -b html docs docs/_build/html``; ``tests/test_docs.py`` does
so with warnings as errors.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import captum_chefer  # noqa: E402

if TYPE_CHECKING:
    from sphinx.application import Sphinx

project = "captum_chefer"
author = "captum_chefer contributors"
copyright = "2026, captum_chefer contributors"
release = captum_chefer.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each field

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}
add_module_names = False  # each page says where its names are imported from

exclude_patterns = ["_build"]
templates_path: list[str] = []

html_theme = "furo"
html_title = f"captum_chefer {release}"
html_static_path: list[str] = []


def _skip_namedtuple_fields(
    app: Sphinx, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    """Leave out NamedTuple fields: their docstrings are "Alias for field number N", and the
    class docstring's ``Attributes:`` section describes them already."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def setup(app: Sphinx) -> None:
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
