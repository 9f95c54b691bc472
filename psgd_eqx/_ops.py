"""Dispatch of the hot ops: the Pallas kernel on GPU/TPU where it pays, the jnp reference
elsewhere.

The choice of platform is made by `jax.lax.platform_dependent`, i.e. when the step is
lowered for a device, not from `jax.default_backend()` at trace time: one jitted step
compiled for a CPU runs the reference and the same step compiled for a GPU runs the kernel.
Which sizes get a kernel under `"auto"` comes from measurements
(`psgd_eqx_kernels.should_use_kernel`, `benchmarks/RESULTS.md`): on an H100 only the fused
`EQ` update beats XLA, and only for large factors, so that is the only op dispatched so far.
"""

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import psgd_eqx_kernels as kernels
from jax.custom_batching import custom_vmap
from jaxtyping import Array


USE_KERNELS = ("auto", True, False, "interpret")


def check_use_kernels(value) -> None:
    """`ValueError` for anything but `"auto"`, `True`, `False` or `"interpret"`."""
    if not any(value is v or (isinstance(v, str) and value == v) for v in USE_KERNELS):
        raise ValueError(f"`use_kernels` must be one of {USE_KERNELS}; got {value!r}.")


def eq_triangular_step(q: Array, e_terms: tuple[Array, Array], eta: Array, use_kernels) -> Array:
    """Q − η·triu(T₁ − T₂)·Q for one factor (the triangular `EQ` rule).

    **Arguments:**

    - `q`: the `(n, n)` upper-triangular factor.
    - `e_terms`: the statistics `(T₁, T₂)` as `(n, n)` matrices.
    - `eta`: the normalised step, a real scalar.
    - `use_kernels`: `False` (reference), `True` (kernel on GPU/TPU, reference on CPU),
        `"auto"` (kernel on GPU where measured faster), `"interpret"` (the kernel in the
        Pallas interpreter on any platform: tests).

    **Returns:** the updated factor.
    """
    t1, t2 = e_terms

    def reference(q, t1, t2, eta):
        return q - eta * (jnp.triu(t1 - t2) @ q)

    # the kernels are real-valued and take f32/bf16
    if use_kernels is False or jnp.iscomplexobj(q) or q.dtype not in (jnp.float32, jnp.bfloat16):
        return reference(q, t1, t2, eta)
    if use_kernels == "interpret":
        return kernels.eq_factor_update(q, t1, t2, eta, interpret=True)
    n = q.shape[-1]
    on_gpu = use_kernels is True or kernels.should_use_kernel("eq_factor_update", n, 1, "gpu")
    on_tpu = use_kernels is True

    def gpu(q, t1, t2, eta):
        return kernels.eq_factor_update(q, t1, t2, eta, backend="gpu")

    def tpu(q, t1, t2, eta):
        return kernels.eq_factor_update(q, t1, t2, eta, backend="tpu")

    if not (on_gpu or on_tpu):
        return reference(q, t1, t2, eta)
    branches = {}
    if on_gpu:
        branches["cuda"] = gpu
    if on_tpu:
        branches["tpu"] = tpu
    return jax.lax.platform_dependent(q, t1, t2, eta, default=reference, **branches)


def _solve_upper_h(q, b):
    return jsl.solve_triangular(q, b, trans="C", lower=False)


@jax.custom_jvp
def solve_upper_h(q: Array, b: Array) -> Array:
    """Q⁻ᴴ·B for an upper-triangular `(n, n)` Q and an `(n, m)` or `(n,)` B.

    Batched (under `vmap`: stacked layers, blocks, buckets) it is one batched triangular
    solve on GPU/TPU but a sequential `lax.map` of unbatched solves on CPU: jaxlib's CPU
    solver splits a batch over the intra-op thread pool and blocks a pool thread until the
    pieces finish, so a few independent batched solves running at once (XLA runs
    independent ops of a step concurrently) can take every pool thread and wait on each
    other forever. Seen with jax 0.10.2 on 2 cores: four (4, 128, 128) solves in one jit.

    Differentiable in both arguments (the tangent is a plain solve, which reverse mode can
    transpose; `custom_vmap` alone supports forward mode only).

    **Arguments:**

    - `q`: the upper-triangular factor.
    - `b`: the right-hand side(s).

    **Returns:** the solution, shaped like `b`.
    """
    return _solve_by_platform(q, b)


@solve_upper_h.defjvp
def _solve_upper_h_jvp(primals, tangents):
    q, b = primals
    dq, db = tangents
    x = _solve_by_platform(q, b)
    # d(Q⁻ᴴB) = Q⁻ᴴ(dB − dQᴴ·Q⁻ᴴB), with dQ upper triangular like the solver's reading of Q
    dq = jnp.triu(dq)
    return x, _solve_upper_h(q, db - jnp.conj(jnp.swapaxes(dq, -1, -2)) @ x)


@custom_vmap
def _solve_by_platform(q, b):
    return _solve_upper_h(q, b)


@_solve_by_platform.def_vmap
def _solve_by_platform_vmap(axis_size, in_batched, q, b):
    q_batched, b_batched = in_batched
    if not q_batched:
        q = jnp.broadcast_to(q, (axis_size, *q.shape))
    if not b_batched:
        b = jnp.broadcast_to(b, (axis_size, *b.shape))

    def sequential(q, b):  # each trip calls the unbatched op (or, nested, its own rule)
        return jax.lax.map(lambda qb: _solve_by_platform(*qb), (q, b))

    def batched(q, b):  # the plain solve: vmapping `_solve_by_platform` here would recurse
        return jax.vmap(_solve_upper_h)(q, b)

    return jax.lax.platform_dependent(q, b, cpu=sequential, default=batched), True
