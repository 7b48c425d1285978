"""CPU smoke test of `benchmarks/gpt2_step.py`: interleaved rounds, one JSON record per implementation."""

import json

import numpy as np
import pytest

from benchmarks import gpt2_step


def test_tiny_run_times_interleaved_rounds_from_the_same_start(tmp_path):
    out = tmp_path / "gpt2_step.json"
    gpt2_step.main(["--tiny", "--impl", "xla", "--impl", "pallas_flash", "--impl", "cudnn",
                    "--warmup", "1", "--rounds", "3", "--calls", "2", "--out", str(out)])
    record = json.loads(out.read_text())
    assert (record["rounds"], record["calls"], record["batch_size"], record["seq_len"]) == (3, 2, 2, 64)
    results = record["results"]
    assert list(results) == ["xla", "pallas_flash", "cudnn"]
    if record["backend"] != "gpu":
        assert results["cudnn"]["error"].startswith("skipped")
    xla, ours = results["xla"], results["pallas_flash"]
    for r in (xla, ours):
        assert len(r["step_ms_rounds"]) == 3 and min(r["step_ms_rounds"]) > 0
        assert r["step_ms"] == np.median(r["step_ms_rounds"]) and r["step_ms_min"] == min(r["step_ms_rounds"])
        assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1e3))
        # Eight steps on one batch (compile, warm-up, three rounds of two): the loss on it goes down.
        assert r["last_loss"] < r["first_loss"]
    # Same weights, same batch: the attention implementations agree on the first loss.
    assert abs(xla["first_loss"] - ours["first_loss"]) < 1e-2 * xla["first_loss"]
