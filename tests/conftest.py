"""What needs PyHealth runs in its own Python 3.12 environment: ``tests/pyhealth/run.sh``.

pyhealth 2.1.0 needs Python >= 3.12, and the main suite runs on 3.11 without it. So a run that
does not name them (the main suite's plain ``pytest``) leaves out what needs PyHealth:

- ``tests/pyhealth`` (not collected);
- the doctests of ``captum_chefer/pyhealth.py`` and the runs of ``tutorials/04_pyhealth``'s
  script and notebook (deselected; the notebook's pairing with its script is still checked).

``run.sh`` names them (``pytest tests/pyhealth captum_chefer/pyhealth.py``) in the 3.12
environment it makes, where they all run; named anywhere without PyHealth, they fail loudly.
It is the conftest of ``tests/`` (loaded for any selection there: ``pytest
tests/test_tutorials.py`` too, and before ``captum_chefer/`` in the default run, whose
collection it sees whole); it imports nothing from PyHealth.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tests" / "pyhealth"
ADAPTER = ROOT / "captum_chefer" / "pyhealth.py"
TUTORIAL = "04_pyhealth"
TUTORIAL_RUNS = ("test_tutorial_runs_and_writes_figures", "test_notebook_executes")


def pyhealth_named(config: pytest.Config) -> bool:
    """Whether the command line names this folder or the adapter (or something inside them)."""
    base = config.invocation_params.dir
    for argument in config.args:
        path = (base / argument.split("::")[0]).resolve()
        for target in (HERE, ADAPTER):
            if path == target or target in path.parents:
                return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if HERE in collection_path.parents and not pyhealth_named(config):
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if pyhealth_named(config):
        return
    needs = [item for item in items if _needs_pyhealth(item)]
    if needs:
        config.hook.pytest_deselected(items=needs)
        items[:] = [item for item in items if item not in needs]


def _needs_pyhealth(item: pytest.Item) -> bool:
    if Path(item.path) == ADAPTER:
        return True
    name = getattr(item, "originalname", item.name)
    return name in TUTORIAL_RUNS and TUTORIAL in item.name
