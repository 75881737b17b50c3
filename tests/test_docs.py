"""The API reference builds clean, covers the public names, and the package metadata holds.

The Sphinx site in ``docs/`` is built once per session with ``-W`` (warnings are errors), in a
subprocess, into a temporary folder. The typing and version checks read the source and
setup.cfg, so they need no build.
"""

from __future__ import annotations

import ast
import configparser
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import captum_chefer

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED_MODULES = ("captum_chefer", "captum_chefer.metrics", "captum_chefer.viz")
CODE_BLOCK = re.compile(r"^\.\. code-block:: python\n\n((?:(?: {3}.*)?\n)+)", re.MULTILINE)


def python_blocks() -> list[tuple[str, str]]:
    """``(page, code)`` for every ``.. code-block:: python`` of the docs pages."""
    blocks = []
    for page in sorted((ROOT / "docs").rglob("*.rst")):
        for match in CODE_BLOCK.finditer(page.read_text(encoding="utf-8")):
            code = "\n".join(line[3:] for line in match.group(1).splitlines())
            blocks.append((page.relative_to(ROOT / "docs").as_posix(), code))
    return blocks


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built site's folder; the build must finish without a warning."""
    out = tmp_path_factory.mktemp("docs") / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + ["-d", str(out.parent / "doctrees"), str(ROOT / "docs"), str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        "Sphinx warned or failed (it comes with pip install -e '.[docs]'):\n"
        + result.stderr[-6000:]
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("page", "code"), python_blocks(), ids=[p for p, _ in python_blocks()])
def test_docs_python_block_runs(page: str, code: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{page}: " + result.stderr[-4000:]


def test_docs_have_a_runnable_example() -> None:
    assert [page for page, _ in python_blocks()] == ["index.rst"]


def anchors(html: Path) -> set[str]:
    """Every ``id="..."`` of the built pages."""
    ids: set[str] = set()
    for page in html.rglob("*.html"):
        ids |= set(re.findall(r'id="([\w.]+)"', page.read_text(encoding="utf-8")))
    return ids


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(html: Path) -> None:
    page = (html / "api" / "attributions.html").read_text(encoding="utf-8")
    assert "token_index" in page, "CheferRelevance.attribute's docstring is not in the reference"
    assert (html / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("module", DOCUMENTED_MODULES)
def test_every_public_name_is_in_the_reference(html: Path, module: str) -> None:
    ids = anchors(html)
    public = [name for name in importlib.import_module(module).__all__ if name != "__version__"]
    missing = [name for name in public if f"{module}.{name}" not in ids]
    assert not missing, f"add {missing} to a page in docs/api/ (public in {module})"


def type_checking_imports() -> set[str]:
    """Names imported under ``if TYPE_CHECKING:`` in captum_chefer/__init__.py."""
    tree = ast.parse((ROOT / "captum_chefer" / "__init__.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for statement in ast.walk(node):
                if isinstance(statement, ast.ImportFrom):
                    names |= {alias.asname or alias.name for alias in statement.names}
    return names


def test_every_lazy_name_has_a_type_checking_import() -> None:
    lazy = set(captum_chefer._LAZY)
    assert lazy, "captum_chefer has no lazy names"
    assert type_checking_imports() == lazy, (
        "the TYPE_CHECKING imports in captum_chefer/__init__.py must match its lazy names, "
        "or type checkers see Any"
    )


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in captum_chefer.__all__:
        assert getattr(captum_chefer, name) is not None
        assert name in dir(captum_chefer)
    assert (
        captum_chefer.CheferRelevance
        is importlib.import_module("captum_chefer.attr").__dict__["CheferRelevance"]
    )
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        _ = captum_chefer.NotAThing  # type: ignore[attr-defined]


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def test_py_typed_ships_with_the_package() -> None:
    assert (ROOT / "captum_chefer" / "py.typed").is_file()
    package_data = setup_cfg()["options.package_data"]["captum_chefer"]
    assert "py.typed" in package_data.split()


def test_version_is_written_once_and_has_a_changelog_entry() -> None:
    assert setup_cfg()["metadata"]["version"] == "attr: captum_chefer.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:[ab]\d+|rc\d+|\.dev\d+)?", captum_chefer.__version__)
    installed = importlib.metadata.version("captum_chefer")
    assert installed == captum_chefer.__version__, (
        f"installed metadata says {installed}: reinstall with pip install -e ."
    )
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (\S+)", changelog, re.MULTILINE)
    assert "Unreleased" in headings
    assert captum_chefer.__version__ in headings, "add the version's section to CHANGELOG.md"
