"""pytest configuration shared by all tests (markers are declared in pyproject.toml).

- Tests marked ``cuda`` run wherever ``torch.cuda.is_available()``; elsewhere
  they are reported as skipped with that reason.
- ``tests/interpreter/`` holds tests of the Triton kernels on CPU tensors; they
  are collected only in a process started with ``TRITON_INTERPRET=1``
  (tests/test_triton_interpreter.py starts one).
"""

import os

import pytest
import torch

import pyllm  # noqa: F401  (loads the extensions before any test module)

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_ignore_collect(collection_path, config):
    if collection_path.name == "interpreter" and not INTERPRETING:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """After a cuda test, the memory its tensors held goes back to the device
    (torch's caching allocator would keep it), so that other test processes
    sharing the GPU can have it."""
    yield
    if request.node.get_closest_marker("cuda") is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def pytest_collection_finish(session):
    """The Triton interpreter's run (tests/test_triton_interpreter.py) starts
    now, in the background, when any of its tests is selected."""
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_background_run"):
            module.start_background_run()
            return


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The number of hypothesis examples run (tests/properties.py), per op/backend."""
    import sys

    properties = sys.modules.get("properties")
    if properties is None or not properties.EXAMPLES:
        return
    total = sum(properties.EXAMPLES.values())
    terminalreporter.write_sep("-", f"hypothesis: {total} examples run (profile "
                                    f"{properties.PROFILE})")
    for name, n in sorted(properties.EXAMPLES.items()):
        terminalreporter.write_line(f"  {name}: {n}")
