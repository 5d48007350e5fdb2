"""The status package's layering: each module imports only those listed before it in the
package's docstring, the rules and the rendering load without the database driver or the HTTP
client, and importing the package loads none of its modules."""

import subprocess
import sys
from pathlib import Path

import pytest

import aggregator.status

HEAVY = ("asyncpg", "aiohttp", "aggregator.storage", "aggregator.pipeline")
LAYERS = ("verdict", "render", "queries", "html_data", "html", "command")


def loaded_after(statement: str) -> set[str]:
    """The modules of interest a fresh interpreter holds after running `statement`."""
    probe = (
        f"{statement}\nimport sys\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('aggregator', 'asyncpg', "
        "'aiohttp'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


@pytest.mark.parametrize("layer", range(len(LAYERS)))
def test_each_module_imports_none_listed_after_it(layer: int) -> None:
    loaded = loaded_after(f"import aggregator.status.{LAYERS[layer]}")
    assert f"aggregator.status.{LAYERS[layer]}" in loaded
    assert not loaded & {f"aggregator.status.{later}" for later in LAYERS[layer + 1 :]}


def test_rules_and_rendering_load_without_the_database_or_http_stack() -> None:
    loaded = loaded_after("from aggregator.status import render, verdict")
    assert {"aggregator.status.verdict", "aggregator.status.render"} <= loaded
    assert not {m for m in loaded if m.startswith(HEAVY)}


def test_the_package_itself_imports_none_of_its_modules() -> None:
    loaded = loaded_after("import aggregator.status")
    assert not {m for m in loaded if m.startswith("aggregator.status.")}
    assert not {m for m in loaded if m.startswith(HEAVY)}


def test_the_layers_are_every_module_of_the_package() -> None:
    package = Path(aggregator.status.__file__).parent
    assert {p.stem for p in package.glob("*.py")} - {"__init__"} == set(LAYERS)
