"""Benchmarks: the one list of cases (:mod:`.cases`), timing (:mod:`.timing`),
the machine's ceilings (:mod:`.machine`) and the runner behind ``pyllm bench``
(:mod:`.runner`). The pytest-benchmark suite in ``bench/`` uses the same cases."""
