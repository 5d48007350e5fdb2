"""The status package's layering: the rules and the rendering load without the database driver
or the HTTP client, and importing the package loads none of its modules."""

import subprocess
import sys

HEAVY = ("asyncpg", "aiohttp", "aggregator.storage", "aggregator.pipeline")


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


def test_rules_and_rendering_load_without_the_database_or_http_stack() -> None:
    loaded = loaded_after("from aggregator.status import render, verdict")
    assert {"aggregator.status.verdict", "aggregator.status.render"} <= loaded
    assert not {m for m in loaded if m.startswith(HEAVY)}
    # Nothing below the rules is pulled in by them: no upward import, no cycle through them.
    assert not loaded & {"aggregator.status.queries", "aggregator.status.command"}


def test_the_package_itself_imports_none_of_its_modules() -> None:
    loaded = loaded_after("import aggregator.status")
    assert not {m for m in loaded if m.startswith("aggregator.status.")}
    assert not {m for m in loaded if m.startswith(HEAVY)}
