"""Compiled-kernel checks at sizes interpret mode cannot reach (marker `gpu`)."""

import jax
import jax.numpy as jnp
import pytest

import pallas_flash
from pallas_flash import reference
from tests.helpers import naive_lowp, random_inputs, rel_err, tolerance

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("is_causal", [False, True])
def test_medium_bf16_against_reference(rng, is_causal):
    q, k, v, d_out = random_inputs(rng, B=2, T=2048, S=2048, N=8, K=2, H=128, dtype=jnp.bfloat16)
    scale = 128 ** -0.5
    f32 = lambda x: x.astype(jnp.float32)
    loss = lambda fn: (lambda q, k, v: jnp.sum(f32(fn(q, k, v)) * f32(d_out)))
    kernel = lambda q, k, v: pallas_flash.dot_product_attention(q, k, v, is_causal=is_causal, implementation="triton")
    oracle = lambda q, k, v: reference.attention(q, k, v, scale=scale, is_causal=is_causal)[0]
    naive = lambda q, k, v: naive_lowp(q, k, v, scale=scale, is_causal=is_causal)
    want = jax.jit(oracle)(f32(q), f32(k), f32(v))
    assert rel_err(jax.jit(kernel)(q, k, v), want) <= tolerance(rel_err(jax.jit(naive)(q, k, v), want), jnp.bfloat16)
    grad = lambda fn, *xs: jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(*xs)
    got, ref, low = grad(kernel, q, k, v), grad(oracle, f32(q), f32(k), f32(v)), grad(naive, q, k, v)
    for g, r, n in zip(got, ref, low):
        assert rel_err(g, r) <= tolerance(rel_err(n, r), jnp.bfloat16)


def test_long_sequence_fits_and_matches_on_leading_rows(rng):
    """1 x 16384 x 16 x 128 forward+backward: no O(S^2) memory, finite gradients; with top-left
    causal alignment the first rows' outputs equal attention of those rows alone."""
    q, k, v, d_out = random_inputs(rng, B=1, T=16384, S=16384, N=16, K=16, H=128, dtype=jnp.bfloat16)
    attn = lambda q, k, v: pallas_flash.dot_product_attention(q, k, v, is_causal=True, implementation="triton")
    out = jax.jit(attn)(q, k, v)
    rows = 256
    want = reference.attention(q[:, :rows].astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                               scale=128 ** -0.5, is_causal=True)[0]
    assert rel_err(out[:, :rows], want) < 1e-2
    loss = lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) * d_out.astype(jnp.float32))
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    # The last keys are seen only by the last rows: their gradient is small but not identically zero.
    assert float(jnp.max(jnp.abs(grads[2][:, -1].astype(jnp.float32)))) > 0


@pytest.mark.parametrize("H, dtype", [(256, jnp.float32), (256, jnp.float16), (64, jnp.float32)])
def test_default_tiles_compile_for_every_dtype(rng, H, dtype):
    """The per-shape default tiles must fit shared memory for the wide dtypes too."""
    from tests.test_attention import check_case

    check_case(rng, B=1, T=300, S=300, N=2, K=1, H=H, dtype=dtype, is_causal=True)
