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
import psgd_eqx_kernels as kernels
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
