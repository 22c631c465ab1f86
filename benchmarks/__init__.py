"""Benchmarks for hapo_ops: ``python -m benchmarks --help``.

Kept free of heavy imports so that the CLI can set TRITON_INTERPRET before Triton loads.
"""
