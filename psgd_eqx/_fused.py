"""Dispatch of the fused Pallas kernels: the whole refit of a dense factor, and the apply
P·G of a matrix `KronQ`, each as one launch per stack of same-shape factors.

The kernels (`psgd_eqx_kernels.fused_factor_refit`, `fused_kron_apply`) keep a factor
resident on chip for the whole chain of small dependent ops that XLA would launch one by
one: the statistic T₁ = y yᴴ from the preconditioned probe, the norm bound ℓ, the
Lipschitz update, the geometry step and PRO's Procrustes step. Under `jax.vmap` (a bucket
of same-shape leaves, a scanned stack, blocks) a `custom_vmap` rule hands the whole stack to
one launch, and the decision sees the size of that stack (nested `vmap`s multiply).

When the kernels run:

- `use_kernels=False`: never.
- `"auto"` (the default): on a GPU only where `psgd_eqx_kernels.should_use_kernel` has a
    measurement saying the kernel is faster for that n and stack size. None has been
    measured for the fused kernels yet, so `"auto"` leaves the optimizer's graph exactly
    as it is without them (not even the dispatch wrappers are traced).
- `True`: on GPU and TPU wherever the operands fit on chip
    (`fused_refit_fits`/`fused_apply_fits`); the reference elsewhere (CPU).
- `"interpret"`: the kernels in the Pallas interpreter on any platform (tests).

The platform is chosen by `jax.lax.platform_dependent` when the step is lowered, as in
`psgd_eqx._ops`. The reference branch is the optimizer's own jnp code, passed in by the
caller, so a CPU run with `use_kernels=True` computes exactly what `False` computes.
"""

import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import psgd_eqx_kernels as kernels
from jax.custom_batching import custom_vmap
from jaxtyping import Array

from . import _rng
from ._norms import Normaliser


FUSED_REFIT_GEOMETRIES = ("PRO", "EQ", "QUAD")
_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Gram(eqx.Module):
    """A dense factor's statistic T = y yᴴ kept as y, `(n, m)`: the factor's axis first,
    every other axis flattened. The fused refit forms T on chip; every other path calls
    `matrix()`."""

    y: Array

    def matrix(self) -> Array:
        """y yᴴ as an `(n, n)` matrix."""
        return self.y @ jnp.conj(self.y).T


def _measured(op: str) -> bool:
    """Whether any measurement says the kernel `op` beats XLA somewhere."""
    return any(v is not None for v in kernels.KERNEL_MIN_N.get(op, {}).values())


def enabled(op: str, use_kernels) -> bool:
    """Whether the fused kernel `op` may be dispatched at all under `use_kernels` (a static
    decision: `False` means the caller traces its plain jnp code and nothing else)."""
    if use_kernels is False:
        return False
    if use_kernels is True or use_kernels == "interpret":
        return True
    return _measured(op)


def refit_applies(geometry: str, dtype, use_kernels) -> bool:
    """Whether a dense factor of this geometry and compute dtype goes to the fused refit."""
    return (
        geometry in FUSED_REFIT_GEOMETRIES
        and jnp.dtype(dtype) in _KERNEL_DTYPES
        and enabled("fused_factor_refit", use_kernels)
    )


# -- the fused refit -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RefitConfig:
    """Static configuration of one fused refit call site (hashable: it keys the cache)."""

    geometry: str
    normaliser: Normaliser
    use_kernels: bool | str
    gram: bool  # t1 is the probe y (T₁ = y yᴴ formed in the kernel), not T₁ itself
    # the optimizer's jnp path: (geometry, q, t1, t2, old_l, lr, key, normaliser,
    # use_kernels) -> (q, L); a module-level function, so the config stays hashable
    reference: Callable


def _lead(x: Array, core: int) -> tuple[int, ...]:
    return x.shape[: x.ndim - core]


def _vmap_lead(fn: Callable, count: int) -> Callable:
    for _ in range(count):
        fn = jax.vmap(fn)
    return fn


def _reference(cfg: RefitConfig, q, t1, t2, old_l, lr, key):
    """The optimizer's own path, batched over the leading (stack) axes."""

    def one(q, t1, t2, old_l, lr, key):
        t1 = Gram(t1).matrix() if cfg.gram else t1
        return cfg.reference(cfg.geometry, q, t1, t2, old_l, lr, key, cfg.normaliser,
                             cfg.use_kernels)

    return _vmap_lead(one, q.ndim - 2)(q, t1, t2, old_l, lr, key)


def _starts(cfg: RefitConfig, key: Array, n: int):
    """The random subspace starts of the two norm bounds, drawn from exactly the keys that
    `fit_factor` and `procrustes_step` use, so kernel and reference see the same draws."""
    if cfg.normaliser.bound != "subspace":
        return None, None
    k_ell, k_step = _rng.split(key)
    k = min(cfg.normaliser.k, n)
    start_ell = _rng.normal(k_ell, (k, n), jnp.float32)
    start_r = _rng.normal(k_step, (k, n), jnp.float32) if cfg.geometry == "PRO" else None
    return start_ell, start_r


def _kernel(cfg: RefitConfig, backend: str, interpret):
    def run(q, t1, t2, old_l, lr, key):
        lead = _lead(q, 2)
        n = q.shape[-1]
        flat = (-1,)
        q2 = q.reshape(flat + q.shape[-2:])
        s1 = t1.reshape(flat + t1.shape[-2:])
        s2 = t2.reshape(flat + t2.shape[len(lead):])
        starts = jax.vmap(lambda k: _starts(cfg, k, n))(key.reshape(-1, key.shape[-1]))
        stat = {"y": s1} if cfg.gram else {"t1": s1}
        new_q, new_l = kernels.fused_factor_refit(
            q2, s2, old_l.reshape(-1).astype(jnp.float32),
            jnp.broadcast_to(lr, lead).reshape(-1).astype(jnp.float32),
            start_ell=starts[0], start_r=starts[1], geometry=cfg.geometry,
            beta=cfg.normaliser.beta, bound=cfg.normaliser.bound,
            half_iters=cfg.normaliser.half_iters, backend=backend, interpret=interpret,
            **stat,
        )
        return new_q.reshape(q.shape).astype(q.dtype), new_l.reshape(lead).astype(old_l.dtype)

    return run


def _fits(cfg: RefitConfig, q, t1, backend: str) -> bool:
    n = q.shape[-1]
    m = t1.shape[-1] if cfg.gram else None
    return kernels.fused_refit_fits(n, m, min(cfg.normaliser.k, n), backend, q.dtype)


def _refit_by_platform(cfg: RefitConfig, batch: int, q, t1, t2, old_l, lr, key):
    if cfg.use_kernels == "interpret":
        return _kernel(cfg, "gpu", True)(q, t1, t2, old_l, lr, key)
    n = q.shape[-1]
    branches = {}
    gpu_ok = cfg.use_kernels is True or kernels.should_use_kernel(
        "fused_factor_refit", n, batch, "gpu")
    if gpu_ok and _fits(cfg, q, t1, "gpu"):
        branches["cuda"] = _kernel(cfg, "gpu", False)
    if cfg.use_kernels is True and _fits(cfg, q, t1, "tpu"):
        branches["tpu"] = _kernel(cfg, "tpu", False)
    reference = functools.partial(_reference, cfg)
    if not branches:
        return reference(q, t1, t2, old_l, lr, key)
    return jax.lax.platform_dependent(q, t1, t2, old_l, lr, key, default=reference,
                                      **branches)


@functools.cache
def _refit_dispatch(cfg: RefitConfig, batch: int):
    """The refit of `batch` stacked factors (see `psgd_eqx._ops._eq_dispatch` for the
    pattern: `custom_vmap` sees the stack, `custom_jvp` keeps it differentiable)."""

    @jax.custom_jvp
    def run(q, t1, t2, old_l, lr, key):
        return stacked(q, t1, t2, old_l, lr, key)

    @run.defjvp
    def _jvp(primals, tangents):
        key = primals[-1]
        ref = lambda *a: _reference(cfg, *a, key)
        return jax.jvp(ref, primals[:-1], tangents[:-1])

    @custom_vmap
    def stacked(q, t1, t2, old_l, lr, key):
        return _refit_by_platform(cfg, batch, q, t1, t2, old_l, lr, key)

    @stacked.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [x if b else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
                for x, b in zip(args, in_batched)]
        return _refit_dispatch(cfg, batch * axis_size)(*args), (True, True)

    return run


def fused_fit_factor(cfg: RefitConfig, q, t1, t2, old_l, lr, key):
    """One dense factor's refit through the fused kernel where `cfg.use_kernels` and the
    platform allow, else through `cfg.reference`. `t1` is a matrix, or the probe y of a
    `Gram` when `cfg.gram`; `t2` a scalar c (c·I) or a matrix.

    **Returns:** `(new factor, new L)`, as `fit_factor`.
    """
    lr = jnp.asarray(lr, old_l.dtype)
    return _refit_dispatch(cfg, 1)(q, t1, jnp.asarray(t2), old_l, lr, key)


# -- the fused apply -----------------------------------------------------------------------


def apply_applies(dtypes, use_kernels) -> bool:
    """Whether a matrix `KronQ` whose factors and gradient have these dtypes goes to the
    fused apply."""
    return (all(jnp.dtype(d) in _KERNEL_DTYPES for d in dtypes)
            and enabled("fused_kron_apply", use_kernels))


@dataclasses.dataclass(frozen=True)
class ApplyConfig:
    """Static configuration of one fused apply call site."""

    kinds: tuple[str, str]  # per side: "dense" (Q), "cached" (P) or "diag"
    diag_is_p: bool  # the stored-P geometries: a diagonal factor is P's diagonal itself
    use_kernels: bool | str
    # the optimizer's jnp path: (kinds, diag_is_p, left, right, x) -> P·x, module-level
    reference: Callable


def _apply_reference(cfg: ApplyConfig, left, right, x):
    one = lambda l, r, x: cfg.reference(cfg.kinds, cfg.diag_is_p, l, r, x)
    return _vmap_lead(one, x.ndim - 2)(left, right, x)


def _apply_kernel(cfg: ApplyConfig, backend: str, interpret):
    def run(left, right, x):
        lead = _lead(x, 2)
        sides = []
        for kind, f in zip(cfg.kinds, (left, right)):
            core = 1 if kind == "diag" else 2
            sides.append((kind, f.reshape((-1,) + f.shape[f.ndim - core:])))
        out = kernels.fused_kron_apply(x.reshape((-1,) + x.shape[-2:]), *sides,
                                       diag_is_p=cfg.diag_is_p, backend=backend,
                                       interpret=interpret)
        return out.reshape(lead + x.shape[-2:])

    return run


def _apply_by_platform(cfg: ApplyConfig, batch: int, left, right, x):
    if cfg.use_kernels == "interpret":
        return _apply_kernel(cfg, "gpu", True)(left, right, x)
    m, n = x.shape[-2:]
    fits = lambda backend: kernels.fused_apply_fits(m, n, *cfg.kinds, backend, x.dtype)
    branches = {}
    gpu_ok = cfg.use_kernels is True or kernels.should_use_kernel(
        "fused_kron_apply", max(m, n), batch, "gpu")
    if gpu_ok and fits("gpu"):
        branches["cuda"] = _apply_kernel(cfg, "gpu", False)
    if cfg.use_kernels is True and fits("tpu"):
        branches["tpu"] = _apply_kernel(cfg, "tpu", False)
    reference = functools.partial(_apply_reference, cfg)
    if not branches:
        return reference(left, right, x)
    return jax.lax.platform_dependent(left, right, x, default=reference, **branches)


@functools.cache
def _apply_dispatch(cfg: ApplyConfig, batch: int):
    """P·x for `batch` stacked matrices (the `custom_vmap` + `custom_jvp` pattern above)."""

    @jax.custom_jvp
    def run(left, right, x):
        return stacked(left, right, x)

    @run.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(functools.partial(_apply_reference, cfg), primals, tangents)

    @custom_vmap
    def stacked(left, right, x):
        return _apply_by_platform(cfg, batch, left, right, x)

    @stacked.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = [a if b else jnp.broadcast_to(a, (axis_size, *jnp.shape(a)))
                for a, b in zip(args, in_batched)]
        return _apply_dispatch(cfg, batch * axis_size)(*args), True

    return run


def fused_apply(cfg: ApplyConfig, left: Array, right: Array, x: Array) -> Array:
    """P·x of a matrix `KronQ` through the fused kernel where `cfg.use_kernels` and the
    platform allow, else through `cfg.reference`.

    **Arguments:**

    - `cfg`: the call site's configuration.
    - `left`, `right`: per side the factor Q (`"dense"`), the cached or stored P
        (`"cached"`), or the diagonal vector (`"diag"`).
    - `x`: the `(m, n)` gradient, in the apply's compute dtype.

    **Returns:** P·x, shaped and typed like `x`.
    """
    return _apply_dispatch(cfg, 1)(left, right, x)
