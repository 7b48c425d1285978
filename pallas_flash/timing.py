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


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``n`` cases in which each case takes every position equally often and directly
    follows every other case equally often (a Williams design: n orders for even n, 2n for odd)."""
    if n < 1:
        return [[]]
    base = [0]
    for i in range(1, n):
        base.append((i + 1) // 2 if i % 2 else n - i // 2)
    orders = [[(x + shift) % n for x in base] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 and n > 1 else orders


def interleaved_rounds(cases, *, rounds: int, calls, warmup: int = 0) -> list[list[float]]:
    """`timed_rounds` of several ``(fn, args)`` cases, round r of every case before round r + 1 of
    any; ``calls`` is one count or one per case. Timed one after another, the first case would get
    the coolest, fastest card: the H100 clocks down within seconds of sustained attention (NOTES.md).
    A case also runs at the clock its predecessor leaves: two builds of one kernel timed in a fixed
    order (cuDNN, ours, ours) differed by 0.2 to 0.8% non-causal and 1.9 to 2.4% causal, the one
    right after cuDNN faster in all seven processes (NOTES.md, session 24). So round r takes the
    order `balanced_orders` gives it; a multiple of that many rounds balances positions and
    predecessors exactly.
    """
    calls = list(calls) if isinstance(calls, (list, tuple)) else [calls] * len(cases)
    for (fn, args) in cases:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    per_case = [[] for _ in cases]
    orders = balanced_orders(len(cases))
    for r in range(rounds):
        for i in orders[r % len(orders)]:
            fn, args = cases[i]
            per_case[i] += timed_rounds(fn, args, rounds=1, calls=calls[i])
    return per_case
