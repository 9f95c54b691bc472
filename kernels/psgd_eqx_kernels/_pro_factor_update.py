"""`pro_factor_update`: the `PRO` step of a dense factor, Q ← Q − η(TQ − cQ), then one
Procrustes step, for a stack of factors.

The rule of `psgd_eqx._geometry.dense_step("PRO", …)` with T₂ = c·I (whitening with v
integrated out) followed by `procrustes_step`:

    Q₁ = (1 + ηc) Q − η T Q
    R  = Q₁ᵀ − Q₁,  R̂ = R / (‖R‖ + tiny)          (‖R‖ a spectral-norm lower bound)
    a  = min(−tr(R̂Q₁) / tr(R̂²Q₁), max_step)  if tr(R̂²Q₁) < 0, else max_step
    Q' = Q₁ + a (R̂Q₁ + a/2 · R̂²Q₁)

as three Pallas launches: (1) the product TQ with the axpy fused, (2) RQ₁, (3) R(RQ₁) with
the final combination fused; the norm bound of R and the two traces (O(n²), they need every
tile) are jnp between the launches. With σ = 1/(‖R‖ + tiny) and α = aσ the last step is
Q₁ + α RQ₁ + α²/2 R²Q₁, so R is never rescaled.

Not dispatched by `psgd_eqx`'s optimizers yet (the `PRO` geometry always runs its jnp
step: on an H100 this kernel was slower than XLA, see `should_use_kernel`); callable
directly.

Layout: the norm bound, the pure-jnp `pro_factor_update_reference`, the jitted Pallas
wrapper, the `custom_jvp` with the reference's tangent, and the public function.
"""

import dataclasses
import functools as ft
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from . import _matmul
from ._blocks import BlockSizes, check_backend, check_dtype, default_block_sizes, padded_dim
from ._matmul import ProductSpec


_F32 = jnp.float32
_TILES = (("block_m", "block_k"), ("block_k", "block_n"), ("block_m", "block_n"))
PROCRUSTES_MAX_STEP = 1.0 / 8.0


def one_step_norm_bound(a: Float[Array, "n n"], key: Any = None) -> Float[Array, ""]:
    """A lower bound of ‖a‖₂ for a normal matrix: one power step from its largest row.

    psgd_jax's bound (`psgd_eqx.Normaliser(bound="one_step")`), deterministic (`key` is
    unused), with the max-abs of `a` factored out first so squares cannot overflow.
    """
    del key
    a = a.astype(_F32)
    scale = jnp.max(jnp.abs(a))
    safe = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    a = a / safe
    tiny = jnp.finfo(_F32).smallest_normal
    j = jnp.argmax(jnp.sum(a * a, axis=-1))
    y = a[j] @ a
    ya = y @ a
    lb = jnp.sqrt(jnp.sum(ya * ya)) / (jnp.sqrt(jnp.sum(y * y)) + tiny)
    return jnp.where(scale > 0, scale * lb, jnp.zeros_like(scale))


def _check(q, t, c, eta) -> None:
    if q.ndim not in (2, 3) or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"`q` must be (n, n) or (batch, n, n); got shape {q.shape}.")
    if t.shape != q.shape:
        raise ValueError(f"`t` must have the shape of `q` {q.shape}; got {t.shape}.")
    for x, name in ((c, "c"), (eta, "eta")):
        if jnp.shape(x) != q.shape[:-2]:
            raise ValueError(f"`{name}` must have shape {q.shape[:-2]}; got {jnp.shape(x)}.")


def _bound_fn(norm_bound):
    return one_step_norm_bound if norm_bound is None else norm_bound


def _batched_bound(norm_bound, r, key):
    fn = _bound_fn(norm_bound)
    if key is None:
        return jax.vmap(lambda x: fn(x, None))(r).astype(_F32)
    return jax.vmap(fn)(r, key).astype(_F32)


def _step_size(tr_rq, tr_rrq, s, max_step):
    """a·σ from the unnormalised traces, as `procrustes_step` computes a on R̂ = σR."""
    sigma = 1.0 / (s + jnp.finfo(_F32).smallest_normal)
    t1, t2 = sigma * tr_rq, sigma * sigma * tr_rrq
    safe = jnp.where(t2 < 0, t2, -jnp.ones_like(t2))
    a = jnp.where(t2 < 0, jnp.minimum(-t1 / safe, max_step), max_step)
    return a * sigma


def _trace_of_product(x, y):
    """tr(x y) per matrix of a stack."""
    return jnp.einsum("...ij,...ji->...", x, y)


def pro_factor_update_reference(
    q: Float[Array, "*batch n n"],
    t: Float[Array, "*batch n n"],
    c: Float[ArrayLike, "*batch"],
    eta: Float[ArrayLike, "*batch"],
    key: Any = None,
    *,
    norm_bound: Callable | None = None,
    max_step: float = PROCRUSTES_MAX_STEP,
    precision: Any = None,
) -> Float[Array, "*batch n n"]:
    """Pure-jnp semantics of [`pro_factor_update`][psgd_eqx_kernels.pro_factor_update]:
    `dense_step("PRO")` followed by `procrustes_step`, written as in `psgd_eqx._geometry`
    (R normalised before the products), in float32, returned in `q`'s dtype."""
    c, eta = jnp.asarray(c), jnp.asarray(eta)
    _check(q, t, c, eta)

    def mm(a, b):
        return jnp.matmul(a, b, precision=precision, preferred_element_type=_F32)

    qf, tf = q.astype(_F32), t.astype(_F32)
    eta_ = eta.astype(_F32)[..., None, None]
    q1 = qf - eta_ * (mm(tf, qf) - c.astype(_F32)[..., None, None] * qf)
    r = jnp.swapaxes(q1, -1, -2) - q1
    batched = q.ndim == 3
    rb = r if batched else r[None]
    kb = key if (batched or key is None) else key[None]
    s = _batched_bound(norm_bound, rb, kb)
    s = s if batched else s[0]
    r = r / (s + jnp.finfo(_F32).smallest_normal)[..., None, None]
    rq = mm(r, q1)
    rrq = mm(r, rq)
    tr_rq = jnp.trace(rq, axis1=-2, axis2=-1)
    tr_rrq = jnp.trace(rrq, axis1=-2, axis2=-1)
    safe = jnp.where(tr_rrq < 0, tr_rrq, -jnp.ones_like(tr_rrq))
    a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / safe, max_step), max_step)
    a = a[..., None, None]
    return (q1 + a * (rq + 0.5 * a * rrq)).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class _Config:
    norm_bound: Callable | None
    max_step: float
    block_sizes: BlockSizes | None
    backend: str
    interpret: Any
    precision: Any


@ft.partial(jax.jit, static_argnames=("cfg",))
def _forward(q, t, c, eta, key, cfg: _Config):
    unbatched = q.ndim == 2
    if unbatched:
        q, t, c, eta = q[None], t[None], c[None], eta[None]
        key = None if key is None else key[None]
    nb, n, _ = q.shape
    blocks = cfg.block_sizes or default_block_sizes(cfg.backend, q.dtype, n, nb)
    blocks.validate(cfg.backend, _TILES)
    npad = padded_dim(blocks, cfg.backend, n, ("block_m", "block_n", "block_k"))
    pad = ((0, 0), (0, npad - n), (0, npad - n))
    qp, tp = (jnp.pad(x.astype(_F32), pad) if npad > n else x.astype(_F32) for x in (q, t))
    eta, c = eta.astype(_F32), c.astype(_F32)
    zero = jnp.zeros((nb,), _F32)
    one = jnp.ones((nb,), _F32)
    common = dict(blocks=blocks, backend=cfg.backend, interpret=cfg.interpret,
                  precision=cfg.precision, out_dtype=_F32)

    # (1) Q₁ = (1 + ηc) Q − η T Q
    coef1 = jnp.stack([1.0 + eta * c, zero, -eta, zero], axis=-1)
    q1 = _matmul.product(tp, qp, xs=(qp,), coef=coef1,
                         spec=ProductSpec(n_extra=1, has_coef=True), name="pro_step", **common)
    # R and its norm bound (on the unpadded matrices: the bound may draw n-sized randoms)
    r = jnp.swapaxes(q1, -1, -2) - q1
    s = _batched_bound(cfg.norm_bound, r[:, :n, :n], key)
    # (2) R Q₁
    rq = _matmul.product(r, q1, spec=ProductSpec(), name="pro_rq", **common)
    tr_rq = _trace_of_product(r, q1)
    tr_rrq = _trace_of_product(r, rq)
    alpha = _step_size(tr_rq, tr_rrq, s, cfg.max_step)
    # (3) Q₁ + α R Q₁ + α²/2 R (R Q₁)
    coef3 = jnp.stack([one, alpha, 0.5 * alpha * alpha, zero], axis=-1)
    common["out_dtype"] = q.dtype
    out = _matmul.product(r, rq, xs=(q1, rq), coef=coef3,
                          spec=ProductSpec(n_extra=2, has_coef=True), name="pro_procrustes",
                          **common)
    out = out[:, :n, :n]
    return out[0] if unbatched else out


@ft.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _pro_factor_update(q, t, c, eta, key, cfg: _Config):
    return _forward(q, t, c, eta, key, cfg)


@_pro_factor_update.defjvp
def _pro_factor_update_jvp(cfg, primals, tangents):
    q, t, c, eta, key = primals
    out = _pro_factor_update(q, t, c, eta, key, cfg)
    ref = ft.partial(pro_factor_update_reference, key=key, norm_bound=cfg.norm_bound,
                     max_step=cfg.max_step, precision=cfg.precision)
    _, t_out = jax.jvp(ref, (q, t, c, eta), tangents[:4])
    return out, t_out


def pro_factor_update(
    q: Float[Array, "*batch n n"],
    t: Float[Array, "*batch n n"],
    c: Float[ArrayLike, "*batch"],
    eta: Float[ArrayLike, "*batch"],
    key: Any = None,
    *,
    norm_bound: Callable | None = None,
    max_step: float = PROCRUSTES_MAX_STEP,
    block_sizes: BlockSizes | None = None,
    backend: str = "gpu",
    interpret: Any = False,
    precision: Any = None,
) -> Float[Array, "*batch n n"]:
    """One `PRO` step of (a stack of) dense factors: Q − η(TQ − cQ), then one Procrustes step.

    Exactly `psgd_eqx._geometry.dense_step("PRO", q, t, c, eta, key, normaliser)` when
    `norm_bound=normaliser.norm_lower_bound`. Not dispatched by `psgd_eqx`'s optimizers
    yet (on an H100 it was slower than XLA); callable directly.

    **Arguments:**

    - `q`: the factor(s), `(n, n)` or `(batch, n, n)`; float32 or bfloat16.
    - `t`: the statistic T₁, same shape.
    - `c`: the scalar T₂ = c·I per factor, shape `()` or `(batch,)`.
    - `eta`: the normalised step per factor, same shape as `c`.
    - `key`: PRNG key(s) for `norm_bound`, shape `()` or `(batch,)`; `None` when the bound
        is deterministic.
    - `norm_bound`: `(r, key) -> scalar`, a spectral-norm lower bound of one n×n matrix
        (hashable: a function or `Normaliser(...).norm_lower_bound`); `None` =
        [`one_step_norm_bound`][psgd_eqx_kernels.one_step_norm_bound].
    - `max_step`: the largest Procrustes rotation step (1/8 as in `psgd_eqx`).
    - `block_sizes`: tiles; `None` picks
        [`default_block_sizes`][psgd_eqx_kernels.default_block_sizes].
    - `backend`: `"gpu"` (Pallas Triton) or `"tpu"` (Mosaic TPU).
    - `interpret`: `False` (compiled), `True` (Pallas interpreter) or
        `pltpu.InterpretParams()` (TPU-semantics interpreter).
    - `precision`: `jax.lax.Precision` of the products (`None` = TF32 on GPU for float32).

    **Returns:** the updated factor(s), in `q`'s dtype (computed in float32).

    Differentiable: the tangent is that of
    [`pro_factor_update_reference`][psgd_eqx_kernels.pro_factor_update_reference].
    """
    check_backend(backend)
    for x, name in ((q, "q"), (t, "t")):
        check_dtype(name, x.dtype)
    c, eta = jnp.asarray(c, _F32), jnp.asarray(eta, _F32)
    _check(q, t, c, eta)
    if norm_bound is not None and key is None:
        raise ValueError("`key` is required when `norm_bound` is given.")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"`block_sizes` must be a BlockSizes or None; got {block_sizes!r}.")
    if block_sizes is not None:
        block_sizes.validate(backend, _TILES)
    cfg = _Config(norm_bound, float(max_step), block_sizes, backend, interpret, precision)
    return _pro_factor_update(q, t, c, eta, key, cfg)
