"""The README's code runs as written.

What runs, and what is only checked, and why:

- Every ```python block runs in a subprocess of its own, from an empty temporary folder (so
  nothing from the checkout is on the path but the installed package), with
  ``HF_HUB_OFFLINE=1`` and ``MPLBACKEND=Agg``, and must exit 0. The blocks assert what their
  comments claim (shapes, zeros at padding), so a wrong claim fails here too.
- The demo command's last step, ``python -m captum_chefer.demo``, runs the same way and must
  write the two files the README names.
- The install steps (``python3 -m venv``, ``pip install``) are not run by the tests: a fresh
  venv takes minutes and a network. What is checked instead, honestly and cheaply:
  the README's test command is, character for character, the command ``.ci/run`` runs, so CI
  runs it on a fresh clone at every submission; every extra that the README names exists in
  setup.cfg; and every module that a python block imports comes from the package's own
  requirements, the extra named on the block's first line, or a ``--no-deps`` package named
  there, so that the block's install line is enough. The demo command and the CPU-only lines
  were run by hand in fresh venvs when they were written (CHANGELOG.md, Unreleased).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
EXTRA = re.compile(r'"(?:\.|captum_chefer)\[([\w,-]+)\]"')
TABLE_ROW = re.compile(r"^\| `\[([\w-]+)\]` \|", re.MULTILINE)
NO_DEPS = re.compile(r"--no-deps ([\w.-]+?)(?:==[\w.]+)?(?:\s|$)")


def code_blocks(language: str) -> list[tuple[str, str]]:
    """``(section heading, code)`` for each fenced block of ``language``, in order."""
    blocks = []
    for match in FENCE.finditer(README):
        if match.group(1) == language:
            headings = re.findall(r"^## (.+)$", README[: match.start()], re.MULTILINE)
            blocks.append((headings[-1] if headings else "top", match.group(2)))
    return blocks


PYTHON_BLOCKS = code_blocks("python")
BASH_LINES = [line for _, code in code_blocks("bash") for line in code.splitlines()]


def command_with(marker: str) -> str:
    """The one README bash line that contains ``marker``."""
    lines = [line for line in BASH_LINES if marker in line]
    assert len(lines) == 1, f"expected one README command containing {marker!r}, got {lines}"
    return lines[0]


def canonical(name: str) -> str:
    """A distribution name in PEP 503 form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(lines: str) -> set[str]:
    """Distribution names of a setup.cfg requirement list."""
    return {canonical(re.split(r"[<>=!~\[; ]", line.strip())[0]) for line in lines.split("\n")} - {
        ""
    }


def setup_requirements() -> tuple[set[str], dict[str, set[str]]]:
    """``install_requires`` and each extra's requirements, as distribution names."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    extras = {
        name: requirement_names(value) for name, value in config["options.extras_require"].items()
    }
    return requirement_names(config["options"]["install_requires"]), extras


def run_python(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_readme_has_the_examples_it_promises() -> None:
    assert [heading for heading, _ in PYTHON_BLOCKS] == ["Text", "Vision"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("heading", "code"), PYTHON_BLOCKS, ids=[heading for heading, _ in PYTHON_BLOCKS]
)
def test_python_block_runs_as_written(heading: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    result = run_python([str(script)], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.mark.parametrize(
    ("heading", "code"), PYTHON_BLOCKS, ids=[heading for heading, _ in PYTHON_BLOCKS]
)
def test_python_block_install_line_brings_its_imports(heading: str, code: str) -> None:
    first = code.splitlines()[0]
    assert first.startswith("# pip install"), f"the {heading} block must start with its install"
    core, extras = setup_requirements()
    named = EXTRA.findall(first)
    assert named, f"the {heading} block's install line names no extra: {first}"
    available = set(core) | {canonical(name) for name in NO_DEPS.findall(first)}
    for extra in ",".join(named).split(","):
        assert extra in extras, f"the {heading} block names a missing extra [{extra}]"
        available |= extras[extra]
    distributions = importlib.metadata.packages_distributions()
    for module in imported_modules(code):
        if module in sys.stdlib_module_names or module == "captum_chefer":
            continue
        provided = {canonical(name) for name in distributions.get(module, [module])}
        assert provided & available, (
            f"the {heading} block imports {module!r}, which its install line does not bring"
        )


def imported_modules(code: str) -> set[str]:
    """Top-level module names that ``code`` imports."""
    modules = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_readme_test_command_is_what_ci_runs() -> None:
    command = command_with("-m pytest")
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci_lines, "README's test command and .ci/run differ: make them equal"


LOCK = ROOT / "tests" / "constraints.txt"


def test_the_test_command_installs_the_lock_and_the_lock_pins_every_test_requirement() -> None:
    """A fresh machine gets the versions CI last passed with: the command passes the lock as
    pip constraints, and the lock pins (``==``) torch, torchvision and every requirement of the
    package and of ``[test]``."""
    command = command_with("-m pytest")
    assert "-c tests/constraints.txt" in command
    pinned = {
        canonical(line.split("==")[0]): line.split("==")[1]
        for line in LOCK.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    core, extras = setup_requirements()
    needed = core | extras["test"] | {"torch", "torchvision", "tokenizers"}
    assert needed <= set(pinned), f"the lock does not pin {sorted(needed - set(pinned))}"
    assert pinned["torch"] in command and pinned["torchvision"] in command


def test_ci_latest_runs_the_test_command_without_the_lock() -> None:
    """``.ci/latest`` installs what the README's test command installs, minus the lock."""
    latest = (ROOT / ".ci" / "latest").read_text(encoding="utf-8")
    command = command_with("-m pytest").split(" && .venv/bin/python -m pytest")[0]
    unlocked = command.replace("-c tests/constraints.txt", "--upgrade").replace(
        ".venv", ".venv-latest"
    )
    assert unlocked in latest.splitlines()


def test_every_extra_the_readme_names_exists() -> None:
    _, extras = setup_requirements()
    named = {extra for group in EXTRA.findall(README) for extra in group.split(",")}
    named |= set(re.findall(r"`\[([\w-]+)\]`", README))
    assert named, "the README names no extra"
    assert named <= set(extras), (
        f"README names extras missing from setup.cfg: {named - set(extras)}"
    )


def test_install_table_lists_every_extra() -> None:
    _, extras = setup_requirements()
    listed = TABLE_ROW.findall(README)
    assert len(listed) == len(set(listed)), f"an extra is listed twice: {listed}"
    assert set(listed) == set(extras), (
        "README's install table and setup.cfg's extras differ: add a row for "
        f"{sorted(set(extras) - set(listed))}, remove {sorted(set(listed) - set(extras))}"
    )


@pytest.mark.slow
def test_demo_command_final_step_runs(tmp_path: Path) -> None:
    step = shlex.split(command_with("captum_chefer.demo").split("&&")[-1])
    assert step[:3] == [".venv/bin/python", "-m", "captum_chefer.demo"], step
    result = run_python(step[1:], tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for name in ("similarity.html", "similarity.png"):
        assert (tmp_path / "demo_output" / name).stat().st_size > 0, name
        assert f"demo_output/{name}" in README, f"README no longer names demo_output/{name}"
