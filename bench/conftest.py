"""pytest-benchmark suite over the cases of ``pyllm bench`` (pyllm/benchmark/cases.py).

Not part of the test run (pytest's testpaths is tests/). Run it with

    .venv/bin/python -m pytest bench/ --benchmark-autosave
    .venv/bin/python -m pytest bench/ --benchmark-compare
"""
