"""The fit target: how the (v, h) pair handed to a preconditioner update is made.

Whitening fits P to the gradient (or momentum) x: h = x + damping noise, v the noise
direction (integrated out by every geometry except EQ). Newton fitting takes (v, Hv) from
the caller (`Hvp=`, `vector=` extra args) and damps h the same way; `hessian_helper`
computes such a pair (exact forward-over-reverse, or a finite difference).
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, PRNGKeyArray, PyTree

from . import _rng
from ._eager import is_traced
from ._misc import concrete
from ._numerics import compute_dtype, real_dtype


def damped_probe(
    key: PRNGKeyArray,
    x: Array,
    damping: float | ArrayLike = 1e-9,
    v: Array | None = None,
) -> tuple[Array, Array]:
    """Return `(v, h)` with `h = x + (δ + eps·|x|) ⊙ v`, in single precision or wider.

    The noise is computed in the compute dtype (f32, or f64 for f64 inputs) whatever the
    dtype of `x` (bf16's eps = 7.8e-3 would swamp the signal), and `eps` is that dtype's
    machine epsilon.

    **Arguments:**

    - `key`: randomness for v when it is not given.
    - `x`: the gradient, momentum or Hessian-vector product to fit on.
    - `damping`: the absolute damping δ (the reference's 1e-9).
    - `v`: the probe vector for Newton fitting; `None` draws v ~ N(0, I) (complex normal
        for complex `x`).

    **Returns:** `(v, h)`, both in the compute dtype (f32/c64, or f64/c128 for f64 params).
    """
    dtype = compute_dtype(x.dtype)
    x = x.astype(dtype)
    noise = _rng.normal(key, x.shape, dtype)
    eps = jnp.finfo(real_dtype(dtype)).eps
    delta = jnp.asarray(damping, real_dtype(dtype))
    scale = (delta + eps * jnp.abs(x)).astype(dtype)
    h = x + scale * noise
    if v is None:
        return noise, h
    return v.astype(dtype), h


def _normal_like(key: PRNGKeyArray, tree: PyTree[Array]) -> PyTree[Array]:
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def finite_difference_delta(params: PyTree[Array]) -> float:
    """δ = √eps of the least precise floating dtype among `params` (the reference's rule).

    **Arguments:**

    - `params`: the parameters.

    **Returns:** δ as a Python float.
    """
    eps = [float(jnp.finfo(x.dtype).eps) for x in jax.tree.leaves(params)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
    return max(eps, default=float(jnp.finfo(jnp.float32).eps)) ** 0.5


def hessian_helper(
    key: PRNGKeyArray,
    loss_fn: Callable[..., Any],
    params: PyTree[Array],
    loss_fn_extra_args: tuple = (),
    has_aux: bool = False,
    preconditioner_update_probability: float | ArrayLike | Callable = 1.0,
    *,
    train_step: int | ArrayLike | None = None,
    hvp_method: str = "exact",
    fd_delta: float | None = None,
) -> tuple[Any, PyTree[Array], PyTree[Array], PyTree[Array], Bool[Array, ""]]:
    """Loss, gradient and (on refit steps) a Hessian-vector product, as `jax.value_and_grad`.

    The drop-in replacement of psgd_jax's `hessian_helper`. With probability
    `preconditioner_update_probability` it draws v ~ N(0, I) and computes Hv by
    forward-over-reverse (`jax.jvp` of the gradient; one extra forward+backward), or by the
    finite difference (∇f(θ + δv) − ∇f(θ))/δ; otherwise only the gradient is computed
    (inside a `lax.cond`, so the skipped work is not paid) and Hv, v are zeros.

    **Arguments:**

    - `key`: randomness for the refit draw and for v.
    - `loss_fn`: `loss_fn(params, *loss_fn_extra_args)` → scalar loss, or `(loss, aux)`
        with `has_aux=True`.
    - `params`: the parameters (any pytree of float arrays).
    - `loss_fn_extra_args`: extra positional arguments of `loss_fn`.
    - `has_aux`: whether `loss_fn` returns `(loss, aux)`.
    - `preconditioner_update_probability`: probability of computing Hv this step; a
        number, or a schedule of `train_step`.
    - `train_step`: the step count (psgd_jax passes it); steps 0 and 1 always compute Hv
        so the preconditioner is initialised from a real pair. `None`: no such rule.
    - `hvp_method`: `"exact"` (jvp of grad) or `"finite_difference"` (for losses without
        second derivatives, e.g. through `lax.stop_gradient`ed or custom-VJP code).
    - `fd_delta`: δ for finite differences; default √eps of the params' dtype.

    **Returns:** `(loss_out, grad, hvp, vector, update_preconditioner)`: pass the last
    three to the optimizer as `update(grad, state, params, Hvp=hvp, vector=vector,
    update_preconditioner=update_preconditioner)`.
    """
    if hvp_method not in ("exact", "finite_difference"):
        raise ValueError(
            f"`hvp_method` must be 'exact' or 'finite_difference'; got {hvp_method!r}."
        )
    if fd_delta is not None and not fd_delta > 0:
        raise ValueError(f"`fd_delta` must be > 0; got {fd_delta!r}.")
    if not callable(preconditioner_update_probability):
        p = concrete(preconditioner_update_probability)
        if p is not None and not 0.0 <= float(p) <= 1.0:
            raise ValueError(
                f"`preconditioner_update_probability` must be in [0, 1]; got {p!r}."
            )

    args = (key, loss_fn, params, loss_fn_extra_args, has_aux,
            preconditioner_update_probability, train_step, hvp_method, fd_delta)
    if is_traced((key, params, loss_fn_extra_args, preconditioner_update_probability,
                  train_step)):
        return _hessian_helper(*args)
    # Eager call (no surrounding jit): one compiled function per loss_fn and input
    # shapes; a Python-int step count is traced so it does not recompile every step.
    if train_step is not None and not isinstance(train_step, jax.Array):
        train_step = jnp.asarray(train_step, jnp.int32)
    if isinstance(preconditioner_update_probability, float | int):
        preconditioner_update_probability = jnp.asarray(preconditioner_update_probability,
                                                        jnp.float32)
    return _hessian_helper_jit(key, loss_fn, params, loss_fn_extra_args, has_aux,
                               preconditioner_update_probability, train_step, hvp_method,
                               fd_delta)


def _hessian_helper(key, loss_fn, params, loss_fn_extra_args, has_aux,
                    preconditioner_update_probability, train_step, hvp_method, fd_delta):
    """The body of [`psgd_eqx.hessian_helper`][] (inputs already checked)."""
    def obj(p):
        return loss_fn(p, *loss_fn_extra_args)

    value_and_grad = jax.value_and_grad(obj, has_aux=has_aux)

    def grad_fn(p):
        loss_out, grad = value_and_grad(p)
        return grad, loss_out

    k_vec, k_draw = jax.random.split(key)
    delta = finite_difference_delta(params) if fd_delta is None else float(fd_delta)

    def with_hvp(p):
        vector = _normal_like(k_vec, p)
        if hvp_method == "exact":
            grad, hvp, loss_out = jax.jvp(grad_fn, (p,), (vector,), has_aux=True)
        else:
            grad, loss_out = grad_fn(p)
            shifted = jax.tree.map(lambda x, v: x + (delta * v).astype(x.dtype), p, vector)
            grad2, _ = grad_fn(shifted)
            hvp = jax.tree.map(
                lambda a, b: ((b.astype(jnp.float32) - a.astype(jnp.float32)) / delta).astype(
                    a.dtype
                ),
                grad,
                grad2,
            )
        return loss_out, grad, hvp, vector

    def without_hvp(p):
        grad, loss_out = grad_fn(p)
        zeros = jax.tree.map(jnp.zeros_like, p)
        return loss_out, grad, zeros, zeros

    if callable(preconditioner_update_probability):
        if train_step is None:
            raise ValueError("a schedule `preconditioner_update_probability` needs `train_step`.")
        prob = preconditioner_update_probability(train_step)
    else:
        prob = preconditioner_update_probability
    update = jax.random.uniform(k_draw) < jnp.asarray(prob).astype(jnp.float32)
    if train_step is not None:
        update = update | (jnp.asarray(train_step) < 2)
    loss_out, grad, hvp, vector = jax.lax.cond(update, with_hvp, without_hvp, params)
    return loss_out, grad, hvp, vector, update


_hessian_helper_jit = eqx.filter_jit(_hessian_helper)
