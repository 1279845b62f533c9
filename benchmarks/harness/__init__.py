"""The benchmark harness: what a case is, how it is timed and checked, and how results are shown.

``benchmarks/run.py`` is the entry point; the op groups live in ``benchmarks/cases/``.
"""
