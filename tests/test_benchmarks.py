"""CPU smoke test of `benchmarks.attention`: the script runs end to end and writes sane results.

The run is pinned to the tiny smoke shapes with explicit flags, so on a GPU machine it stays just as
small instead of starting the full benchmark.
"""

import importlib.util
import json

import jax
import numpy as np
import pytest

from benchmarks import attention, goal, plot


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    # cudnn is on the list so the "recorded, not crashed" path runs too: without a GPU it is refused.
    argv = ["--shapes", "smoke", "--impls", "pallas_flash,xla,cudnn", "--causal", "yes",
            "--rounds", "1", "--calls", "1", "--compile-workers", "2", "--out-dir", str(out_dir),
            "--name", "smoke"]
    return attention.main(argv), out_dir


def test_smoke_run_writes_json_markdown_and_png(smoke):
    results, out_dir = smoke
    on_disk = json.loads((out_dir / "smoke.json").read_text())
    assert on_disk["cases"] == json.loads(json.dumps(results["cases"]))
    meta = on_disk["metadata"]
    for field in ("device_kind", "jax_version", "date", "command", "flop_convention"):
        assert meta[field]
    assert "--shapes smoke" in meta["command"]

    md = (out_dir / "smoke.md").read_text()
    assert "| shape (BxSxN[xK]xH) | causal | pass" in md
    assert "1x64x2x32" in md and "1x128x4x2x32" in md

    if importlib.util.find_spec("matplotlib") is None:
        assert results["paths"]["png"] is None
    else:
        png = out_dir / "smoke.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "![TFLOP/s against sequence length](smoke.png)" in md


def test_smoke_cases_are_timed_and_match_the_reference(smoke):
    results, _ = smoke
    cases = results["cases"]
    # 2 shapes x 1 causal x 2 passes x 3 implementations.
    assert len(cases) == 12
    measured = [c for c in cases if c["impl"] in ("pallas_flash", "xla")]
    assert len(measured) == 8
    for c in measured:
        assert c["status"] == "ok", c
        assert c["ms"] > 0 and c["tflops"] > 0
        assert c["flops"] == attention.flops(attention.Shape.parse(c["shape"]), c["causal"], c["pass"])
        assert c["matched"] is True and c["rel_err"] < 2e-2, c
        assert c["memory"] is None or c["memory"]["workspace"] > 0
    for c in cases:
        if c["impl"] == "cudnn":
            assert c["status"] in ("ok", "unsupported"), c


def test_plot_module_regenerates_the_report(smoke, capsys):
    _, out_dir = smoke
    (out_dir / "smoke.md").unlink()
    plot.main([str(out_dir / "smoke.json")])
    assert "| shape (BxSxN[xK]xH)" in (out_dir / "smoke.md").read_text()


def test_default_shape_set_deduplicates_anchors_gqa_and_sweep():
    shapes = attention.shapes_from_spec("default")
    assert len(shapes) == len(set(shapes)) == 14
    assert set(attention.ANCHORS) <= set(shapes)
    assert shapes[attention.Shape(4, 4096, 32, 8, 128)] == ("gqa",)
    assert shapes[attention.Shape.parse("4x4096x16x128")] == ("anchor", "sweep")
    sweep = [s for s, tags in shapes.items() if "sweep" in tags]
    assert len(sweep) == 12 and all(s.B * s.S == 16384 and s.N == s.K == 16 for s in sweep)


def test_shape_parsing_and_flop_convention():
    assert attention.Shape.parse("4x4096x32x8x128") == attention.Shape(4, 4096, 32, 8, 128)
    assert attention.Shape.parse("16x1024x16x128").name == "16x1024x16x128"
    with pytest.raises(ValueError):
        attention.Shape.parse("4x4096x30x8x128")
    shape = attention.Shape.parse("4x4096x16x128")
    fwd = 4 * 4 * 16 * 4096 * 4096 * 128
    assert attention.flops(shape, False, "fwd") == fwd
    assert attention.flops(shape, True, "fwd") == fwd / 2
    assert attention.flops(shape, True, "fwdbwd") == 3.5 * fwd / 2


def test_failures_are_classified():
    oom = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes")
    assert attention.classify(oom, "run")[0] == "oom"
    assert attention.classify(NotImplementedError("head dim 512"), "run")[0] == "unsupported"
    assert attention.classify(ValueError("cudnn: bad layout"), "lower")[0] == "unsupported"
    assert attention.classify(RuntimeError("boom"), "run")[0] == "error"


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        attention.main(["--help"])
    assert exit_info.value.code == 0
    assert "--out-dir" in capsys.readouterr().out


def test_lengths_benchmark_draws_rows_in_range_and_needs_a_gpu(capsys):
    from benchmarks import lengths

    seed = int(np.random.default_rng().integers(1 << 30))
    rows = lengths.row_lengths(64, 1000, 0.25, seed=seed)
    assert rows.dtype == np.int32 and rows.min() >= 250 and rows.max() <= 1000
    np.testing.assert_array_equal(rows, lengths.row_lengths(64, 1000, 0.25, seed=seed))
    assert lengths.row_lengths(8, 3, 1.0).tolist() == [3] * 8
    if jax.default_backend() != "gpu":
        assert lengths.main([]) == 0
        assert "needs a GPU" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["backward_parts", "decode", "gpt2_step", "lengths", "segments", "tune"])
def test_every_benchmark_module_imports(module):
    """The modules the other tests never run (their timings need a GPU) still import: segments.py
    once imported a helper that had moved away."""
    importlib.import_module(f"benchmarks.{module}")


def test_interleaved_rounds_alternates_cases():
    """Round r of every case runs before round r + 1 of any, each with its own call count, in the
    round's balanced order."""
    from pallas_flash.timing import interleaved_rounds

    order = []
    cases = [(lambda tag: order.append(tag), (tag,)) for tag in "abc"]
    per_case = interleaved_rounds(cases, rounds=7, calls=[1, 2, 1], warmup=1)
    assert order[:3] == ["a", "b", "c"] and len(order) == 3 + 7 * 4  # a round: a and c once, b twice
    rounds = [order[3 + 4 * r:7 + 4 * r] for r in range(7)]
    assert all(sorted(r) == ["a", "b", "b", "c"] for r in rounds)
    assert len({tuple(dict.fromkeys(r)) for r in rounds}) == 6  # every order of the design ran
    assert [len(times) for times in per_case] == [7, 7, 7]
    assert all(t >= 0 for times in per_case for t in times)
    assert interleaved_rounds([], rounds=3, calls=1) == []


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_balanced_orders_balance_positions_and_predecessors(n):
    from collections import Counter

    from pallas_flash.timing import balanced_orders

    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 and n > 1 else n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    positions = Counter((pos, case) for order in orders for pos, case in enumerate(order))
    assert set(positions.values()) == {len(orders) // n}
    pairs = Counter(pair for order in orders for pair in zip(order, order[1:]))
    if n > 1:
        assert set(pairs) == {(a, b) for a in range(n) for b in range(n) if a != b}
        assert len(set(pairs.values())) == 1


def test_tune_baselines_name_their_implementation(monkeypatch):
    """`benchmarks.tune`'s tokamax baseline asks for tokamax's Mosaic GPU kernel by name (a fallback
    must not stand in for it) and says clearly when tokamax is missing."""
    import types

    from benchmarks import tune

    monkeypatch.setattr(tune, "tokamax_module", lambda: None)
    with pytest.raises(ValueError, match="tokamax is not importable"):
        tune.baseline_fn("tokamax", causal=True)
    calls = []
    fake = types.SimpleNamespace(dot_product_attention=lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(tune, "tokamax_module", lambda: fake)
    tune.baseline_fn("tokamax", causal=True)("q", "k", "v")
    assert calls == [dict(is_causal=True, implementation="mosaic")]
    for impl in ("xla", "cudnn"):
        fn = tune.baseline_fn(impl, causal=False)
        assert fn.keywords == dict(is_causal=False, implementation=impl)
    assert tune.baseline_fn("triton", causal=False).keywords["implementation"] == "triton"


def _tune_run(rng, shape, *, baselines, ours, config=None):
    """A `benchmarks.tune` JSON (one pass, non-causal) with random TFLOP/s: ``baselines`` names,
    ``ours`` Mosaic repeats. Returns (run, baseline TFLOP/s, Mosaic TFLOP/s)."""
    base = {name: float(rng.uniform(300, 600)) for name in baselines}
    mine = [float(rng.uniform(300, 700)) for _ in range(ours)]
    results = [dict(impl=n, causal=False, passes="fwdbwd", tflops=t, status="ok", config=None) for n, t in base.items()]
    results += [dict(impl="mosaic", causal=False, passes="fwdbwd", tflops=t, status="ok",
                     config=config(i) if config else {"block_q": 64}) for i, t in enumerate(mine)]
    # A failed case and a pass without a baseline are left out, not counted.
    results += [dict(impl="cudnn", causal=True, passes="fwd", tflops=None, status="unsupported", config=None),
                dict(impl="mosaic", causal=True, passes="fwd", tflops=500.0, status="ok", config={})]
    return dict(device="test device", shape=list(shape), results=results), base, mine


def test_goal_ratios_against_the_fastest_baseline(tmp_path, capsys):
    rng = np.random.default_rng()
    runs = [_tune_run(rng, (1, 4096, 8, 128), baselines=("cudnn", "tokamax"), ours=2),
            _tune_run(rng, (2, 1024, 4, 64), baselines=("cudnn",), ours=3)]
    paths = []
    for i, (run, _, _) in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    png = tmp_path / "goal.png"
    rows = goal.main([*map(str, paths), "--out", str(png)])
    assert len(rows) == 2
    for row, (_, base, mine) in zip(rows, runs):
        best = max(base.values())
        assert row["baseline"] == max(base, key=base.get)
        assert row["low"] == pytest.approx(min(mine) / best) and row["high"] == pytest.approx(max(mine) / best)
        assert row["met"] == (min(mine) / best >= 1.0) and row["goal"] == 1.0
    out = capsys.readouterr().out
    assert f"{sum(r['met'] for r in rows)} of 2 rows meet the goal" in out
    assert f"| 1×4096×8×128 | no | forward + backward | {rows[0]['baseline']} | {rows[0]['low']:.3f}" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goal_refuses_timings_of_several_configs():
    run, _, _ = _tune_run(np.random.default_rng(), (1, 512, 2, 64), baselines=("cudnn",), ours=2,
                          config=lambda i: {"block_q": 64 * (i + 1)})
    with pytest.raises(ValueError, match="more than one config"):
        goal.ratios(run)
