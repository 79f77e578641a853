"""A pytest plugin for the process that runs tests/interpreter/ with the
Triton interpreter on: it writes each test's node id, outcome and failure
text to the JSON file named by PYLLM_INTERPRETER_REPORT, so that
tests/test_triton_interpreter.py can report every interpreted test as a test
of its own (``--collect-only`` writes the node ids alone)."""

from __future__ import annotations

import json
import os

_RESULTS: dict[str, dict] = {}
_COLLECTED: list[str] = []


def _key(nodeid: str) -> str:
    """The node id from the interpreter folder on (the same whatever the
    rootdir the process started in)."""
    marker = "interpreter/"
    return nodeid[nodeid.index(marker) + len(marker):] if marker in nodeid else nodeid


def pytest_collection_finish(session):
    _COLLECTED.extend(_key(item.nodeid) for item in session.items)


def pytest_runtest_logreport(report):
    key = _key(report.nodeid)
    entry = _RESULTS.setdefault(key, {"outcome": "passed", "text": ""})
    if report.failed:
        entry["outcome"] = "failed"
        entry["text"] += f"[{report.when}] {report.longreprtext}\n"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        entry["text"] = reason


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PYLLM_INTERPRETER_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"collected": _COLLECTED, "results": _RESULTS}, f)
