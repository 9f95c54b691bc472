"""Is the preconditioner healthy? Per-parameter figures, computed on device.

Two kinds of figure:

- read from the preconditioners when asked ([`psgd_eqx.diagnostics`][]): each factor's
  Lipschitz estimate L and a cheap conditioning figure, and the refit count;
- measured during `update`, only with `track_diagnostics=True` (three scalars per leaf,
  one per layer of a scanned stack, kept in `PSGDState.diagnostics`): the RMS of P·m
  before clipping, whether the clip changed it, and the fit residual.

The fit residual ρ is a one-sample test of the fit criterion that needs only P·x, so it
is the same for every structure. The whitening fit makes P·E[xxᴴ]·P = I, hence
E‖P·x‖² = n at the fit: ρ = log(‖P·x‖² / n) (the trace of "Contract(Px, Px)/c − I").
A Newton fit wants P·h = v for h = H·v: ρ = log(‖P·h‖² / ‖v‖²). ρ = 0 means fitted;
ρ > 0, P too large for the current inputs or misaligned with them (a rotated Hessian
raises E‖P·x‖² above n); ρ < 0, too small (gradients have grown since the last refits).
It is measured on the step's fit input with the preconditioner *before* this step's
refit, so it says how stale P was, which is what the adaptive refit schedule
(`_adaptive.py`) reads. An all-zero input has ρ = 0 (nothing to fit).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._numerics import abs2, safe_rms
from ._precond.affine import AffineQ
from ._precond.base import AbstractPrecond
from ._precond.blocked import BlockedQ
from ._precond.dense import DenseQ
from ._precond.diag import DiagQ
from ._precond.kron import KronQ
from ._precond.lra import LRAQ
from ._precond.stacked import StackedQ
from ._precond.xmat import XMatQ


class Tracked(eqx.Module):
    """What `update` measures per leaf with `track_diagnostics=True` (each a scalar, or
    one value per layer of a scanned stack).

    **Fields:**

    - `update_rms`: RMS of P·m before clipping.
    - `clipped`: whether the clip changed P·m.
    - `fit_residual`: ρ of this step's fit input (see the module docstring); 0 for leaves
        without a preconditioner of their own.
    """

    update_rms: Float[Array, "*layers"]
    clipped: Bool[Array, "*layers"]
    fit_residual: Float[Array, "*layers"]


class LeafDiagnostics(eqx.Module):
    """The health figures of one parameter's preconditioner.

    **Fields:**

    - `refits`: number of refits so far (the refit decision is shared by every leaf).
    - `lipschitz`: per factor (in the structure's order), its Lipschitz estimate L, the
        normaliser of its fitting step: it follows the scale of the fit statistics, so a
        steady L means a settled fit and L jumping by decades means the inputs did.
    - `conditioning`: per factor, max|dᵢ| / min|dᵢ| over its diagonal (a diagonal factor's
        entries, a triangular factor's eigenvalues, a dense factor's diagonal as a cheap
        proxy); for a stored-P geometry (`PRO4P`, `QUAD4P`) the square root, so it is
        always the figure of Q. Healthy: up to ~1e3–1e4 in f32; near 1/eps (≈ 1e7) the
        factor has lost precision.
    - `factor_names`: what each factor is (e.g. `"axis 0 (64, dense)"`).
    - `update_rms`, `clipped`, `fit_residual`: the last `update`'s figures
        (see [`psgd_eqx.PSGDState`][]), or `None` without `track_diagnostics=True`.
    - `staleness`: with [`psgd_eqx.adaptive_refit_schedule`][], the mean |log| of the
        smoothed fit energies (0 = fitted in scale and shape; the schedule refits at its
        ceiling from `tolerance` up), else `None`.

    A parameter of a scanned stack has one value per layer in every field but `refits`;
    blocks of a [`psgd_eqx.BlockedQ`][] report their worst block.
    """

    refits: Int[Array, ""]
    lipschitz: tuple[Float[Array, "*layers"], ...]
    conditioning: tuple[Float[Array, "*layers"], ...]
    factor_names: tuple[str, ...] = eqx.field(static=True)
    update_rms: Float[Array, "*layers"] | None = None
    clipped: Bool[Array, "*layers"] | None = None
    fit_residual: Float[Array, "*layers"] | None = None
    staleness: Float[Array, "*layers"] | None = None


# -- measured during `update` ----------------------------------------------------------


def init_tracked(params, precond):
    """`PSGDState.diagnostics` at `init`: zeros per leaf (per layer of a scanned stack)."""
    def one(p, q):
        shape = (q.shape[0],) if isinstance(q, StackedQ) else ()
        return Tracked(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, bool),
                       jnp.zeros(shape, jnp.float32))

    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [one(p, q) for p, q in
                                        zip(leaves, treedef.flatten_up_to(precond))])


def _per_layer(q, fn, *xs):
    """`fn(*xs)` per leaf, or per layer of a scanned stack."""
    return jax.vmap(fn)(*xs) if isinstance(q, StackedQ) else fn(*xs)


def update_figures(q, before: Array, after: Array) -> tuple[Array, Array]:
    """`(RMS of P·m before clipping (f32), whether the clip changed it)` of one leaf."""
    def one(b, a):
        return safe_rms(b).astype(jnp.float32), jnp.any(b != a)
    if before.size == 0:
        return jnp.zeros((), jnp.float32), jnp.zeros((), bool)
    return _per_layer(q, one, before, after)


def _energy_along(u2: Array, r2: Array | None, axis: int) -> Array:
    """Per index of `axis`: Σ|P·x|² over the other axes, over its value at the fit (their
    number of elements for whitening, Σ|v|² for a Newton fit)."""
    others = tuple(a for a in range(u2.ndim) if a != axis)
    if r2 is None:
        return jnp.mean(u2, axis=others)
    tiny = jnp.finfo(jnp.float32).tiny
    return jnp.maximum(jnp.sum(u2, axis=others), tiny) / jnp.maximum(
        jnp.sum(r2, axis=others), tiny)


def fit_stats(q, x: Array, v: Array | None) -> tuple[Array, tuple[Array, ...]]:
    """The fit figures of one leaf's input `x` (and Newton probe `v`; `None` = whitening)
    under `q`, each 1 in expectation at the fit:

    - the ratio ‖P·x‖² / n (whitening) or ‖P·h‖² / ‖v‖² (Newton, `x` = h): its log is the
      fit residual ρ (see the module docstring);
    - per axis of the leaf, per index along it, the same ratio of the slice's energies
      (the diagonal of Contract(P·x, P·x)/c, which is I at a whitening fit). Unlike the
      ratio these see a wrong *shape* of P, e.g. one row scaled wrongly.

    A scanned stack has one value per layer. A leaf without a preconditioner, or with an
    empty input, gives `(1, ())`; an all-zero input gives ones (nothing to fit).
    """
    if not isinstance(q, AbstractPrecond) or x.size == 0:
        return jnp.ones((), jnp.float32), ()

    def one(qq, xx, vv):
        u2 = abs2(qq.apply(xx)).astype(jnp.float32)
        r2 = None if vv is None else abs2(vv).astype(jnp.float32)
        if u2.ndim == 0:
            u2, r2 = u2.reshape(1), None if r2 is None else r2.reshape(1)
        tiny = jnp.finfo(jnp.float32).tiny
        ref = jnp.asarray(u2.size, jnp.float32) if r2 is None else jnp.sum(r2)
        ratio = jnp.maximum(jnp.sum(u2), tiny) / jnp.maximum(ref, tiny)
        energies = tuple(_energy_along(u2, r2, a) for a in range(u2.ndim))
        live = jnp.any(xx != 0)
        return (jnp.where(live, ratio, 1.0),
                tuple(jnp.where(live, e, 1.0) for e in energies))

    if isinstance(q, StackedQ):
        return jax.vmap(one)(q.inner, x, v)
    return one(q, x, v)


# -- read from the preconditioners -----------------------------------------------------


def _ratio(factor: Array, stores_p: bool) -> Float[Array, ""]:
    d = jnp.diagonal(factor) if factor.ndim == 2 else factor.reshape(-1)
    a = jnp.abs(d).astype(jnp.float32)
    hi, lo = jnp.max(a), jnp.min(a)
    r = hi / jnp.maximum(lo, jnp.finfo(jnp.float32).tiny)
    return jnp.sqrt(r) if stores_p else r


def _stores_p(q) -> bool:
    return getattr(q, "geometry", None) in ("PRO4P", "QUAD4P")


def _factors(q) -> list[tuple[str, Array | None, Array]]:
    """`(name, factor or None (no conditioning figure), L)` of one (unbatched) structure."""
    if isinstance(q, KronQ):
        shape = q.axes_shape
        return [(f"axis {i} ({n}, {'dense' if d else 'diagonal'})", f, q.lipschitz[i])
                for i, (n, d, f) in enumerate(zip(shape, q.dense, q.factors))]
    if isinstance(q, AffineQ):
        return _factors(q.kron)
    if isinstance(q, (DenseQ, DiagQ)):
        return [("Q", q.q if isinstance(q, DenseQ) else q.d, q.lipschitz)]
    if isinstance(q, LRAQ):
        return [("U", None, q.lipschitz[0]), ("V", None, q.lipschitz[1]),
                ("d", q.d, q.lipschitz[2])]
    if isinstance(q, XMatQ):
        d = jnp.concatenate([q.blocks[:, 0, 0], q.blocks[:, 1, 1]])
        return [("X", d, q.lipschitz)]
    return []  # a user-defined structure: nothing known about its fields


def _summary(q) -> tuple[tuple[str, ...], list[Array], list[Array]]:
    """Names, L and conditioning per factor of one (unstacked) structure."""
    if isinstance(q, BlockedQ):
        names, lips, conds = (), [], []
        for j, group in enumerate(q.groups):  # each group is a stack of same-shape blocks
            sub_names, sub_lips, sub_conds = _batched_summary(group)
            names += tuple(f"block shape {j}: {s}" for s in sub_names)
            lips += [jnp.max(x) for x in sub_lips]  # the worst block
            conds += [jnp.max(x) for x in sub_conds]
        return names, lips, conds
    entries = _factors(q)
    stores_p = _stores_p(q.kron if isinstance(q, AffineQ) else q)
    names = tuple(name for name, _, _ in entries)
    lips = [jnp.asarray(lip, jnp.float32) for _, _, lip in entries]
    conds = [jnp.full((), jnp.nan, jnp.float32) if f is None else _ratio(f, stores_p)
             for _, f, _ in entries]
    return names, lips, conds


def _batched_summary(batched) -> tuple[tuple[str, ...], list[Array], list[Array]]:
    """`_summary` of a structure whose arrays carry a leading stack axis."""
    names = []

    def one(g):
        n, lips, conds = _summary(g)
        names.append(n)  # static: the same at every trace
        return lips, conds

    lips, conds = jax.vmap(one)(batched)
    return names[0], lips, conds


def leaf_diagnostics(q, refits: Array, tracked: Tracked | None,
                     staleness: Array | None = None) -> LeafDiagnostics | None:
    """The [`LeafDiagnostics`][psgd_eqx.LeafDiagnostics] of one leaf's preconditioner."""
    if not isinstance(q, AbstractPrecond):
        return None
    if isinstance(q, StackedQ):
        names, lips, conds = _batched_summary(q.inner)
    else:
        names, lips, conds = _summary(q)
    extra = {} if tracked is None else dict(
        update_rms=tracked.update_rms, clipped=tracked.clipped,
        fit_residual=tracked.fit_residual)
    return LeafDiagnostics(refits, tuple(lips), tuple(conds), tuple(names), **extra,
                           staleness=staleness)
