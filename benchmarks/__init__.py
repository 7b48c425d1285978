"""Benchmarks of pallas_flash against its baselines; each module runs as
``python -m benchmarks.<module> --help`` and writes its results under ``benchmarks/results/``.
"""
