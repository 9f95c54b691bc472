"""The fused refit and apply kernels inside the optimizer (`psgd_eqx._fused`): the whole
`kron` step through them equals the jnp path, one launch per stack, lowered for GPU and TPU,
and `use_kernels="auto"` leaves the step untouched until a measurement says otherwise."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import psgd_eqx_kernels as kernels
import pytest

import psgd_eqx

from .helpers import noisy_sin_steps


def _params(only=None):
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    tree = {
        "w": [jax.random.normal(ks[i], (12, 20)) for i in range(3)],  # a bucket of 3
        "s": jax.random.normal(ks[3], (2, 9, 7)),  # a scanned stack of 2 layers
        "b": jnp.zeros(20),  # diagonal only: no dense factor, no kernel
        "v": jax.random.normal(ks[4], (40, 6)),  # a leaf of its own (dense 6, diag 40)
    }
    return tree if only is None else {k: tree[k] for k in only}


_SCANNED = {"w": [False] * 3, "s": True, "b": False, "v": False}


def _opt(use_kernels, geometry, cache=False, only=None):
    scanned = _SCANNED if only is None else {k: _SCANNED[k] for k in only}
    return psgd_eqx.kron(1e-2, geometry=geometry, use_kernels=use_kernels,
                         cache_preconditioner=cache, scanned_layers=scanned,
                         preconditioner_update_probability=1.0)


def _run(use_kernels, geometry, cache=False, steps=3, only=None):
    return noisy_sin_steps(_opt(use_kernels, geometry, cache, only), _params(only), steps)


def _floats(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


# The default run takes the bucket alone (every interpreted kernel costs seconds to
# compile); the whole tree (bucket, scanned stack, single leaf) and the other geometries
# run with -m slow. EQ through the fused path is also covered by
# tests/test_ops.py::test_interpreted_kernels_match_reference_end_to_end.
@pytest.mark.parametrize("geometry,cache,only", [
    ("PRO", False, ("w",)),
    pytest.param("PRO", False, None, marks=pytest.mark.slow),
    pytest.param("EQ", True, None, marks=pytest.mark.slow),
    pytest.param("QUAD", False, None, marks=pytest.mark.slow),
    pytest.param("PRO", True, None, marks=pytest.mark.slow),
    pytest.param("PRO4P", False, None, marks=pytest.mark.slow),
])
def test_fused_kernels_match_the_jnp_path_end_to_end(geometry, cache, only):
    run = lambda use_kernels: _run(use_kernels, geometry, cache, steps=2, only=only)
    want = run(False)
    for x, y in zip(_floats(run("interpret")), _floats(want)):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-6 * scale)
    # the run did something: the params moved from their start
    assert max(float(jnp.max(jnp.abs(y - y0))) for y, y0 in
               zip(_floats(want[0]), _floats(_params(only)))) > 1e-3
    # `True` on CPU runs the reference branch: exactly the `False` numbers
    for x, y in zip(_floats(run(True)), _floats(want)):
        np.testing.assert_array_equal(x, y)


def _lowered(use_kernels, geometry, platform):
    params = _params()
    opt = _opt(use_kernels, geometry)
    state = opt.init(params)
    grads = jax.tree.map(jnp.sin, params)
    traced = jax.jit(opt.update).trace(grads, state, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax >= 0.11: Pallas Triton
        text = traced.lower(lowering_platforms=(platform,)).as_text()
    return traced, text


@pytest.mark.parametrize("geometry", ["PRO", "EQ"])
def test_use_kernels_true_lowers_one_launch_per_stack_for_gpu_and_tpu(geometry):
    # Three stacks have dense factors (the bucket w, the scanned s, the leaf v): one fused
    # refit and one fused apply each, whatever the stack size. The CPU lowering has none.
    _, cuda = _lowered(True, geometry, "cuda")
    _, tpu = _lowered(True, geometry, "tpu")
    _, cpu = _lowered(True, geometry, "cpu")
    assert cuda.count("xla.gpu.triton") == 6
    assert tpu.count("tpu_custom_call") == 6
    assert "xla.gpu.triton" not in cpu and "tpu_custom_call" not in cpu


def test_auto_leaves_the_step_untouched_until_measured():
    # No measurement says the fused kernels win yet: under "auto" the traced PRO step is
    # the very graph of use_kernels=False (no dispatch wrappers), and no GPU lowering
    # launches a kernel.
    auto, cuda = _lowered("auto", "PRO", "cuda")
    off, _ = _lowered(False, "PRO", "cuda")
    assert str(auto.jaxpr) == str(off.jaxpr)
    assert "xla.gpu.triton" not in cuda


def test_the_dispatch_sees_the_stack_size(monkeypatch):
    # Pretend a measurement exists so "auto" dispatches, and record what it is asked:
    # the bucket of three (12, 20) leaves and the scanned stack of two (9, 7) layers are
    # asked with their stack sizes, the single leaf with 1.
    seen = []
    table = dict(kernels.KERNEL_MIN_N, fused_factor_refit={1: 10_000},
                 fused_kron_apply={1: 10_000})
    monkeypatch.setattr(kernels, "KERNEL_MIN_N", table)

    def spy(op, n, batch, backend="gpu"):
        seen.append((op, n, batch))
        return False

    monkeypatch.setattr(kernels, "should_use_kernel", spy)
    _lowered("auto", "PRO", "cuda")

    def largest_stack(op):  # (custom_vmap also traces each call once unbatched: batch 1)
        out = {}
        for o, n, b in seen:
            if o == op:
                out[n] = max(out.get(n, 0), b)
        return out

    # refits: w's dense 12-axis in a bucket of 3, s's dense 7-axis in 2 layers, v's 6
    assert largest_stack("fused_factor_refit") == {12: 3, 7: 2, 6: 1}
    # applies, asked with the larger side of each matrix
    assert largest_stack("fused_kron_apply") == {20: 3, 9: 2, 40: 1}


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")
def test_compiled_fused_kernels_match_the_jnp_path():
    # On hardware `True` launches the compiled kernels (TF32 products on GPU by default,
    # hence the looser tolerance); the bucket, the scanned stack and the single leaf all fit.
    want = _run(False, "PRO", steps=2)
    got = _run(True, "PRO", steps=2)
    for x, y in zip(_floats(got), _floats(want)):
        scale = float(jnp.max(jnp.abs(y))) + 1e-12
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-3 * scale)
