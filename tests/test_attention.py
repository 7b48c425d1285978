"""The Pallas kernel against the float32 reference: forward, log-sum-exp and dQ/dK/dV.

On CPU the kernel runs in Pallas interpret mode; on a GPU the same tests run the compiled kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_flash
from pallas_flash import FlashConfig, reference
from tests.helpers import naive_lowp, random_inputs, rel_err, tolerance

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16


def _lengths(rng, B, n, *, include_zero):
    lengths = np.array(jax.random.randint(rng, (B,), 1, n + 1))
    if include_zero:
        lengths[0] = 0
    return jnp.asarray(lengths, jnp.int32)


def check_case(rng, *, B, T, S, N, K, H, dtype, is_causal=False, window=None, q_lengths=False,
               kv_lengths=False, config=None, grads=True, soft_cap=None, segment_ids=None,
               implementation="triton"):
    """``segment_ids`` is ``(q_ids [B, T], kv_ids [B, S])`` or None."""
    k_in, k_q, k_kv = jax.random.split(rng, 3)
    q, k, v, d_out = random_inputs(k_in, B=B, T=T, S=S, N=N, K=K, H=H, dtype=dtype)
    ql = _lengths(k_q, B, T, include_zero=False) if q_lengths else None
    kvl = _lengths(k_kv, B, S, include_zero=True) if kv_lengths else None
    scale = 1.0 / math.sqrt(H)
    q_ids, kv_ids = (None, None) if segment_ids is None else segment_ids
    masks = dict(is_causal=is_causal, window=window, q_lengths=ql, kv_lengths=kvl, soft_cap=soft_cap,
                 q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    api_masks = dict(is_causal=is_causal, local_window_size=window, query_seq_lengths=ql,
                     key_value_seq_lengths=kvl, logits_soft_cap=soft_cap,
                     query_segment_ids=q_ids, key_value_segment_ids=kv_ids)
    f32 = lambda x: x.astype(F32)

    @jax.jit
    def kernel(q, k, v):
        return pallas_flash.dot_product_attention(q, k, v, implementation=implementation, config=config,
                                                  return_residual=True, **api_masks)

    @jax.jit
    def oracle(q, k, v):
        return reference.attention(q, k, v, scale=scale, **masks)

    # One forward serves the output checks and the gradients.
    if grads:
        (out, lse), kernel_vjp = jax.vjp(kernel, q, k, v)
    else:
        out, lse = kernel(q, k, v)
    ref_out, ref_lse = oracle(f32(q), f32(k), f32(v))
    naive = jax.jit(lambda q, k, v: naive_lowp(q, k, v, scale=scale, **masks))(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == q.dtype
    assert rel_err(out, ref_out) <= tolerance(rel_err(naive, ref_out), dtype)

    # Rows that see no key: exactly zero output and a -inf log-sum-exp, never NaN.
    finite = np.isfinite(np.asarray(ref_lse))
    assert np.all(np.asarray(out, np.float32)[~finite] == 0.0)
    assert np.all(np.asarray(lse, np.float32)[~finite] == -np.inf)
    lse_tol = 1e-5 if dtype == F32 else 2e-2
    np.testing.assert_allclose(np.asarray(lse, np.float32)[finite], np.asarray(ref_lse)[finite],
                               rtol=lse_tol, atol=lse_tol)

    if not grads:
        return
    loss = lambda fn: (lambda q, k, v: jnp.sum(f32(fn(q, k, v)[0]) * f32(d_out)))
    grad = lambda fn: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))
    # The log-sum-exp is returned as a residual, not differentiated (`return_residual`): a zero
    # cotangent stands in for it.
    got = kernel_vjp((d_out, jnp.zeros_like(lse)))
    want = grad(oracle)(f32(q), f32(k), f32(v))
    naive_g = grad(lambda q, k, v: (naive_lowp(q, k, v, scale=scale, **masks),))(q, k, v)
    for name, g, w, n, x in zip("qkv", got, want, naive_g, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        err, err_naive = rel_err(g, w), rel_err(n, w)
        assert err <= tolerance(err_naive, dtype), f"d{name}: {err=} {err_naive=}"
        # Queries past their length and rows that see nothing get exactly zero gradient.
        if name == "q":
            assert np.all(np.asarray(g, np.float32)[~finite] == 0.0)


CASES = {
    "length_one": dict(B=1, T=1, S=1, N=1, K=1, H=64, dtype=F32),
    "odd_causal": dict(B=2, T=17, S=17, N=3, K=3, H=64, dtype=F32, is_causal=True),
    "gqa_cross_bf16": dict(B=1, T=97, S=257, N=4, K=2, H=80, dtype=BF16),
    "mqa_causal_t_gt_s_f16": dict(B=2, T=257, S=97, N=4, K=1, H=128, dtype=F16, is_causal=True),
    "window_bf16": dict(B=1, T=130, S=130, N=2, K=2, H=32, dtype=BF16, window=(17, 5)),
    "causal_window_f32": dict(B=1, T=200, S=150, N=2, K=1, H=96, dtype=F32, is_causal=True,
                              window=(40, 0)),
    "lengths_causal_bf16": dict(B=3, T=64, S=96, N=2, K=2, H=64, dtype=BF16, is_causal=True,
                                q_lengths=True, kv_lengths=True),
    "kv_lengths_f32": dict(B=2, T=100, S=100, N=4, K=2, H=128, dtype=F32, kv_lengths=True),
    "head_dim_256_causal": dict(B=1, T=129, S=129, N=2, K=1, H=256, dtype=BF16, is_causal=True),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(rng, name):
    check_case(rng, **CASES[name])


SMALL_BLOCKS = FlashConfig(block_q=16, block_k=32, num_warps=4, num_stages=1, block_q_dkv=32,
                           block_k_dkv=16, block_q_dq=16, block_k_dq=16, num_warps_bwd=4,
                           num_stages_bwd=1)


@pytest.mark.parametrize("masks", [
    dict(is_causal=True),
    dict(window=(23, 9), q_lengths=True, kv_lengths=True),
    dict(is_causal=True, window=(30, 0), kv_lengths=True),
    dict(window=(0, 13)),
])
def test_many_small_blocks(rng, masks):
    """Small tiles put many blocks on each side of every band edge, exercising the block skipping
    and the masked/mask-free loop split."""
    check_case(rng, B=2, T=75, S=91, N=2, K=1, H=32, dtype=F32, config=SMALL_BLOCKS, **masks)


def test_matches_jax_nn(rng):
    """Same numbers and residual layout as jax.nn.dot_product_attention, including 3-D inputs and
    top-left causal alignment with T != S."""
    q, k, v, _ = random_inputs(rng, B=2, T=33, S=50, N=4, K=2, H=64, dtype=F32)
    ql = jnp.array([33, 20], jnp.int32)
    kvl = jnp.array([50, 41], jnp.int32)
    kw = dict(is_causal=True, local_window_size=(40, 3), query_seq_lengths=ql,
              key_value_seq_lengths=kvl, return_residual=True)
    out, lse = pallas_flash.dot_product_attention(q, k, v, implementation="triton", **kw)
    want, want_lse = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    valid = np.arange(33)[None, :, None] < np.asarray(ql)[:, None, None]
    np.testing.assert_allclose(np.where(valid, lse, 0), np.where(valid, want_lse, 0), rtol=1e-5, atol=1e-5)

    out3 = pallas_flash.dot_product_attention(q[0], k[0], v[0], is_causal=True, implementation="triton")
    want3 = jax.nn.dot_product_attention(q[0], k[0], v[0], is_causal=True)
    assert out3.shape == q[0].shape
    np.testing.assert_allclose(out3, want3, rtol=2e-5, atol=2e-5)


def test_xla_implementation_is_the_reference(rng):
    q, k, v, _ = random_inputs(rng, B=1, T=40, S=40, N=2, K=2, H=32, dtype=F32)
    got = pallas_flash.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_are_deterministic(rng):
    q, k, v, d_out = random_inputs(rng, B=1, T=80, S=80, N=4, K=1, H=64, dtype=BF16)
    loss = lambda q, k, v: jnp.sum(pallas_flash.dot_product_attention(
        q, k, v, is_causal=True, implementation="triton").astype(F32) * d_out.astype(F32))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    first, second = grad(q, k, v), grad(q, k, v)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_default_implementation_falls_back_for_unsupported_inputs(rng):
    q, k, v, _ = random_inputs(rng, B=1, T=16, S=16, N=2, K=2, H=32, dtype=F32)
    bias = jax.random.normal(rng, (1, 2, 16, 16))
    got = pallas_flash.dot_product_attention(q, k, v, bias)
    want = jax.nn.dot_product_attention(q, k, v, bias)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="head dims"):
        big = jnp.zeros((1, 4, 1, 512), F32)
        pallas_flash.dot_product_attention(big, big, big, implementation="triton")
