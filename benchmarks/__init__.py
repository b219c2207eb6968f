"""Benchmarks and the rollover soak (run from the repository root; see README.md here).

A package only so that ``python -m benchmarks.soak`` finds the soak; the
bench_*.py scripts are run by path (``python benchmarks/bench_x.py``).
"""
