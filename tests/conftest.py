"""Shared test setup: the `gpu` marker skips cleanly where no CUDA GPU is present.

Every unmarked test runs everywhere: on CPU the Pallas kernels run in interpret mode, on the GPU
machine the same tests exercise the compiled kernels.
"""

import os

# XLA's GEMM autotuning of every reference einsum costs the GPU suite minutes and changes no result.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
# The Mosaic GPU interpreter runs each warpgroup as its own XLA:CPU execution that blocks inside
# barrier-wait callbacks, while the kernel's own callback waits for all of them. The CPU client runs
# executions on a pool of one thread per core, so on a 2-core machine the kernel's callback and one
# blocked warpgroup fill it and the warpgroups that would release the barrier never start: a
# deadlock (NOTES.md, "CPU suite"). PJRT_NPROC sizes that pool when the client is created.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))

# `pytest -n 4` on one GPU runs four processes; XLA's default of taking 75% of the GPU's memory in
# each made the later ones fail to load their kernels (CUDA_ERROR_OUT_OF_MEMORY, NOTES.md session 18).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402  (after the environment above, which the backend reads once)
import pytest  # noqa: E402

# Float32 comparisons between implementations need true float32 dots: on a GPU XLA's default lets
# them run as tf32 (~3e-4 relative), which would drown the differences the tests look for.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A fresh key per test, different on every run, printed on failure for replay."""
    import secrets

    seed = secrets.randbits(31)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return jax.random.key(seed)
