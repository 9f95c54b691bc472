"""Kernel dispatch (`use_kernels`): kernel and reference paths agree end to end."""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx

from .helpers import noisy_sin_steps


def _run(use_kernels, steps=3, geometry="EQ"):
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 24)), "b": jnp.zeros(24)}
    opt = psgd_eqx.kron(1e-2, geometry=geometry, use_kernels=use_kernels)
    return noisy_sin_steps(opt, params, steps)


def _assert_close(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jnp.issubdtype(x.dtype, jnp.floating):
            scale = float(jnp.max(jnp.abs(y))) + 1e-12
            np.testing.assert_allclose(x, y, atol=rtol * scale, rtol=0)


def test_interpreted_kernels_match_reference_end_to_end():
    _assert_close(_run("interpret"), _run(False), 1e-5)


def _eq_step_inputs(n):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jnp.triu(jax.random.normal(k1, (n, n))) / n + jnp.eye(n)
    a, b = jax.random.normal(k2, (n, n)), jax.random.normal(k3, (n, n))
    return q, a @ a.T / n, b @ b.T / n, jnp.asarray(0.13, jnp.float32)


def _triton_calls(use_kernels, n, platform):
    from psgd_eqx._ops import eq_triangular_step

    q, t1, t2 = (jax.ShapeDtypeStruct((n, n), jnp.float32) for _ in range(3))
    eta = jax.ShapeDtypeStruct((), jnp.float32)
    fn = jax.jit(lambda q, t1, t2, eta: eq_triangular_step(q, (t1, t2), eta, use_kernels))
    text = fn.trace(q, t1, t2, eta).lower(lowering_platforms=(platform,)).as_text()
    return text.count("xla.gpu.triton")


def test_platform_dispatch_lowers_on_cpu():
    from psgd_eqx._ops import eq_triangular_step

    # The op against an independent f64 NumPy computation of Q - eta*triu(T1 - T2)*Q:
    # True (platform dispatch: the reference branch on CPU), "interpret" (the Pallas
    # kernel, interpreted) and False (the reference) must all give it. (On a GPU, True
    # runs the compiled kernel in TF32: test_compiled_kernels_match_reference_on_gpu.)
    on_cpu = jax.default_backend() == "cpu"
    q, t1, t2, eta = _eq_step_inputs(40)
    q64, t164, t264 = (np.asarray(x, np.float64) for x in (q, t1, t2))
    want = q64 - 0.13 * (np.triu(t164 - t264) @ q64)
    assert np.max(np.abs(want - q64)) > 1e-2  # a real step, not the identity
    with jax.default_matmul_precision("highest"):
        for use_kernels in (True, "interpret", False) if on_cpu else ("interpret", False):
            got = jax.jit(lambda *a, u=use_kernels: eq_triangular_step(a[0], a[1:3], a[3], u))(
                q, t1, t2, eta)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=str(use_kernels))

    # Which branch each setting lowers to: the Triton kernel only for a CUDA lowering, and
    # under "auto" only from the measured size (psgd_eqx_kernels.should_use_kernel).
    assert _triton_calls(True, 40, "cpu") == 0
    assert _triton_calls(True, 40, "cuda") == 1
    assert _triton_calls(False, 40, "cuda") == 0
    assert _triton_calls("auto", 40, "cuda") == 0
    assert _triton_calls("auto", 2048, "cuda") == 1
    assert _triton_calls("auto", 2048, "cpu") == 0

    # End to end: True compiles and runs on CPU (its reference branch) and matches the
    # interpreted kernel path.
    if on_cpu:
        _assert_close(_run(True), _run("interpret"), 1e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_kernels_match_reference_on_gpu():
    # TF32 products in the kernel: looser tolerance
    _assert_close(_run(True), _run(False), 2e-3)


def test_bad_use_kernels():
    with pytest.raises(ValueError, match="use_kernels"):
        psgd_eqx.kron(use_kernels="yes")
    with pytest.raises(ValueError, match="use_kernels"):
        psgd_eqx.KronQ.init((3, 3), use_kernels="always")


# -- Q⁻ᴴ·B (`solve_upper_h`): batched on GPU/TPU, a sequential map on CPU ------------------


def _upper(key, shape):
    n = shape[-1]
    return jnp.triu(jax.random.normal(key, shape)) / n + 2.0 * jnp.broadcast_to(jnp.eye(n), shape)


def test_solve_upper_h_matches_the_solver_under_nested_vmap():
    from psgd_eqx._ops import solve_upper_h

    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    q = _upper(k1, (3, 2, 12, 12))
    b = jax.random.normal(k2, (3, 2, 12, 5))
    want = jax.scipy.linalg.solve_triangular(q, b, trans="C", lower=False)
    got = jax.jit(jax.vmap(jax.vmap(solve_upper_h)))(q, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # one side batched: one factor for every right-hand side, and one right-hand side
    # for every factor
    solve = ft.partial(jax.scipy.linalg.solve_triangular, trans="C", lower=False)
    got = jax.vmap(solve_upper_h, in_axes=(None, 0))(q[0, 0], b[:, 0])
    np.testing.assert_allclose(got, jax.vmap(solve, in_axes=(None, 0))(q[0, 0], b[:, 0]),
                               rtol=1e-5, atol=1e-5)
    got = jax.vmap(solve_upper_h, in_axes=(0, None))(q[:, 0], b[0, 0, :, 0])
    np.testing.assert_allclose(got, jax.vmap(solve, in_axes=(0, None))(q[:, 0], b[0, 0, :, 0]),
                               rtol=1e-5, atol=1e-5)


def test_batched_solves_on_cpu_run_one_matrix_at_a_time():
    # The CPU lowering has no batched triangular solve (jaxlib's batched CPU solver can
    # deadlock when several run at once: see `solve_upper_h`), only a loop of 2-D ones.
    from psgd_eqx._ops import solve_upper_h

    def solve_shapes(fn):
        q, b = _upper(jax.random.PRNGKey(0), (4, 16, 16)), jnp.ones((4, 16, 3))
        hlo = jax.jit(jax.vmap(fn)).lower(q, b).compile().as_text()
        calls = [line for line in hlo.splitlines() if "lapack_strsm" in line]
        return [line.split("=")[1].split("{")[0].strip() for line in calls]

    assert solve_shapes(solve_upper_h) == ["f32[16,3]"]
    # the control: the plain solver under vmap is one batched call
    plain = ft.partial(jax.scipy.linalg.solve_triangular, trans="C", lower=False)
    assert solve_shapes(plain) == ["f32[4,16,3]"]


DEADLOCK_SCRIPT = """
import jax, jax.numpy as jnp, optax, psgd_eqx
shapes = {f"w{i}": (4, 128, 128) for i in range(4)}
params = {k: 0.02 * jax.random.normal(jax.random.PRNGKey(i), s)
          for i, (k, s) in enumerate(shapes.items())}
grads = jax.tree.map(lambda p: 0.01 * jnp.sin(7.0 * p + 1.0), params)
opt = psgd_eqx.kron(1e-3, geometry="EQ", scanned_layers=lambda path, leaf: True,
                    bucket_leaves=False)
state = opt.init(params)
step = jax.jit(opt.update)
for _ in range(10):
    _, state = step(grads, state, params)
jax.block_until_ready(state)
print("done")
"""


def test_scanned_eq_refits_do_not_deadlock_on_cpu():
    # Regression: four scanned (4, 128, 128) leaves refitting in one step hung forever on
    # a 2-core machine before the solves were unbatched on CPU.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DEADLOCK_SCRIPT], capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done" in out.stdout


def test_solve_upper_h_gradients_match_the_solver():
    # reverse mode too (custom_vmap alone is forward-mode only), batched and not
    from psgd_eqx._ops import solve_upper_h

    k1, k2 = jax.random.split(jax.random.PRNGKey(5))
    q = _upper(k1, (6, 6)) + jnp.tril(jnp.ones((6, 6)), -1)  # lower part must be ignored
    b = jax.random.normal(k2, (3, 6, 2))
    solve = ft.partial(jax.scipy.linalg.solve_triangular, trans="C", lower=False)
    loss = lambda f: lambda q, b: jnp.sum(jnp.sin(jax.vmap(f, (None, 0))(q, b)))  # noqa: E731
    got = jax.grad(loss(solve_upper_h), argnums=(0, 1))(q, b)
    want = jax.grad(loss(solve), argnums=(0, 1))(q, b)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    got = jax.jvp(solve_upper_h, (q, b[0]), (q, b[0]))[1]
    np.testing.assert_allclose(got, jax.jvp(solve, (q, b[0]), (q, b[0]))[1], rtol=1e-4,
                               atol=1e-5)


def test_eq_dispatch_sees_the_stack_size(monkeypatch):
    """Under `vmap` the kernel decision is asked with the stack's size (nested `vmap`s
    multiply), the result equals the reference, and both differentiation modes work."""
    from psgd_eqx import _ops

    asked = []

    def record(op, n, batch, backend="gpu"):  # "the kernel pays from a stack of 8 on"
        asked.append((op, n, batch))
        return batch >= 8

    monkeypatch.setattr(_ops.kernels, "should_use_kernel", record)
    _ops._eq_dispatch.cache_clear()
    n = 6
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    eye = jnp.broadcast_to(3.0 * jnp.eye(n), (2, 4, n, n))
    q = jnp.triu(jax.random.normal(keys[0], (2, 4, n, n))) + eye
    t1 = jax.random.normal(keys[1], (2, 4, n, n))
    t2 = jax.random.normal(keys[2], (2, 4, n, n))
    eta = jnp.full((2, 4), 0.1, jnp.float32)

    def one(q, t1, t2, eta):
        return _ops.eq_triangular_step(q, (t1, t2), eta, "auto")

    def dispatches_by_platform(fn, *args):  # a kernel branch was compiled in
        return "platform_index" in str(jax.make_jaxpr(fn)(*args))

    nested = jax.vmap(jax.vmap(one))
    assert dispatches_by_platform(nested, q, t1, t2, eta)
    assert ("eq_factor_update", n, 8) in asked  # the stack of 2 × 4
    assert not dispatches_by_platform(jax.vmap(one), q[0], t1[0], t2[0], eta[0])  # 4 < 8
    assert not dispatches_by_platform(one, q[0, 0], t1[0, 0], t2[0, 0], eta[0, 0])
    out = nested(q, t1, t2, eta)  # on CPU the reference runs either way
    want = q - 0.1 * (jnp.triu(t1 - t2) @ q)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    one_factor = one(q[0, 0], t1[0, 0], t2[0, 0], eta[0, 0])
    np.testing.assert_allclose(one_factor, want[0, 0], rtol=1e-6, atol=1e-6)
    # an unbatched eta (one step size for the stack) is broadcast
    shared = jax.vmap(one, in_axes=(0, 0, 0, None))(q[0], t1[0], t2[0], jnp.float32(0.1))
    np.testing.assert_allclose(shared, want[0], rtol=1e-6, atol=1e-6)

    def loss(q):
        return jnp.sum(jax.vmap(jax.vmap(one))(q, t1, t2, eta) ** 2)

    def loss_ref(q):
        return jnp.sum((q - 0.1 * (jnp.triu(t1 - t2) @ q)) ** 2)

    np.testing.assert_allclose(jax.grad(loss)(q), jax.grad(loss_ref)(q), rtol=1e-5, atol=1e-5)
    tangent = jnp.ones_like(q)
    np.testing.assert_allclose(jax.jvp(loss, (q,), (tangent,))[1],
                               jax.jvp(loss_ref, (q,), (tangent,))[1], rtol=1e-5)
    _ops._eq_dispatch.cache_clear()
