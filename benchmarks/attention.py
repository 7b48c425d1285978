"""Speed, memory and accuracy of pallas_flash against jax.nn.dot_product_attention.

One process times every implementation on the same inputs: pallas_flash (the package's own choice,
``implementation=None``: the Mosaic GPU kernels on Hopper where they support the call, else the
Triton ones; on CPU the Triton kernel in interpret mode), pallas_triton (``implementation="triton"``),
``jax.nn.dot_product_attention`` with ``implementation="xla"`` and ``"cudnn"``, and
``tokamax.dot_product_attention`` when tokamax is importable. Each case is one
(shape, causal, pass, implementation); the passes are the forward and forward+backward.

    python -m benchmarks.attention                       # full default set on a GPU
    python -m benchmarks.attention --quick               # the ANCHORS rows only, fewer rounds
    python -m benchmarks.attention --shapes 4x4096x16x128,4x4096x32x8x128 --causal yes --passes fwd

Shapes are ``BxSxNxH`` (K = N heads of K/V) or ``BxSxNxKxH`` (grouped-query), with T = S.

Method:
  * Every executable is compiled before anything is timed, on a thread pool (XLA and Triton
    compilation release the GIL), so compilation neither dominates the run time nor disturbs a
    measurement.
  * A figure is the median over ``--rounds`` rounds of the mean time of ``--calls`` back-to-back
    calls: the calls are dispatched asynchronously and only the last is waited on, so host dispatch
    overlaps device work and does not count. Slow cases get fewer calls per round
    (``--max-case-seconds``); the JSON records what was used. The rounds of all implementations
    of one (shape, causal, pass) are interleaved, round r of each before round r + 1 of any, in
    orders that put each in every position and after every other equally often: the card clocks
    down within seconds of sustained attention, so timing them one after another favoured
    whichever ran first, and a fixed order favours whichever follows the coolest.
  * TFLOP/s counts matmul FLOPs only: forward 4*B*N*T*S*H, halved when causal; forward+backward is
    3.5x the forward (the backward is 2.5x).
  * Memory is the compiled executable's temp + output bytes (``memory_analysis()``), a per-function
    number; the device's running ``peak_bytes_in_use`` is recorded too.
  * Correctness: each implementation's output (and, for forward+backward, its dQ, dK, dV) on the
    case's inputs is compared with the float32 reference (`pallas_flash.reference`) on a slice of
    the batch and heads, so the reference stays cheap at any sequence length.
  * Out-of-memory and unsupported cases are recorded as such and the run goes on. The JSON is
    rewritten after every case; past ``--time-limit`` the remaining cases are recorded as skipped
    and the markdown table and plot are still written.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import pallas_flash
from pallas_flash.timing import interleaved_rounds
from pallas_flash import reference


@dataclasses.dataclass(frozen=True)
class Shape:
    """``[B, S, N, H]`` queries against ``[B, S, K, H]`` keys and values (self-attention, T = S)."""

    B: int
    S: int
    N: int
    K: int
    H: int

    @property
    def name(self) -> str:
        heads = (self.N,) if self.N == self.K else (self.N, self.K)
        dims = (self.B, self.S, *heads, self.H)
        return "x".join(map(str, dims))

    @classmethod
    def parse(cls, text: str) -> "Shape":
        dims = [int(d) for d in text.lower().split("x")]
        if len(dims) == 4:
            b, s, n, h = dims
            k = n
        elif len(dims) == 5:
            b, s, n, k, h = dims
        else:
            raise ValueError(f"a shape is BxSxNxH or BxSxNxKxH, got {text!r}")
        if min(dims) < 1 or n % k:
            raise ValueError(f"bad shape {text!r}: dims must be positive and N a multiple of K")
        return cls(b, s, n, k, h)


# The anchor rows (bf16, each causal and not): B*S = 16k tokens except for head dim 256.
ANCHORS = tuple(Shape.parse(s) for s in (
    "16x1024x16x128", "4x4096x16x128", "1x16384x16x128", "4x4096x16x64", "4x4096x8x256", "32x512x16x128"))
GQA = (Shape(4, 4096, 32, 8, 128),)
SWEEP_TOKENS = 16384
SWEEP_SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
SWEEP_HEAD_DIMS = (64, 128)
SWEEP = tuple(Shape(SWEEP_TOKENS // s, s, 16, 16, h) for h in SWEEP_HEAD_DIMS for s in SWEEP_SEQ_LENS)
# Tiny enough for interpret mode on two CPU cores; two sequence lengths give the plot a line and
# the second row is grouped-query (K < N).
SMOKE = (Shape(1, 64, 2, 2, 32), Shape(1, 128, 4, 2, 32))
SMOKE_TAGS = {SMOKE[0]: ("sweep",), SMOKE[1]: ("sweep", "gqa")}

PRESETS = {"anchors": ((ANCHORS, "anchor"),), "gqa": ((GQA, "gqa"),), "sweep": ((SWEEP, "sweep"),),
           "default": ((ANCHORS, "anchor"), (GQA, "gqa"), (SWEEP, "sweep"))}

IMPLS = ("pallas_flash", "pallas_triton", "xla", "cudnn", "tokamax")
PASSES = ("fwd", "fwdbwd")
DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
# Relative L2 error against the float32 reference that still counts as a match. Gradients pass
# through two more low-precision matmuls, hence the looser bound; float32 inputs are allowed TF32.
FWD_TOL = {"bf16": 2e-2, "f16": 1e-2, "f32": 1e-2}
GRAD_TOL = {"bf16": 5e-2, "f16": 2.5e-2, "f32": 2.5e-2}
# Number of leading K/V heads (with all their query heads) and batch rows the reference sees.
REF_KV_HEADS = 2
REF_BATCH = 1
FLOP_CONVENTION = ("matmul FLOPs only: forward 4*B*N*T*S*H (halved when causal), "
                   "forward+backward 3.5x forward")
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"


def flops(shape: Shape, causal: bool, pass_: str) -> float:
    fwd = 4.0 * shape.B * shape.N * shape.S * shape.S * shape.H
    if causal:
        fwd /= 2
    return fwd * (3.5 if pass_ == "fwdbwd" else 1.0)


def shapes_from_spec(spec: str) -> dict[Shape, tuple[str, ...]]:
    """Shapes (deduplicated, first-seen order) with the tags of every preset that named them."""
    shapes: dict[Shape, tuple[str, ...]] = {}

    def add(shape, tag):
        tags = shapes.get(shape, ())
        shapes[shape] = tags if tag in tags else tags + (tag,)

    for item in filter(None, (s.strip() for s in spec.split(","))):
        if item == "smoke":
            for shape in SMOKE:
                for tag in SMOKE_TAGS[shape]:
                    add(shape, tag)
        elif item in PRESETS:
            for group, tag in PRESETS[item]:
                for shape in group:
                    add(shape, tag)
        else:
            add(Shape.parse(item), "custom")
    if not shapes:
        raise ValueError(f"no shapes in {spec!r}")
    return shapes


def tokamax_module():
    """tokamax, or None: it is an optional baseline and usually not installed."""
    try:
        import tokamax
    except ImportError:
        return None
    return tokamax


def attention_fn(impl: str, causal: bool):
    """``f(q, k, v) -> out`` for one implementation, every one with its default scale 1/sqrt(H)."""
    if impl == "pallas_flash":
        choice = None if jax.default_backend() == "gpu" else "triton"  # None is xla on CPU
        return functools.partial(pallas_flash.dot_product_attention, is_causal=causal, implementation=choice)
    if impl == "pallas_triton":
        return functools.partial(pallas_flash.dot_product_attention, is_causal=causal, implementation="triton")
    if impl in ("xla", "cudnn"):
        return functools.partial(jax.nn.dot_product_attention, is_causal=causal, implementation=impl)
    if impl == "tokamax":
        return functools.partial(tokamax_module().dot_product_attention, is_causal=causal)
    raise ValueError(f"unknown implementation {impl!r}")


def pass_fn(attn, pass_: str):
    if pass_ == "fwd":
        return lambda q, k, v, ct: attn(q, k, v)

    # A random float32 cotangent rather than sum(out): every output element gets a distinct
    # gradient, as in training, and the loss does not cancel.
    def loss(q, k, v, ct):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)

    return jax.grad(loss, argnums=(0, 1, 2))


def reference_fn(causal: bool, head_dim: int):
    """Float32 output and input gradients of the reference, for the sliced inputs."""
    scale = 1.0 / math.sqrt(head_dim)

    def attn(q, k, v):
        return reference.attention(q, k, v, scale=scale, is_causal=causal)[0]

    def f(q, k, v, ct):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(ct)

    return f


def ref_slices(shape: Shape):
    """Index expressions for the slice the reference checks: whole K/V heads with all their query
    heads, so the sliced problem's gradients equal the slices of the full gradients."""
    kv_heads = min(REF_KV_HEADS, shape.K)
    q_heads = kv_heads * (shape.N // shape.K)
    batch = min(REF_BATCH, shape.B)
    rows = slice(0, batch)
    return (rows, slice(None), slice(0, q_heads)), (rows, slice(None), slice(0, kv_heads))


def input_specs(shape: Shape, dtype):
    q = jax.ShapeDtypeStruct((shape.B, shape.S, shape.N, shape.H), dtype)
    kv = jax.ShapeDtypeStruct((shape.B, shape.S, shape.K, shape.H), dtype)
    ct = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return q, kv, kv, ct


def reference_specs(shape: Shape):
    q_idx, kv_idx = ref_slices(shape)
    full = input_specs(shape, jnp.float32)
    sliced = []
    for spec, idx in zip(full, (q_idx, kv_idx, kv_idx, q_idx)):
        dims = [len(range(*s.indices(d))) for s, d in zip(idx, spec.shape[:3])]
        sliced.append(jax.ShapeDtypeStruct((*dims, spec.shape[3]), jnp.float32))
    return tuple(sliced)


@functools.partial(jax.jit, static_argnums=(0, 1))
def make_inputs(shape: Shape, dtype, key):
    kq, kk, kv, kc = jax.random.split(key, 4)
    q = jax.random.normal(kq, (shape.B, shape.S, shape.N, shape.H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (shape.B, shape.S, shape.K, shape.H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (shape.B, shape.S, shape.K, shape.H), jnp.float32).astype(dtype)
    ct = jax.random.normal(kc, q.shape, jnp.float32)
    return q, k, v, ct


def classify(exc: BaseException, stage: str) -> tuple[str, str]:
    """(status, message): "oom" for any allocation failure, "unsupported" when the implementation
    refuses the case while tracing or compiling, else "error"."""
    message = f"{type(exc).__name__}: {exc}".strip()
    low = message.lower()
    if any(s in low for s in ("resource_exhausted", "resource exhausted", "out of memory",
                              "failed to allocate", "outofmemory")):
        status = "oom"
    elif isinstance(exc, NotImplementedError) or stage in ("lower", "compile") or "unimplemented" in low:
        status = "unsupported"
    else:
        status = "error"
    return status, " ".join(message.split())[:400]


def rel_err(x, ref) -> float:
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return math.inf
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def memory_bytes(compiled) -> dict | None:
    """Per-executable sizes; None where the backend does not report them."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # backends without the analysis raise rather than return None
        return None
    if stats is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): int(getattr(stats, f, 0) or 0) for f in fields}
    out["workspace"] = out["temp"] + out["output"]
    return out


def device_peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # not every backend implements memory_stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def device_slug() -> str:
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def fmt_tflops(x: float) -> str:
    # One decimal is plenty on a GPU; the CPU smoke run's tiny figures still need digits.
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


# -- compilation ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Executable:
    compiled: object = None
    seconds: float = 0.0
    status: str = "ok"
    error: str = ""
    stage: str = ""  # where it failed: "lower" (tracing, lowering) or "compile"


def _compile(lowered, started: float) -> Executable:
    try:
        compiled = lowered.compile()
    except Exception as exc:  # recorded per case, the run goes on
        status, message = classify(exc, "compile")
        return Executable(status=status, error=message, seconds=time.perf_counter() - started, stage="compile")
    return Executable(compiled=compiled, seconds=time.perf_counter() - started)


def lower_and_compile_serially(fn, specs) -> Executable:
    started = time.perf_counter()
    try:
        lowered = jax.jit(fn).lower(*specs)
    except Exception as exc:
        status, message = classify(exc, "lower")
        return Executable(status=status, error=message, seconds=time.perf_counter() - started, stage="lower")
    return _compile(lowered, started)


def compile_all(jobs: dict, workers: int, log) -> dict:
    """Compiles ``{key: (fn, arg_specs)}``. Tracing and lowering run here (they hold the GIL);
    the XLA/Triton compilations run on ``workers`` threads. Returns ``{key: Executable}``."""
    results: dict = {}
    futures = {}
    total = len(jobs)
    started = time.perf_counter()
    report_every = max(1, total // 10)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for lowered_count, (key, (fn, specs)) in enumerate(jobs.items(), 1):
            if lowered_count % report_every == 0:
                log(f"lower   {progress_bar(lowered_count, total)} {lowered_count}/{total} "
                    f"({time.perf_counter() - started:.0f} s)")
            t0 = time.perf_counter()
            try:
                lowered = jax.jit(fn).lower(*specs)
            except Exception as exc:  # e.g. cudnn refusing a head dim while tracing
                status, message = classify(exc, "lower")
                results[key] = Executable(status=status, error=message, seconds=time.perf_counter() - t0,
                                          stage="lower")
                continue
            futures[pool.submit(_compile, lowered, t0)] = key
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            results[futures[future]] = future.result()
            if done % report_every == 0 or done == len(futures):
                log(f"compile {progress_bar(done, len(futures))} {done}/{len(futures)} "
                    f"({time.perf_counter() - started:.0f} s)")
    log(f"compiled {total} executables in {time.perf_counter() - started:.1f} s "
        f"on {workers} threads; {sum(r.status != 'ok' for r in results.values())} refused")
    # Concurrent compilations share the device for autotuning: a failure there (out of memory,
    # typically) may say nothing about the case itself, so such a case gets one solitary retry.
    retries = [key for key in jobs if results[key].stage == "compile"]
    if retries:
        log(f"retrying {len(retries)} failed compilations one at a time")
    for key in retries:
        results[key] = lower_and_compile_serially(*jobs[key])
    return results


# -- measurement ---------------------------------------------------------------------------------


def time_executable(compiled, args, *, warmup: int, rounds: int, calls: int, max_seconds: float):
    """Warms up; returns the first call's output and the calls per round that fit ``max_seconds``."""
    first = jax.block_until_ready(compiled(*args))
    estimate = math.inf
    for _ in range(max(0, warmup - 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        estimate = time.perf_counter() - t0
    if math.isfinite(estimate) and estimate > 0:
        calls = max(1, min(calls, int(max_seconds / (rounds * estimate))))
    return first, calls


def slice_result(result, shape: Shape, pass_: str):
    """The part of an implementation's result the reference covers, as float32 numpy arrays."""
    q_idx, kv_idx = ref_slices(shape)
    if pass_ == "fwd":
        return (np.asarray(result[q_idx].astype(jnp.float32)),)
    dq, dk, dv = result
    return tuple(np.asarray(x[i].astype(jnp.float32)) for x, i in ((dq, q_idx), (dk, kv_idx), (dv, kv_idx)))


# -- reporting -----------------------------------------------------------------------------------


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """One row per (shape, causal, pass): each implementation's TFLOP/s and time, pallas_flash's
    speedup over each baseline, the memory of each, and whether all outputs matched the reference."""
    cases = results["cases"]
    impls = [i for i in results["metadata"]["impls"] if any(c["impl"] == i for c in cases)]
    baselines = [i for i in impls if i != "pallas_flash"]
    header = (["shape (BxSxN[xK]xH)", "causal", "pass"]
              + [f"{i} TFLOP/s (ms)" for i in impls]
              + ([f"vs {b}" for b in baselines] if "pallas_flash" in impls else [])
              + [f"mem {' / '.join(impls)}", "matches f32 ref"])
    rows = []
    groups: dict[tuple, dict] = {}
    for case in cases:
        groups.setdefault((case["shape"], case["causal"], case["pass"]), {})[case["impl"]] = case
    for (shape, causal, pass_), by_impl in groups.items():
        row = [shape, "yes" if causal else "no", pass_]
        for impl in impls:
            c = by_impl.get(impl)
            if c is None:
                row.append("-")
            elif c["status"] == "ok":
                row.append(f"{fmt_tflops(c['tflops'])} ({c['ms']:.3f})")
            else:
                row.append(c["status"].upper() if c["status"] == "oom" else c["status"])
        if "pallas_flash" in impls:
            ours = by_impl.get("pallas_flash")
            for b in baselines:
                theirs = by_impl.get(b)
                if ours and theirs and ours["status"] == theirs["status"] == "ok":
                    row.append(f"{theirs['ms'] / ours['ms']:.2f}x")
                else:
                    row.append("-")
        mems = []
        for impl in impls:
            c = by_impl.get(impl)
            mem = c and c.get("memory")
            mems.append(fmt_bytes(mem["workspace"]) if mem else "-")
        row.append(" / ".join(mems))
        checked = [c for c in by_impl.values() if c["status"] == "ok" and c.get("matched") is not None]
        bad = [f"{c['impl']} {c['rel_err']:.1e}" for c in checked if not c["matched"]]
        row.append(("NO: " + ", ".join(bad)) if bad else ("yes" if checked else "-"))
        rows.append(row)
    return header, rows


def markdown_table(results: dict) -> str:
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def markdown_report(results: dict, png_name: str | None) -> str:
    meta = results["metadata"]
    lines = [
        f"# Attention benchmark: {meta['device_kind']}",
        "",
        f"- date: {meta['date']}",
        f"- jax {meta['jax_version']}, jaxlib {meta['jaxlib_version']}, pallas_flash "
        f"{meta['pallas_flash_version']}, tokamax {meta['tokamax_version'] or 'not installed'}",
        f"- command: `{meta['command']}`",
        f"- dtype {meta['dtype']}; each figure is the median of {meta['rounds']} rounds of up to "
        f"{meta['calls']} back-to-back calls after {meta['warmup']} warm-up calls",
        f"- TFLOP/s: {FLOP_CONVENTION}; `vs X` is X's time over pallas_flash's (above 1: pallas_flash "
        "is faster)",
        "- mem: the compiled function's temp + output bytes (`memory_analysis()`)",
        f"- matches f32 ref: relative L2 error against the float32 reference on a batch/head slice, "
        f"below {meta['fwd_tol']:g} (forward) or {meta['grad_tol']:g} (dQ, dK, dV)",
        "",
        markdown_table(results),
    ]
    if png_name:
        lines += ["", f"![TFLOP/s against sequence length]({png_name})"]
    return "\n".join(lines) + "\n"


def write_json(results: dict, path: Path):
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, path)  # atomic: a run killed mid-write still leaves the previous complete file


def metadata(args, argv, impls, dtype_name) -> dict:
    device = jax.devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend implements memory_stats
        pass
    tokamax = tokamax_module()
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "device_memory_bytes": (stats or {}).get("bytes_limit"),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "pallas_flash_version": pallas_flash.__version__,
        "tokamax_version": getattr(tokamax, "__version__", "unknown") if tokamax else None,
        "python_version": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.attention " + shlex.join(argv),
        "impls": list(impls),
        "dtype": dtype_name,
        "passes": list(args.passes),
        "rounds": args.rounds,
        "calls": args.calls,
        "warmup": args.warmup,
        "max_case_seconds": args.max_case_seconds,
        "fwd_tol": FWD_TOL[dtype_name],
        "grad_tol": GRAD_TOL[dtype_name],
        "flop_convention": FLOP_CONVENTION,
        "memory_convention": "compiled memory_analysis(): workspace = temp + output bytes; "
                             "device_peak_bytes is the device's running peak_bytes_in_use",
        "compile_s_convention": "tracing + lowering + compilation wall time, compiled concurrently",
    }


# -- driver --------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.attention",
        description="Time pallas_flash against jax.nn.dot_product_attention (xla, cudnn) and tokamax: "
                    "forward and forward+backward TFLOP/s, memory and accuracy. Without a GPU it runs "
                    "a tiny smoke configuration.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help="comma-separated BxSxNxH / BxSxNxKxH shapes or presets "
                        f"({', '.join([*PRESETS, 'smoke'])}); default: 'default' on a GPU "
                        "(ANCHORS + GQA + sequence sweep), 'smoke' elsewhere")
    p.add_argument("--impls", default=None,
                   help=f"comma-separated subset of {','.join(IMPLS)}; default: all on a GPU "
                        "(tokamax when importable), pallas_flash,xla elsewhere")
    p.add_argument("--passes", default="fwd,fwdbwd", help="comma-separated subset of fwd,fwdbwd")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--causal", default="both", choices=("yes", "no", "both"))
    p.add_argument("--quick", action="store_true",
                   help="ANCHORS rows only (unless --shapes), 3 rounds of 5 calls")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (median taken); default 5, 1 on CPU")
    p.add_argument("--calls", type=int, default=None,
                   help="back-to-back calls per round; default 10, 1 on CPU")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (>= 1)")
    p.add_argument("--max-case-seconds", type=float, default=6.0,
                   help="cap on the timed work of one case: slow cases get fewer calls per round")
    p.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads compiling executables ahead of the timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--name", default=None,
                   help="file stem of the outputs; default attention_<device>_<yyyymmdd>")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--time-limit", type=float, default=500.0,
                   help="seconds after which the remaining cases are recorded as skipped and the "
                        "reports are written (keeps a run inside a 10-minute job); 0: no limit")
    args = p.parse_args(argv)
    args.passes = [s.strip() for s in args.passes.split(",") if s.strip()]
    if not args.passes or any(s not in PASSES for s in args.passes):
        p.error(f"--passes must be a subset of {','.join(PASSES)}")
    if args.warmup < 1:
        p.error("--warmup must be >= 1: the first call's output is the one checked")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns the results dict (also written as JSON, markdown and PNG)."""
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu:
        log("No GPU present: running the tiny CPU smoke configuration "
            "(Pallas in interpret mode; the timings mean nothing)")
    if args.shapes:
        shape_spec = args.shapes
    elif on_gpu:
        shape_spec = "anchors" if args.quick else "default"
    else:
        shape_spec = "smoke"
    shapes = shapes_from_spec(shape_spec)
    if args.rounds is None:
        args.rounds = 1 if not on_gpu else 3 if args.quick else 5
    if args.calls is None:
        args.calls = 1 if not on_gpu else 5 if args.quick else 10
    if args.impls:
        impls = [s.strip() for s in args.impls.split(",") if s.strip()]
        unknown = set(impls) - set(IMPLS)
        if unknown:
            raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {','.join(IMPLS)}")
    elif on_gpu:
        impls = ["pallas_flash", "pallas_triton", "xla", "cudnn"] + (["tokamax"] if tokamax_module() else [])
    else:
        impls = ["pallas_flash", "xla"]
    if not on_gpu:
        args.compile_workers = min(args.compile_workers, os.cpu_count() or 1)
    dtype_name, dtype = args.dtype, DTYPES[args.dtype]
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"attention_{device_slug()}_{datetime.date.today():%Y%m%d}"
    json_path, md_path, png_path = (args.out_dir / f"{stem}.{ext}" for ext in ("json", "md", "png"))
    results = {"metadata": metadata(args, argv, impls, dtype_name), "cases": []}
    meta = results["metadata"]
    log(f"{meta['device_kind']} | jax {meta['jax_version']} | {dtype_name} | impls {','.join(impls)} | "
        f"{len(shapes)} shapes x {len(causals)} causal x {len(args.passes)} passes | "
        f"{args.rounds} rounds x {args.calls} calls")
    if "tokamax" in impls and tokamax_module() is None:
        log("tokamax is not installed: its cases are recorded as unavailable")

    cases = [(shape, causal, pass_, impl) for shape in shapes for causal in causals
             for pass_ in args.passes for impl in impls]
    jobs = {}
    for shape in shapes:
        for causal in causals:
            jobs[(shape, causal, "reference")] = (reference_fn(causal, shape.H), reference_specs(shape))
    for shape, causal, pass_, impl in cases:
        if impl == "tokamax" and tokamax_module() is None:
            continue
        jobs[(shape, causal, pass_, impl)] = (pass_fn(attention_fn(impl, causal), pass_),
                                              input_specs(shape, dtype))
    log(f"compiling {len(jobs)} executables ({len(cases)} cases + references)")
    executables = compile_all(jobs, args.compile_workers, log)

    def out_of_time():
        return args.time_limit > 0 and time.perf_counter() - started > args.time_limit

    run_started = time.perf_counter()
    key = jax.random.key(args.seed)
    for index, shape in enumerate(shapes):
        inputs = ref_inputs = None
        if not out_of_time():
            inputs = make_inputs(shape, dtype, jax.random.fold_in(key, index))
            q_idx, kv_idx = ref_slices(shape)
            ref_inputs = tuple(x[i].astype(jnp.float32) for x, i in zip(inputs, (q_idx, kv_idx, kv_idx, q_idx)))
        for causal in causals:
            ref = None
            if not out_of_time():
                ref = _run_reference(executables[(shape, causal, "reference")], ref_inputs, log)
            for pass_ in args.passes:
                records = _run_cases(shape, causal, pass_, impls, shapes[shape], executables, inputs, ref,
                                     args, dtype_name, skip=inputs is None or out_of_time())
                for record in records:
                    results["cases"].append(record)
                    write_json(results, json_path)
                    log(_case_line(len(results["cases"]), len(cases), record))
            del ref
        del inputs, ref_inputs
        md_path.write_text(markdown_report(results, None))
    log(f"timed {len(cases)} cases in {time.perf_counter() - run_started:.1f} s")

    png_name = None
    if not args.no_plot:
        from benchmarks import plot

        if plot.plot_results(results, png_path, log=log):
            png_name = png_path.name
    md_path.write_text(markdown_report(results, png_name))
    log("")
    log(markdown_table(results))
    log("")
    log(f"wrote {json_path}\n      {md_path}" + (f"\n      {png_path}" if png_name else ""))
    results["paths"] = {"json": str(json_path), "md": str(md_path), "png": str(png_path) if png_name else None}
    return results


def _run_reference(executable: Executable, ref_inputs, log):
    """The float32 reference's sliced output and gradients as numpy; None when it could not run."""
    if executable.status != "ok":
        log(f"  reference unavailable ({executable.status}): correctness not checked")
        return None
    try:
        out, grads = executable.compiled(*ref_inputs)
        return (np.asarray(out),), tuple(np.asarray(g) for g in grads)
    except Exception as exc:  # an OOM here only costs the correctness column
        log(f"  reference failed ({classify(exc, 'run')[1][:120]}): correctness not checked")
        return None


def _run_cases(shape, causal, pass_, impls, tags, executables, inputs, ref, args, dtype_name, *,
               skip: bool) -> list[dict]:
    """One record per implementation of one (shape, causal, pass): each is warmed up and checked
    against the reference, then all that ran are timed with their rounds interleaved
    (`interleaved_rounds`), so the card's clock drift under sustained load favours none of them."""
    records, timed = [], []
    for impl in impls:
        record = {
            "shape": shape.name, "B": shape.B, "S": shape.S, "T": shape.S, "N": shape.N, "K": shape.K,
            "H": shape.H, "causal": causal, "pass": pass_, "impl": impl, "dtype": dtype_name,
            "tags": list(tags), "flops": flops(shape, causal, pass_), "status": "ok", "error": None,
            "ms": None, "tflops": None, "round_ms": None, "rounds": None, "calls_per_round": None,
            "compile_s": None, "memory": None, "device_peak_bytes": None, "rel_err": None, "matched": None,
        }
        records.append(record)
        executable = executables.get((shape, causal, pass_, impl))
        if skip:
            record.update(status="skipped", error=f"--time-limit {args.time_limit:g} s reached")
            continue
        if executable is None:
            record.update(status="unavailable", error=f"{impl} is not installed")
            continue
        record["compile_s"] = round(executable.seconds, 3)
        if executable.status != "ok":
            record.update(status=executable.status, error=executable.error)
            continue
        record["memory"] = memory_bytes(executable.compiled)
        try:
            # Both passes take (q, k, v, cotangent); the forward ignores the cotangent.
            first, calls = time_executable(executable.compiled, inputs, warmup=args.warmup, rounds=args.rounds,
                                           calls=args.calls, max_seconds=args.max_case_seconds)
            got = slice_result(first, shape, pass_)
            del first
        except Exception as exc:  # OOM or a runtime failure: recorded, the run goes on
            status, message = classify(exc, "run")
            record.update(status=status, error=message, device_peak_bytes=device_peak_bytes())
            continue
        record.update(calls_per_round=calls, device_peak_bytes=device_peak_bytes())
        if ref is not None:
            want = ref[0] if pass_ == "fwd" else ref[1]
            err = max(rel_err(g, w) for g, w in zip(got, want))
            tol = (FWD_TOL if pass_ == "fwd" else GRAD_TOL)[dtype_name]
            record.update(rel_err=err, matched=bool(err < tol))
        timed.append((record, executable.compiled))
    try:
        per_case = interleaved_rounds([(compiled, inputs) for _, compiled in timed], rounds=args.rounds,
                                      calls=[r["calls_per_round"] for r, _ in timed])
    except Exception as exc:  # a failure mid-timing (OOM next to another's buffers): none is timed
        status, message = classify(exc, "run")
        for record, _ in timed:
            record.update(status=status, error=message)
        return records
    for (record, _), per_call in zip(timed, per_case):
        ms = statistics.median(per_call) * 1e3
        record.update(ms=ms, tflops=record["flops"] / (ms * 1e-3) / 1e12, round_ms=[t * 1e3 for t in per_call],
                      rounds=args.rounds)
    return records


def _case_line(done: int, total: int, r: dict) -> str:
    head = (f"[{done:>{len(str(total))}}/{total}] {progress_bar(done, total)} {r['shape']} "
            f"{'causal' if r['causal'] else 'full'} {r['pass']} {r['impl']} ...")
    if r["status"] != "ok":
        return f"{head} {r['status'].upper()}: {(r['error'] or '')[:160]}"
    mem = fmt_bytes(r["memory"]["workspace"]) if r["memory"] else "-"
    check = "-" if r["matched"] is None else f"{'ok' if r['matched'] else 'MISMATCH'} (err {r['rel_err']:.1e})"
    return f"{head} {r['ms']:.3f} ms {fmt_tflops(r['tflops'])} TFLOP/s mem {mem} {check}"


if __name__ == "__main__":
    main()
