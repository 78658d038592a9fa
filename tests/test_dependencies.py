"""No dead dependencies: every runtime dependency in pyproject.toml is imported by the code it ships."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Distribution name -> the module it installs, where the two differ.
IMPORT_NAMES = {"aiohttp-session": "aiohttp_session", "pysimdjson": "simdjson"}


def _imported_top_levels() -> set[str]:
    out: set[str] = set()
    for package in ("gateway", "ledger"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    out.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    out.add(node.module.split(".")[0])
    return out


def _runtime_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0].strip().lower() for dep in project["dependencies"]]
    assert names, "pyproject.toml declares no dependencies"
    return names


def test_every_runtime_dependency_is_imported() -> None:
    imported = _imported_top_levels()
    dead = [d for d in _runtime_dependencies() if IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported]
    assert dead == [], f"declared but never imported: {dead}"


def test_the_omise_sdk_is_not_a_dependency_nor_a_warning_filter() -> None:
    # The REST client on aiohttp (gateway/omise_api.py) replaced Omise's SDK.
    assert "omise" not in _runtime_dependencies()
    assert "omise.*" not in (ROOT / "setup.cfg").read_text()
