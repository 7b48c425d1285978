"""Block skipping against brute force: no visible logit is ever skipped, and no tile that needs a
mask is ever run without one."""

import itertools

import numpy as np
import pytest

from pallas_flash import masking, reference


def _visible(spec, q_end, kv_end):
    vis = np.asarray(reference.visibility(spec.q_len, spec.kv_len, is_causal=spec.is_causal,
                                          window=spec.window))[0, 0]
    vis = vis.copy()
    vis[q_end:, :] = False
    vis[:, kv_end:] = False
    return vis


SPECS = [dict(is_causal=c, window=w) for c, w in itertools.product(
    [False, True], [None, (0, 0), (5, 2), (30, 0), (0, 17), (3, 40)])]


@pytest.mark.parametrize("kw", SPECS)
@pytest.mark.parametrize("T, S", [(37, 37), (50, 23), (23, 61)])
def test_block_ranges(kw, T, S):
    rs = np.random.default_rng()
    for _ in range(3):
        bq, bk = rs.choice([16, 32]), rs.choice([16, 32])
        q_end, kv_end = int(rs.integers(0, T + 1)), int(rs.integers(0, S + 1))
        spec = masking.MaskSpec(q_len=T, kv_len=S, has_q_lengths=True, has_kv_lengths=True, **kw)
        vis = _visible(spec, q_end, kv_end)
        tile_vis = np.asarray(reference.visibility(T, S, **kw))[0, 0]
        for qb in range(-(-T // bq)):
            lo, full_lo, full_hi, hi = map(int, masking.kv_block_range(spec, qb * bq, q_end, kv_end, bq, bk))
            assert lo <= full_lo <= full_hi <= hi
            rows = slice(qb * bq, (qb + 1) * bq)
            cols = np.nonzero(vis[rows].any(axis=0))[0]
            assert all(lo <= c // bk < hi for c in cols)
            for kb in range(full_lo, full_hi):  # mask-free tiles: every valid row sees every key
                block = tile_vis[rows, kb * bk:(kb + 1) * bk][: max(0, q_end - qb * bq)]
                assert block.all() and (kb + 1) * bk <= kv_end
        for kb in range(-(-S // bk)):
            lo, full_lo, full_hi, hi = map(int, masking.q_block_range(spec, kb * bk, q_end, kv_end, bq, bk))
            assert lo <= full_lo <= full_hi <= hi
            cols = slice(kb * bk, (kb + 1) * bk)
            rows = np.nonzero(vis[:, cols].any(axis=1))[0]
            assert all(lo <= r // bq < hi for r in rows)
            for qb in range(full_lo, full_hi):
                block = tile_vis[qb * bq:(qb + 1) * bq, cols]
                assert block.all() and (kb + 1) * bk <= kv_end
