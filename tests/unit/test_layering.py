"""The dependency rules of docs/architecture.md that an import can check."""

import subprocess
import sys


def _imports(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


def test_the_http_layer_imports_no_torch():
    assert "torch" not in _imports("shardserve.api.app")


def test_the_planner_and_scheduler_import_no_torch():
    mods = _imports("shardserve.planner.placement") | _imports("shardserve.engine.scheduler")
    assert "torch" not in mods


def test_the_api_side_of_the_engine_core_imports_no_torch():
    """The server process talks to engine cores, never to torch: the engine's loop and the
    model live in other processes."""
    assert "torch" not in _imports("shardserve.engine.async_engine")
