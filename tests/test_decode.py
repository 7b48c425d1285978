"""Flash-decoding kernel (`pallas_flash.decode`) against an independent float64 oracle.

On CPU the kernel runs in Pallas interpret mode, which pads out-of-range tile reads with NaN, and
the caches below hold NaN past each row's length: a missing bound or mask fails loudly.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_flash import reference
from pallas_flash.decode import DecodeConfig, decode_attention, default_num_splits

on_gpu = jax.default_backend() == "gpu"


def oracle(q, k, v, lengths, *, scale=None, left=None, cap=None):
    """Decode attention written out in float64 NumPy: token t of row b sits at position
    ``lengths[b] - T + t`` and sees keys ``max(0, pos - left) <= j <= pos``. Returns ``(out, lse)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    k = np.repeat(k, N // K, axis=2)
    v = np.repeat(v, N // K, axis=2)
    lengths = np.clip(np.asarray(lengths), 0, S)
    pos = lengths[:, None] - T + np.arange(T)[None, :]  # [B, T]
    j = np.arange(S)[None, None, :]
    visible = j <= pos[:, :, None]
    if left is not None:
        visible &= j >= pos[:, :, None] - left
    visible = visible[:, None]  # [B, 1, T, S]
    # Zero the invalid cache entries first: the test caches hold NaN there on purpose.
    valid = (np.arange(S)[None, :] < lengths[:, None])[:, :, None, None]
    k, v = np.where(valid, k, 0.0), np.where(valid, v, 0.0)
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    if cap is not None:
        s = cap * np.tanh(s / cap)
    s = np.where(visible, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.exp(s - top)
    total = p.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnh->btnh", p / np.where(total > 0, total, 1.0), v)
    lse = np.where(total > 0, top + np.log(np.where(total > 0, total, 1.0)), -np.inf)[..., 0]
    return out, np.transpose(lse, (0, 2, 1))


def naive_error(q, k, v, lengths, expected, *, dtype, **kw):
    """Max error of the same math done naively in ``dtype`` (logits, softmax and sums all in it):
    the scale of rounding a correct low-precision kernel may show."""
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    scale = jnp.asarray(1.0 / math.sqrt(H), dtype)
    k = jnp.repeat(jnp.nan_to_num(k), N // K, axis=2)
    v = jnp.repeat(jnp.nan_to_num(v), N // K, axis=2)
    pos = jnp.asarray(lengths)[:, None] - T + jnp.arange(T)[None, :]
    visible = (jnp.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    s = jnp.where(visible, jnp.einsum("btnh,bsnh->bnts", q, k) * scale, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.nan_to_num(jnp.einsum("bnts,bsnh->btnh", p, v))
    return float(np.max(np.abs(np.asarray(out, np.float64) - expected)))


def make_inputs(B, T, N, K, H, S, lengths, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, N, H), np.float32)
    k = rng.standard_normal((B, S, K, H), np.float32)
    v = rng.standard_normal((B, S, K, H), np.float32)
    lengths = np.asarray(lengths, np.int32)
    # Poison everything past each row's length: the kernel must never let it reach the output.
    invalid = (np.arange(S)[None, :] >= lengths[:, None])[:, :, None, None]
    k = np.where(invalid, np.nan, k)
    v = np.where(invalid, np.inf, v)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(lengths))


def check(B, T, N, K, H, S, lengths, *, dtype=jnp.float32, window=None, cap=None, atol=2e-5, **kw):
    q, k, v, L = make_inputs(B, T, N, K, H, S, lengths, dtype)
    out, lse = decode_attention(q, k, v, cache_lengths=L, local_window_size=window, logits_soft_cap=cap,
                                return_residual=True, **kw)
    left = window if isinstance(window, int) or window is None else window[0]
    expected, expected_lse = oracle(q, k, v, L, left=left, cap=cap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, T, N) and lse.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, expected, atol=atol, rtol=0)
    lse = np.asarray(lse)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(expected_lse))
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(lse[finite], expected_lse[finite], atol=max(atol, 1e-4), rtol=0)
    return out, expected


CASES = {
    # name: (B, T, N, K, H, S, lengths, extra keyword arguments)
    "gqa_t1_default_splits": (3, 1, 4, 2, 64, 97, [0, 1, 97], {}),
    "gqa_t3_odd_lengths": (3, 3, 8, 2, 80, 200, [3, 77, 200], dict(num_splits=4)),
    "t3_lengths_below_t": (3, 3, 4, 2, 64, 97, [1, 2, 0], dict(num_splits=2)),
    "mqa_t3": (3, 3, 8, 1, 64, 97, [2, 96, 50], dict(num_splits=3)),
    "mha_t1": (3, 1, 2, 2, 64, 97, [97, 33, 64], dict(num_splits=5)),
    "more_splits_than_blocks": (3, 1, 4, 2, 64, 97, [97, 17, 0],
                                dict(num_splits=16, config=DecodeConfig(block_k=16))),
    "row_blocks_mqa_t16": (2, 16, 8, 1, 64, 97, [97, 20], dict(num_splits=2)),
    "window": (3, 3, 4, 2, 64, 200, [200, 150, 5], dict(num_splits=5, window=(20, 0))),
    "window_int_soft_cap": (3, 1, 4, 2, 80, 200, [199, 64, 1], dict(num_splits=3, window=33, cap=2.0)),
    "soft_cap": (3, 3, 4, 2, 64, 97, [97, 40, 3], dict(num_splits=2, cap=1.5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_oracle(name):
    B, T, N, K, H, S, lengths, kw = CASES[name]
    check(B, T, N, K, H, S, lengths, **kw)


def test_oracle_agrees_with_reference_attention():
    """The oracle above and `reference.attention` with an explicit mask: one semantics, two codes."""
    B, T, N, K, H, S = 3, 3, 4, 2, 64, 40
    lengths = np.array([40, 7, 2])
    q, k, v, L = make_inputs(B, T, N, K, H, S, lengths)
    k, v = jnp.nan_to_num(k, nan=0.0, posinf=0.0), jnp.nan_to_num(v, nan=0.0, posinf=0.0)
    pos = lengths[:, None] - T + np.arange(T)[None, :]
    mask = (np.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    out, lse = reference.attention(q, k, v, None, jnp.asarray(mask), scale=1 / math.sqrt(H))
    expected, expected_lse = oracle(q, k, v, L)
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), expected_lse, atol=1e-5)


def test_empty_rows_are_zero():
    q, k, v, L = make_inputs(2, 3, 4, 2, 64, 97, [0, 1])
    out, lse = decode_attention(q, k, v, cache_lengths=L, num_splits=3, return_residual=True)
    out = np.asarray(out)
    assert np.all(out[0] == 0) and np.all(np.isneginf(np.asarray(lse[0])))
    # Row 1 has one valid key, at position 0: only its last token (position 0) sees it.
    assert np.all(out[1, :2] == 0) and not np.any(out[1, 2] == 0)


def test_splits_agree():
    """The combine is exact: one split and many give the same result to float32 rounding."""
    q, k, v, L = make_inputs(2, 1, 4, 2, 64, 200, [200, 131])
    one = decode_attention(q, k, v, cache_lengths=L, num_splits=1, config=DecodeConfig(block_k=16))
    many = decode_attention(q, k, v, cache_lengths=L, num_splits=7, config=DecodeConfig(block_k=16))
    np.testing.assert_allclose(np.asarray(one), np.asarray(many), atol=2e-6)


def test_lengths_past_cache_are_clipped():
    q, k, v, _ = make_inputs(2, 1, 4, 2, 64, 97, [97, 97])
    clipped = decode_attention(q, k, v, cache_lengths=jnp.array([97, 40]), num_splits=2)
    beyond = decode_attention(q, k, v, cache_lengths=jnp.array([500, 40]), num_splits=2)
    np.testing.assert_array_equal(np.asarray(clipped), np.asarray(beyond))


def test_traced_lengths_under_jit():
    q, k, v, _ = make_inputs(3, 1, 4, 2, 64, 97, [97, 97, 97])
    step = jax.jit(lambda q, k, v, L: decode_attention(q, k, v, cache_lengths=L, num_splits=2))
    for lengths in ([97, 50, 3], [10, 0, 96]):
        L = jnp.array(lengths, jnp.int32)
        np.testing.assert_allclose(np.asarray(step(q, k, v, L)), oracle(q, k, v, L)[0], atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_within_naive_error(dtype):
    B, T, N, K, H, S = 3, 1, 8, 2, 64, 200
    lengths = [200, 77, 1]
    q, k, v, L = make_inputs(B, T, N, K, H, S, lengths, dtype)
    out = decode_attention(q, k, v, cache_lengths=L, num_splits=4)
    assert out.dtype == dtype
    expected, _ = oracle(q, k, v, L)
    err = float(np.max(np.abs(np.asarray(out, np.float64) - expected)))
    naive = naive_error(q, k, v, L, expected, dtype=dtype)
    # The kernel keeps float32 statistics, so it should do no worse than the all-low-precision math.
    assert err <= 2.0 * naive, (err, naive)


def test_default_num_splits():
    # One row, eight heads, a long cache: split to fill the GPU.
    assert default_num_splits(1, 8, 131072, block_k=128, num_sms=132) >= 32
    # A big batch fills the GPU alone.
    assert default_num_splits(64, 8, 4096, block_k=128, num_sms=132) == 1
    # A short cache is never cut below a few blocks per split.
    assert default_num_splits(1, 8, 512, block_k=128, num_sms=132) == 1


def make_pages(k, v, lengths, page_size, seed=0):
    """Scatters contiguous caches into shuffled page pools (NaN/inf in the spare pages) and returns
    ``(k_pool, v_pool, page_table)``; table entries past each row's last used page are stale."""
    B, S, K, H = k.shape
    per_row = S // page_size
    num_pages = B * per_row + 3
    table = np.random.default_rng(seed).permutation(num_pages)[:B * per_row].reshape(B, per_row)
    k_pool = np.full((num_pages, page_size, K, H), np.nan, np.float32)
    v_pool = np.full((num_pages, page_size, K, H), np.inf, np.float32)
    k_pool[table] = np.asarray(k, np.float32).reshape(B, per_row, page_size, K, H)
    v_pool[table] = np.asarray(v, np.float32).reshape(B, per_row, page_size, K, H)
    for b, length in enumerate(np.asarray(lengths)):
        table[b, -(-length // page_size):] = 10**6  # never read for a result, clamped if loaded
    return (jnp.asarray(k_pool, k.dtype), jnp.asarray(v_pool, v.dtype), jnp.asarray(table, jnp.int32))


PAGED_CASES = {
    # name: (T, page_size, num_splits, block_k, window)
    "pages_of_16": (1, 16, 3, None, None),
    "small_pages_t3_window": (3, 4, 2, 32, 13),
    "page_per_block": (3, 32, 4, 16, None),
}


@pytest.mark.parametrize("name", list(PAGED_CASES))
def test_paged_cache_matches_oracle(name, atol=2e-5):
    T, page_size, splits, block_k, window = PAGED_CASES[name]
    B, N, K, H, S = 3, 8, 2, 64, 96
    q, k, v, L = make_inputs(B, T, N, K, H, S, [96, 41, 0])
    k_pool, v_pool, table = make_pages(k, v, L, page_size)
    out = decode_attention(q, k_pool, v_pool, cache_lengths=L, page_table=table, num_splits=splits,
                           local_window_size=window, config=DecodeConfig(block_k=block_k))
    assert not np.isnan(np.asarray(out)).any()
    np.testing.assert_allclose(np.asarray(out), oracle(q, k, v, L, left=window)[0], atol=atol, rtol=0)


@pytest.mark.parametrize("paged", [False, True])
def test_lowers_to_triton_for_h100(paged):
    """The Triton lowering (jaxpr -> TTIR) of the compiled path runs on CPU too, for an abstract H100:
    an op the Triton backend lacks fails here, not first on the GPU machine."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    B, S, N, K, H = 2, 4096, 32, 8, 128
    q = jax.ShapeDtypeStruct((B, 3, N, H), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
    if paged:
        kv = jax.ShapeDtypeStruct((64, 16, K, H), jnp.bfloat16)
        table = jax.ShapeDtypeStruct((B, 32), jnp.int32)
    else:
        kv, table = jax.ShapeDtypeStruct((B, S, K, H), jnp.bfloat16), None

    def f(q, k, v, lengths, table):
        return decode_attention(q, k, v, cache_lengths=lengths, page_table=table, local_window_size=100,
                                logits_soft_cap=30.0, interpret=False)

    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Triton backend's deprecation notice
        text = jax.jit(f).trace(q, kv, kv, lengths, table).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text  # the kernel became a Triton module


def _good():
    return dict(query=jnp.zeros((2, 1, 4, 64)), key_cache=jnp.zeros((2, 16, 2, 64)),
                value_cache=jnp.zeros((2, 16, 2, 64)), cache_lengths=jnp.array([3, 4]))


@pytest.mark.parametrize("change, error, match", [
    (dict(query=jnp.zeros((1, 4, 64))), ValueError, "query must be"),
    (dict(query=jnp.zeros((2, 17, 4, 64))), ValueError, "1 to 16 query tokens"),
    (dict(query=jnp.zeros((2, 1, 3, 64))), ValueError, "multiple of key/value heads"),
    (dict(value_cache=jnp.zeros((2, 15, 2, 64))), ValueError, "key_cache and value_cache"),
    (dict(query=jnp.zeros((2, 1, 4, 64), jnp.bfloat16)), ValueError, "share one dtype"),
    (dict(query=jnp.zeros((2, 1, 4, 64), jnp.int32)), ValueError, "floating"),
    (dict(cache_lengths=jnp.array([3.0, 4.0])), ValueError, "cache_lengths"),
    (dict(cache_lengths=jnp.array([3])), ValueError, "cache_lengths"),
    (dict(local_window_size=-1), ValueError, "local_window_size"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(scale=jnp.float32(0.1)), ValueError, "scale"),
    (dict(query=jnp.zeros((2, 1, 4, 512)), key_cache=jnp.zeros((2, 16, 2, 512)),
          value_cache=jnp.zeros((2, 16, 2, 512))), NotImplementedError, "head dims up to 256"),
    (dict(page_table=jnp.zeros((3, 2), jnp.int32)), ValueError, "page_table"),
    (dict(page_table=jnp.zeros((2, 2))), ValueError, "page_table"),
    (dict(key_cache=jnp.zeros((5, 12, 2, 64)), value_cache=jnp.zeros((5, 12, 2, 64)),
          page_table=jnp.zeros((2, 2), jnp.int32)), NotImplementedError, "page_size"),
    (dict(query=jnp.zeros((2, 1, 4, 80)), key_cache=jnp.zeros((5, 16, 2, 80)),
          value_cache=jnp.zeros((5, 16, 2, 80)), page_table=jnp.zeros((2, 2), jnp.int32)),
     NotImplementedError, "power-of-two head dim"),
])
def test_validation(change, error, match):
    with pytest.raises(error, match=match):
        decode_attention(**{**_good(), **change})


@pytest.mark.gpu
@pytest.mark.skipif(not on_gpu, reason="needs a CUDA GPU")
class TestGPU:
    """The compiled Triton kernel (no interpret mode) on real hardware."""

    @pytest.mark.parametrize("name", ["gqa_t3_odd_lengths", "window_int_soft_cap", "row_blocks_mqa_t16",
                                      "more_splits_than_blocks"])
    def test_float32(self, name):
        B, T, N, K, H, S, lengths, kw = CASES[name]
        # exp2/tanh are the hardware's approximate versions: allow a little more than on CPU.
        check(B, T, N, K, H, S, lengths, atol=1e-4, **kw)

    @pytest.mark.parametrize("name", list(PAGED_CASES))
    def test_paged(self, name):
        test_paged_cache_matches_oracle(name, atol=1e-4)

    def test_bf16_long_cache_gqa(self):
        B, T, N, K, H, S = 4, 1, 32, 8, 128, 4099
        lengths = [4099, 4000, 1, 0]
        q, k, v, L = make_inputs(B, T, N, K, H, S, lengths, jnp.bfloat16)
        out = decode_attention(q, k, v, cache_lengths=L)
        expected, _ = oracle(q, k, v, L)
        err = float(np.max(np.abs(np.asarray(out, np.float64) - expected)))
        assert err <= 2.0 * naive_error(q, k, v, L, expected, dtype=jnp.bfloat16)
