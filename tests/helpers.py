"""Oracles and tolerances shared by the attention tests.

Tolerances are scale-free: the kernel's error against the float32 reference may be at most twice the
error of the same attention computed naively in the input dtype, plus a small floor for float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_flash import reference

FLOOR = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 1e-3, jnp.dtype(jnp.float16): 2e-4}


def random_inputs(rng, *, B, T, S, N, K, H, dtype):
    kq, kk, kv, kd = jax.random.split(rng, 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (B, S, K, H), jnp.float32).astype(dtype)
    d_out = jax.random.normal(kd, (B, T, N, H), jnp.float32).astype(dtype)
    return q, k, v, d_out


def rel_err(x, ref) -> float:
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    assert np.all(np.isfinite(x)), "non-finite values in the result"
    # An RMS of 1e-2 floors the denominator: some gradients are exactly zero in exact arithmetic
    # (one key per row: the softmax is constant), and rounding noise must not count as relative error.
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-2 * np.sqrt(ref.size)))


def naive_lowp(q, k, v, *, scale, is_causal=False, window=None, q_lengths=None, kv_lengths=None,
               soft_cap=None, q_segment_ids=None, kv_segment_ids=None):
    """Attention as a plain implementation in the input dtype would do it: logits and
    probabilities rounded to the input dtype, softmax in float32."""
    dtype = q.dtype
    N, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k, N // K, axis=2)
    v = jnp.repeat(v, N // K, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=jnp.float32) * scale
    logits = reference.soft_capped(logits, soft_cap).astype(dtype)
    vis = reference.visibility(q.shape[1], k.shape[1], is_causal=is_causal, window=window,
                               q_lengths=q_lengths, kv_lengths=kv_lengths,
                               q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    vis = jnp.broadcast_to(vis, logits.shape)
    x = jnp.where(vis, logits.astype(jnp.float32), -1e30)
    p = jnp.where(vis, jax.nn.softmax(x, axis=-1), 0.0).astype(dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", p, v, preferred_element_type=jnp.float32).astype(dtype)


def tolerance(err_naive: float, dtype) -> float:
    return 2.0 * err_naive + FLOOR[jnp.dtype(dtype)]
