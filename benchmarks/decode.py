"""Decode (KV-cache) attention bandwidth: pallas_flash.decode against jax.nn.dot_product_attention.

    python -m benchmarks.decode --out $OUT/decode.json          # the full grid on a GPU (< 3 min)
    python -m benchmarks.decode --no-sweep                      # skip the tuning sweep
    python -m benchmarks.decode --cases 1x131072,8x32768        # BxS pairs

Every case is one token per row (T=1) of N=32 query heads against a full bf16 cache of K=8 heads of
dim 128 (``cache_lengths == S``), for B in {1, 8, 64} and S in {4k, 32k, 128k}. In one process and
on the same inputs it times:

* ``pallas_flash``: `pallas_flash.decode.decode_attention` (split-K Flash-Decoding);
* ``xla`` and ``cudnn``: ``jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
  implementation=...)``; a refusal or an out-of-memory is recorded as the case's status.

A figure is the median over ``--rounds`` rounds of the mean of ``--calls`` back-to-back calls (only
the last one waited on), after a compile and warm-up. Bandwidth is the bytes of K and V the attention
must read (``2 * B * S * K * H * 2``) over that time, the figure of merit of a memory-bound kernel; it
is also given as a fraction of the card's copy bandwidth, measured here with a 2 GiB ``x * 2`` (read
plus write bytes over time). Our output is checked against the ``xla`` one (relative L2 error).

``--sweep`` (on by default) also times a few tilings and split counts of our kernel at B=1, S=128k
and B=8, S=32k, the shapes that depend on split-K, to pick `DecodeConfig` defaults from; sweep
entries stop being started after ``--budget-s`` seconds. On a machine without a GPU it runs one tiny
interpret-mode smoke case (and a two-entry smoke sweep) instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pallas_flash.timing import timed_rounds
from pallas_flash.decode import DecodeConfig, decode_attention, resolve_config, sm_count

# (N query heads, K K/V heads, head dim H); interpret mode on CPU gets a smoke test, not a measurement.
HEADS = (32, 8, 128)
SMOKE_HEADS = (4, 2, 64)
BATCHES = (1, 8, 64)
SEQ_LENS = (4096, 32768, 131072)
IMPLS = ("pallas_flash", "xla", "cudnn")
MEMORY_LIMIT_BYTES = 60e9
# Relative L2 error of our bf16 output against XLA's that still counts as agreement.
TOLERANCE = 2e-2
# (block_k, num_warps, num_stages, num_splits; None: the default) tried by --sweep. A bf16 stage of
# K and V tiles costs 2 * block_k * 128 * 2 bytes of shared memory (block_k=128: 64 KiB), and an
# H100 block gets at most 227 KiB; configurations over it are recorded as compile errors.
SWEEP = {
    (1, 131072): [(None, 4, 2, None), (64, 4, 2, None), (64, 4, 3, None), (64, 4, 4, None), (64, 8, 4, None),
                  (128, 4, 3, None), (128, 8, 2, None), (32, 4, 4, None),
                  (None, 4, 2, 16), (None, 4, 2, 33), (None, 4, 2, 132), (None, 4, 2, 264)],
    (8, 32768): [(None, 4, 2, None), (64, 4, 3, None), (128, 4, 3, None),
                 (None, 4, 2, 4), (None, 4, 2, 8), (None, 4, 2, 16), (None, 4, 2, 33)],
}
# On CPU: only proves that the sweep's code path runs.
SMOKE_SWEEP = {(2, 256): [(None, 4, 2, None), (32, 4, 3, 3)]}


def planned(B: int, S: int, heads, dtype, config: DecodeConfig | None = None) -> DecodeConfig:
    """The tiling and split count our kernel will use for this case."""
    N, K, H = heads
    return resolve_config(config, batch=B, num_tokens=1, num_heads=N, kv_heads=K, head_dim=H, kv_len=S,
                          itemsize=jnp.dtype(dtype).itemsize)


def kv_bytes(B: int, S: int, heads, dtype) -> int:
    _, K, H = heads
    return 2 * B * S * K * H * jnp.dtype(dtype).itemsize


def memory_estimate(B: int, S: int, heads, dtype) -> float:
    """The caches plus XLA's float32 logits and probabilities ``[B, N, 1, S]`` (a few copies)."""
    return kv_bytes(B, S, heads, dtype) + 4 * B * heads[0] * S * 4


def classify(exc: BaseException) -> tuple[str, str]:
    message = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    low = message.lower()
    oom = ("resource_exhausted", "resource exhausted", "out of memory", "failed to allocate")
    if any(s in low for s in oom):
        return "oom", message
    if isinstance(exc, NotImplementedError) or "not supported" in low or "unimplemented" in low:
        return "unsupported", message
    return "error", message


def attention_fn(impl: str, config: DecodeConfig | None = None):
    """``f(q, k, v, lengths) -> [B, 1, N, H]`` for one implementation, default scale 1/sqrt(H)."""
    if impl == "pallas_flash":
        return lambda q, k, v, lengths: decode_attention(q, k, v, cache_lengths=lengths, config=config)
    return lambda q, k, v, lengths: jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation=impl)


def copy_bandwidth(*, rounds: int, calls: int, gib: float = 2.0) -> float:
    """Bytes/s of an elementwise ``x * 2`` over ``gib`` GiB of bf16: the card's practical ceiling."""
    x = jnp.ones((int(gib * (1 << 30)) // 2,), jnp.bfloat16)
    compiled = jax.jit(lambda x: x * 2).lower(x).compile()
    seconds = statistics.median(timed_rounds(compiled, (x,), rounds=rounds, calls=calls, warmup=2))
    del x
    return 2 * gib * (1 << 30) / seconds


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return math.inf
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def make_inputs(B: int, S: int, heads, dtype, seed: int = 0):
    N, K, H = heads
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    # Drawn in the low-precision dtype, 8k positions at a time and tiled along the cache: a float32
    # draw of a 17 GB cache would not fit twice, and jax.random caps one draw at 2**32 elements.
    chunk = math.gcd(S, 8192)
    q = jax.random.normal(kq, (B, 1, N, H), dtype)
    k = jnp.tile(jax.random.normal(kk, (B, chunk, K, H), dtype), (1, S // chunk, 1, 1))
    v = jnp.tile(jax.random.normal(kv, (B, chunk, K, H), dtype), (1, S // chunk, 1, 1))
    lengths = jnp.full((B,), S, jnp.int32)
    return jax.block_until_ready((q, k, v, lengths))


def run_one(fn, args, *, rounds: int, calls: int, copy_bw: float | None,
            bytes_read: int) -> tuple[dict, object]:
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as exc:  # recorded as the case's status; the run goes on
        status, message = classify(exc)
        return {"status": status, "error": message}, None
    compile_s = time.perf_counter() - t0
    try:
        out = jax.block_until_ready(compiled(*args))
        seconds = timed_rounds(compiled, args, rounds=rounds, calls=calls, warmup=2)
    except Exception as exc:
        status, message = classify(exc)
        return {"status": status, "error": message, "compile_s": compile_s}, None
    median = statistics.median(seconds)
    row = {"status": "ok", "us": median * 1e6, "us_rounds": [s * 1e6 for s in seconds],
           "TBps": bytes_read / median / 1e12, "compile_s": compile_s}
    if copy_bw:
        row["fraction_of_copy_bw"] = bytes_read / median / copy_bw
    return row, out


def fmt(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']:>12}"
    frac = f" ({100 * row['fraction_of_copy_bw']:3.0f}%)" if "fraction_of_copy_bw" in row else ""
    return f"{row['us']:9.1f} us {row['TBps']:5.2f} TB/s{frac}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--cases", default=None, help="comma-separated BxS pairs (default: the 3x3 grid)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="time a few tilings and split counts of our kernel")
    parser.add_argument("--budget-s", type=float, default=160.0,
                        help="stop starting sweep entries once the run has taken this long")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16

    def log(message):
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    if on_gpu:
        cases = [(b, s) for s in SEQ_LENS for b in BATCHES]
        impls, heads = IMPLS, HEADS
    else:
        heads = SMOKE_HEADS
        cases = [(2, 256)]
        impls = ("pallas_flash", "xla")
        args.rounds, args.calls = 1, 2
    if args.cases:
        cases = [tuple(int(d) for d in c.lower().split("x")) for c in args.cases.split(",") if c.strip()]
    sweep = args.sweep

    device = jax.devices()[0]
    copy_bw = copy_bandwidth(rounds=args.rounds, calls=args.calls) if on_gpu else None
    log(f"device {device.device_kind} ({jax.default_backend()}), {sm_count()} SMs, jax {jax.__version__}"
        + (f", copy bandwidth {copy_bw / 1e12:.2f} TB/s" if copy_bw else ""))
    results = {
        "benchmark": "decode", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "device": device.device_kind, "backend": jax.default_backend(), "sm_count": sm_count(),
        "jax": jax.__version__, "python": platform.python_version(), "argv": sys.argv,
        "shape": {"T": 1, "N": heads[0], "K": heads[1], "H": heads[2], "dtype": jnp.dtype(dtype).name,
                  "cache_lengths": "S (full)"},
        "method": f"median of {args.rounds} rounds x {args.calls} back-to-back calls; "
                  "bandwidth = bytes of K and V / time",
        "copy_bandwidth_TBps": None if copy_bw is None else copy_bw / 1e12,
        "cases": [], "sweep": [],
    }

    def save():
        # After every case, so that a crash (a Triton fault, a hung compile) keeps what was measured.
        if args.out is not None:
            results["total_s"] = time.perf_counter() - started
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))

    for B, S in cases:
        plan = planned(B, S, heads, dtype)
        record = {"B": B, "S": S, "kv_bytes": kv_bytes(B, S, heads, dtype), "block_k": plan.block_k,
                  "num_warps": plan.num_warps, "num_stages": plan.num_stages, "num_splits": plan.num_splits}
        if memory_estimate(B, S, heads, dtype) > MEMORY_LIMIT_BYTES:
            record["impls"] = {impl: {"status": "skipped", "error": "inputs over the memory limit"}
                               for impl in impls}
            results["cases"].append(record)
            log(f"B={B:3d} S={S:6d}: skipped (memory)")
            continue
        try:
            inputs = make_inputs(B, S, heads, dtype)
        except Exception as exc:  # an allocation failure: record it and go on
            status, message = classify(exc)
            record["impls"] = {impl: {"status": status, "error": message} for impl in impls}
            results["cases"].append(record)
            log(f"B={B:3d} S={S:6d}: inputs failed: {status}")
            continue
        outputs, record["impls"] = {}, {}
        for impl in impls:
            row, outputs[impl] = run_one(attention_fn(impl), inputs, rounds=args.rounds, calls=args.calls,
                                         copy_bw=copy_bw, bytes_read=record["kv_bytes"])
            record["impls"][impl] = row
        for impl in impls:
            if outputs.get(impl) is not None and outputs.get("xla") is not None and impl != "xla":
                err = rel_err(outputs[impl], outputs["xla"])
                record["impls"][impl]["rel_err_vs_xla"] = err
                record["impls"][impl]["matches_xla"] = err <= TOLERANCE
        results["cases"].append(record)
        mismatch = "" if record["impls"]["pallas_flash"].get("matches_xla", True) else "  MISMATCH vs xla"
        log(f"B={B:3d} S={S:6d} splits={record['num_splits']:3d} | "
            + " | ".join(f"{impl}: {fmt(record['impls'][impl])}" for impl in impls) + mismatch)
        del inputs, outputs
        save()

    sweep_cases = (SWEEP if on_gpu else SMOKE_SWEEP) if sweep else {}
    for (B, S), configs in sweep_cases.items():
        inputs, baseline = None, None
        for block_k, warps, stages, splits in configs:
            config = DecodeConfig(block_k=block_k, num_warps=warps, num_stages=stages, num_splits=splits)
            plan = planned(B, S, heads, dtype, config)
            entry = {"B": B, "S": S, "block_k": plan.block_k, "num_warps": warps, "num_stages": stages,
                     "num_splits": plan.num_splits, "num_splits_from_heuristic": splits is None}
            if time.perf_counter() - started > args.budget_s:
                entry.update(status="skipped", error="time budget")
                results["sweep"].append(entry)
                continue
            inputs = make_inputs(B, S, heads, dtype) if inputs is None else inputs
            row, out = run_one(attention_fn("pallas_flash", config), inputs, rounds=args.rounds,
                               calls=args.calls, copy_bw=copy_bw, bytes_read=kv_bytes(B, S, heads, dtype))
            if out is not None:
                baseline = out if baseline is None else baseline
                row["rel_err_vs_first"] = rel_err(out, baseline)
            entry.update(row)
            results["sweep"].append(entry)
            log(f"sweep B={B} S={S} block_k={plan.block_k} warps={warps} stages={stages} "
                f"splits={entry['num_splits']}: {fmt(row)}")
            save()
        del inputs, baseline

    for record in results["cases"]:
        row = record["impls"]["pallas_flash"]
        if record["B"] == 1 and record["S"] == max(SEQ_LENS) and "fraction_of_copy_bw" in row:
            verdict = "meets" if row["fraction_of_copy_bw"] >= 0.8 else "misses"
            log(f"goal (B=1, S=128k, >= 80% of copy bandwidth): {100 * row['fraction_of_copy_bw']:.0f}%, "
                f"{verdict} it")
    save()
    if args.out is not None:
        log(f"wrote {args.out}")
    ours = [c["impls"]["pallas_flash"] for c in results["cases"]]
    return 0 if all(r["status"] in ("ok", "skipped") and r.get("matches_xla", True) for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
