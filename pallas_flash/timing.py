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


def interleaved_rounds(cases, *, rounds: int, calls, warmup: int = 0) -> list[list[float]]:
    """`timed_rounds` of several ``(fn, args)`` cases, round r of every case before round r + 1 of
    any; ``calls`` is one count or one per case. Timed one after another, the first case would get
    the coolest, fastest card: the H100 clocks down within seconds of sustained attention (NOTES.md).
    """
    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls] * len(cases)
    for (fn, args) in cases:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    per_case = [[] for _ in cases]
    for _ in range(rounds):
        for times, (fn, args), n in zip(per_case, cases, calls):
            times += timed_rounds(fn, args, rounds=1, calls=n)
    return per_case
