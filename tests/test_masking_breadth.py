"""Issue 3 features against the float32 reference: logit soft-capping, segment ids (packed
sequences) and bias/mask arrays of any broadcast pattern, alone and combined with causal masks,
windows, lengths and GQA, forward and gradients (the bias's included).

Kernel cases run in Pallas interpret mode on CPU (seconds each), so the shapes are small; the
segment block ranges are also checked against brute force, which is cheap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash
from pallas_flash import masking
from tests.helpers import random_inputs, rel_err
from tests.test_attention import SMALL_BLOCKS, check_case

F32, BF16 = jnp.float32, jnp.bfloat16


def _packed_ids(rng: np.random.Generator, B: int, L: int, docs: int):
    """Non-decreasing ids: ``docs`` documents of random lengths packed into each row."""
    ids = np.zeros((B, L), np.int32)
    for b in range(B):
        for cut in rng.choice(np.arange(1, L), size=min(docs - 1, L - 1), replace=False):
            ids[b, cut:] += 1
    return jnp.asarray(ids)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan"), float("inf"), True, "3"])
def test_soft_cap_must_be_positive(cap):
    x = jnp.zeros((1, 8, 1, 16), F32)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        pallas_flash.dot_product_attention(x, x, x, logits_soft_cap=cap, implementation="xla")


def test_segment_ids_validation():
    x = jnp.zeros((2, 8, 1, 16), F32)
    ids = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="both or neither"):
        pallas_flash.dot_product_attention(x, x, x, query_segment_ids=ids)
    with pytest.raises(ValueError, match="both or neither"):
        pallas_flash.dot_product_attention(x, x, x, key_value_segment_ids=ids)
    with pytest.raises(ValueError, match="key_value_segment_ids"):
        pallas_flash.dot_product_attention(x, x, x, query_segment_ids=ids,
                                           key_value_segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="query_segment_ids"):
        pallas_flash.dot_product_attention(x, x, x, query_segment_ids=ids.astype(F32),
                                           key_value_segment_ids=ids)


# --- block ranges (brute force, no kernel) ----------------------------------------------------------


@pytest.mark.parametrize("sorted_ids", [True, False])
def test_segment_block_ranges(sorted_ids):
    """No block pair sharing an id is skipped, and mask-free pairs really hold one single id."""
    rs = np.random.default_rng()
    for _ in range(8):
        T, S = int(rs.integers(1, 90)), int(rs.integers(1, 90))
        bo, bi = int(rs.choice([16, 32])), int(rs.choice([16, 32]))
        if sorted_ids:
            q_ids = np.sort(rs.integers(0, 4, (2, T)), axis=1)
            kv_ids = np.sort(rs.integers(0, 4, (2, S)), axis=1)
        else:
            q_ids, kv_ids = rs.integers(0, 4, (2, T)), rs.integers(0, 4, (2, S))
        ranges = np.asarray(masking.segment_block_ranges(jnp.asarray(q_ids), jnp.asarray(kv_ids), bo, bi))
        assert ranges.shape == (2, -(-T // bo), 4)
        for b in range(2):
            for ob in range(ranges.shape[1]):
                lo, full_lo, full_hi, hi = ranges[b, ob]
                rows = q_ids[b, ob * bo:(ob + 1) * bo]
                for ib in range(-(-S // bi)):
                    cols = kv_ids[b, ib * bi:(ib + 1) * bi]
                    if np.isin(rows, cols).any():
                        assert lo <= ib < hi
                    if full_lo <= ib < full_hi:
                        assert len(set(rows) | set(cols)) == 1


# --- soft cap ---------------------------------------------------------------------------------------

SOFT_CAP_CASES = {
    "causal_gqa_odd_bf16": dict(B=1, T=77, S=77, N=4, K=2, H=64, dtype=BF16, is_causal=True, soft_cap=0.5),
    "cross_window_lengths_f32": dict(B=2, T=45, S=61, N=2, K=1, H=32, dtype=F32, window=(9, 4),
                                     kv_lengths=True, soft_cap=2.0, config=SMALL_BLOCKS),
}


@pytest.mark.parametrize("name", SOFT_CAP_CASES)
def test_soft_cap_matches_reference(rng, name):
    check_case(rng, **SOFT_CAP_CASES[name])


@jax.default_matmul_precision("highest")
def test_soft_cap_bounds_logits(rng):
    """A tiny cap flattens the softmax: with |logits| <= cap the output is near the mean of V."""
    q, k, v, _ = random_inputs(rng, B=1, T=20, S=30, N=1, K=1, H=16, dtype=F32)
    out = pallas_flash.dot_product_attention(10 * q, 10 * k, v, logits_soft_cap=1e-3,
                                             implementation="triton")
    np.testing.assert_allclose(out, jnp.broadcast_to(v.mean(axis=1, keepdims=True), out.shape),
                               rtol=1e-2, atol=1e-2)


# --- segment ids ------------------------------------------------------------------------------------


def test_packed_documents_equal_separate_runs(rng):
    """Three documents of odd lengths packed into one row (causal) give the same outputs and
    gradients as three separate calls."""
    lengths = (19, 33, 27)
    T = sum(lengths)
    q, k, v, d_out = random_inputs(rng, B=1, T=T, S=T, N=2, K=1, H=32, dtype=F32)
    ids = jnp.asarray(np.repeat(np.arange(3), lengths)[None], jnp.int32)

    def attend(q, k, v, **segments):
        return pallas_flash.dot_product_attention(q, k, v, is_causal=True, implementation="triton",
                                                  config=SMALL_BLOCKS, **segments)

    # Jitted: eager interpret mode runs the kernels op by op, many times slower. One forward per
    # call serves both its output and its gradients.
    packed_ids = dict(query_segment_ids=ids, key_value_segment_ids=ids)
    packed_out, packed_vjp = jax.vjp(jax.jit(lambda q, k, v: attend(q, k, v, **packed_ids)), q, k, v)
    packed = packed_vjp(d_out)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        out, alone_vjp = jax.vjp(jax.jit(attend), q[:, part], k[:, part], v[:, part])
        np.testing.assert_allclose(packed_out[:, part], out, rtol=1e-5, atol=1e-5)
        for got, want in zip(packed, alone_vjp(d_out[:, part])):
            np.testing.assert_allclose(got[:, part], want, rtol=1e-4, atol=1e-5)
        start += n


def _segment_case(seed: int, B: int, T: int, S: int, *, sorted_ids: bool):
    rs = np.random.default_rng(seed)
    if sorted_ids:
        return _packed_ids(rs, B, T, 3), _packed_ids(rs, B, S, 3)
    # Arbitrary ids; query id 4 appears in no key row, so those rows see nothing at all.
    return (jnp.asarray(rs.integers(0, 5, (B, T)), jnp.int32),
            jnp.asarray(rs.integers(0, 4, (B, S)), jnp.int32))


SEGMENT_CASES = {
    "causal_window_lengths_gqa_f32": dict(B=2, T=75, S=91, N=4, K=2, H=32, dtype=F32, is_causal=True,
                                          window=(30, 0), q_lengths=True, kv_lengths=True,
                                          config=SMALL_BLOCKS, sorted_ids=True),
    "cross_soft_cap_bf16": dict(B=2, T=50, S=70, N=2, K=1, H=64, dtype=BF16, soft_cap=1.0,
                                sorted_ids=True),
    "unsorted_empty_rows_f32": dict(B=1, T=40, S=57, N=2, K=2, H=32, dtype=F32, window=(20, 20),
                                    config=SMALL_BLOCKS, sorted_ids=False),
}


@pytest.mark.parametrize("name", SEGMENT_CASES)
def test_segments_match_reference(rng, name):
    case = dict(SEGMENT_CASES[name])
    seed = int(jax.random.randint(rng, (), 0, 2**30))
    ids = _segment_case(seed, case["B"], case["T"], case["S"], sorted_ids=case.pop("sorted_ids"))
    check_case(rng, segment_ids=ids, **case)


# --- bias and mask arrays ---------------------------------------------------------------------------

B_, T_, S_, N_, K_ = 2, 37, 45, 4, 2
BIAS_MASK_CASES = {
    "full_bias_causal": dict(bias=(B_, N_, T_, S_), mask=None, is_causal=True),
    "heads_cols_bias_rows_mask": dict(bias=(1, N_, 1, S_), mask=(B_, 1, T_, 1), soft_cap=3.0),
    "shared_mask_segments_window": dict(bias=None, mask=(1, 1, T_, S_), window=(10, 3), segments=True),
    "rows_bias_heads_cols_mask_lengths": dict(bias=(B_, 1, T_, 1), mask=(1, N_, 1, S_), lengths=True),
}


@pytest.mark.parametrize("name", BIAS_MASK_CASES)
def test_bias_and_mask_match_reference(rng, name):
    """Forward, log-sum-exp and the gradients of q, k, v and the bias (summed over its broadcast
    dims) against the float32 reference, with small tiles so that every tail and skip is hit."""
    case = BIAS_MASK_CASES[name]
    keys = jax.random.split(rng, 4)
    q, k, v, d_out = random_inputs(keys[0], B=B_, T=T_, S=S_, N=N_, K=K_, H=32, dtype=F32)
    bias = None if case["bias"] is None else jax.random.normal(keys[1], case["bias"])
    mask = None if case["mask"] is None else jax.random.bernoulli(keys[2], 0.8, case["mask"])
    kw = dict(is_causal=case.get("is_causal", False), local_window_size=case.get("window"),
              logits_soft_cap=case.get("soft_cap"))
    if case.get("segments"):
        seed = int(jax.random.randint(keys[3], (), 0, 2**30))
        q_ids, kv_ids = _segment_case(seed, B_, T_, S_, sorted_ids=True)
        kw.update(query_segment_ids=q_ids, key_value_segment_ids=kv_ids)
    if case.get("lengths"):
        kw.update(query_seq_lengths=jnp.array([T_, 20], jnp.int32),
                  key_value_seq_lengths=jnp.array([0, 30], jnp.int32))

    def attend(impl):
        def fn(q, k, v, bias):
            return pallas_flash.dot_product_attention(
                q, k, v, bias, mask, implementation=impl, return_residual=True,
                config=SMALL_BLOCKS if impl == "triton" else None, **kw)
        return jax.jit(fn)

    with jax.default_matmul_precision("highest"):
        (out, lse), (ref_out, ref_lse) = attend("triton")(q, k, v, bias), attend("xla")(q, k, v, bias)
        assert rel_err(out, ref_out) < 1e-5
        finite = np.isfinite(np.asarray(ref_lse))
        np.testing.assert_array_equal(np.asarray(lse)[~finite], -np.inf)
        np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-5, atol=1e-5)
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        grad = lambda impl: jax.jit(jax.grad(lambda *a: jnp.sum(attend(impl)(*a)[0] * d_out), argnums))(
            q, k, v, bias)
        for name_, got, want in zip("qkvb", grad("triton"), grad("xla")):
            assert got.shape == want.shape, name_
            assert rel_err(got, want) < 1e-4, name_


def test_bias_matches_jax_nn(rng):
    q, k, v, _ = random_inputs(rng, B=2, T=33, S=50, N=4, K=2, H=32, dtype=F32)
    bias = jax.random.normal(rng, (1, 4, 33, 50))
    mask = jnp.ones((2, 1, 1, 50), bool).at[1, :, :, 40:].set(False)
    with jax.default_matmul_precision("highest"):
        got = pallas_flash.dot_product_attention(q, k, v, bias, mask, is_causal=True, implementation="triton")
        want = jax.nn.dot_product_attention(q, k, v, bias, mask, is_causal=True, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bias_gradient_buffer_only_when_the_bias_is_differentiated(rng):
    """The [B, N, T, S] logit-gradient buffer exists only in a backward that needs d bias."""
    q, k, v, _ = random_inputs(rng, B=1, T=40, S=36, N=2, K=1, H=32, dtype=jnp.float32)
    bias = jax.random.normal(rng, (1, 1, 40, 36))
    loss = lambda q, bias: jnp.sum(pallas_flash.dot_product_attention(
        q, k, v, bias, implementation="triton") ** 2)
    full = "f32[1,2,40,36]"
    assert full not in jax.make_jaxpr(jax.grad(loss, argnums=0))(q, bias).pretty_print()
    assert full in jax.make_jaxpr(jax.grad(loss, argnums=1))(q, bias).pretty_print()


def test_additive_mask_bias_rows_match_the_reference(rng):
    """A bias at jax.nn's own masking magnitude masks its logits in both implementations: rows it
    masks entirely are zero, not the mean of V."""
    q, k, v, _ = random_inputs(rng, B=1, T=24, S=24, N=2, K=2, H=32, dtype=jnp.float32)
    dead_rows = (jnp.arange(24) < 5)[:, None]
    bias = jnp.where(dead_rows, jnp.finfo(jnp.float32).min, 0.0)[None, None] * jnp.ones((1, 1, 24, 24))
    got = pallas_flash.dot_product_attention(q, k, v, bias, implementation="triton")
    want = pallas_flash.dot_product_attention(q, k, v, bias, implementation="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[:, :5] == 0.0)
    live = jax.nn.dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(got[:, 5:], live[:, 5:], rtol=1e-5, atol=1e-5)
