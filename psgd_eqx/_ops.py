"""Dispatch of the hot ops: the Pallas kernel on GPU/TPU where it pays, the jnp reference
elsewhere.

The choice of platform is made by `jax.lax.platform_dependent`, i.e. when the step is
lowered for a device, not from `jax.default_backend()` at trace time: one jitted step
compiled for a CPU runs the reference and the same step compiled for a GPU runs the kernel.
Which sizes get a kernel under `"auto"` comes from measurements
(`psgd_eqx_kernels.should_use_kernel`, `benchmarks/RESULTS.md`): on an H100 only the fused
`EQ` update beats XLA, and only for large factors, so that is the only op `"auto"` dispatches
so far. (The fused refit and apply, one launch per stack, are dispatched by `psgd_eqx._fused`
under `use_kernels=True`.)
"""

import functools

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


def _eq_reference(q, t1, t2, eta):
    # batched over leading axes (a stack arrives here whole, see `_eq_dispatch`)
    eta = jnp.asarray(eta)
    return q - eta[..., None, None].astype(q.dtype) * (jnp.triu(t1 - t2) @ q)


@functools.cache
def _eq_dispatch(use_kernels, batch: int):
    """The `EQ` step for `batch` stacked factors (arrays with `batch`'s axes in front),
    dispatched by platform and measured thresholds for that stack size.

    Stack-aware: under `vmap` (a scanned stack, a bucket of leaves, blocks) the
    `custom_vmap` rule hands the whole stack to the dispatch of `batch · axis_size`, so
    the decision sees the stack it runs on (nested `vmap`s multiply) and the kernel gets
    the stack as one launch. A `custom_jvp` outside keeps it differentiable in both modes
    (the tangent is the reference's; `custom_vmap` alone supports forward mode only).
    """

    @jax.custom_jvp
    def step(q, t1, t2, eta):
        return stacked(q, t1, t2, eta)

    @step.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(_eq_reference, primals, tangents)

    @custom_vmap
    def stacked(q, t1, t2, eta):
        return _eq_by_platform(q, t1, t2, eta, use_kernels, batch)

    @stacked.def_vmap
    def _rule(axis_size, in_batched, q, t1, t2, eta):
        args = [x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
                for x, b in zip((q, t1, t2, eta), in_batched)]
        return _eq_dispatch(use_kernels, batch * axis_size)(*args), True

    return step


def _eq_by_platform(q, t1, t2, eta, use_kernels, batch: int):
    n = q.shape[-1]
    on_gpu = use_kernels is True or kernels.should_use_kernel("eq_factor_update", n, batch,
                                                              "gpu")
    on_tpu = use_kernels is True
    if not (on_gpu or on_tpu):
        return _eq_reference(q, t1, t2, eta)

    def flat(backend):  # the kernel takes one stack axis: the whole stack is one launch
        def run(q, t1, t2, eta):
            lead = q.shape[:-2]
            if len(lead) <= 1:
                return kernels.eq_factor_update(q, t1, t2, eta, backend=backend)
            mats = [x.reshape(-1, n, n) for x in (q, t1, t2)]
            out = kernels.eq_factor_update(*mats, eta.reshape(-1), backend=backend)
            return out.reshape(q.shape)
        return run

    gpu, tpu = flat("gpu"), flat("tpu")
    branches = {}
    if on_gpu:
        branches["cuda"] = gpu
    if on_tpu:
        branches["tpu"] = tpu
    return jax.lax.platform_dependent(q, t1, t2, eta, default=_eq_reference, **branches)


def eq_triangular_step(q: Array, e_terms: tuple[Array, Array], eta: Array, use_kernels) -> Array:
    """Q − η·triu(T₁ − T₂)·Q for one factor (the triangular `EQ` rule).

    **Arguments:**

    - `q`: the `(n, n)` upper-triangular factor.
    - `e_terms`: the statistics `(T₁, T₂)` as `(n, n)` matrices.
    - `eta`: the normalised step, a real scalar.
    - `use_kernels`: `False` (reference), `True` (kernel on GPU/TPU, reference on CPU),
        `"auto"` (kernel on GPU where measured faster for the stack size it runs on: see
        `_eq_dispatch`), `"interpret"` (the kernel in the Pallas interpreter on any
        platform: tests).

    **Returns:** the updated factor.
    """
    t1, t2 = e_terms
    # the kernels are real-valued and take f32/bf16
    if use_kernels is False or jnp.iscomplexobj(q) or q.dtype not in (jnp.float32, jnp.bfloat16):
        return _eq_reference(q, t1, t2, eta)
    if use_kernels == "interpret":
        return kernels.eq_factor_update(q, t1, t2, eta, interpret=True)
    return _eq_dispatch(use_kernels, 1)(q, t1, t2, jnp.asarray(eta))


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
