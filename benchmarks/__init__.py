"""Benchmarks of fsam_kernels: per-op microbenchmarks, memory, launch counts and end-to-end steps.

Run ``python benchmarks/run.py --quick`` (any machine) or ``--full`` (a GPU); see docs/benchmarks.md.
"""
