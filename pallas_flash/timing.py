"""The one timing loop: the benchmarks and `autotune` time with it."""

from __future__ import annotations

import statistics
import time

import jax


def timed_rounds(fn, args, *, rounds: int, calls: int, warmup: int = 0) -> list[float]:
    """Per-call seconds of each round: ``calls`` asynchronous dispatches of ``fn(*args)`` with only
    the last one waited on. Calls run in order on one stream, so the last one finishing means all
    have, and host dispatch overlaps device work instead of counting."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / calls)
        del out
    return per_call


def median_seconds(fn, args, *, rounds: int, calls: int, warmup: int = 1) -> float:
    """Median per-call seconds over ``rounds`` of `timed_rounds`, after ``warmup`` calls."""
    return statistics.median(timed_rounds(fn, args, rounds=rounds, calls=calls, warmup=warmup))
