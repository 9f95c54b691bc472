import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray, Shaped

from .._geometry import GEOMETRIES, GeometrySpec
from .._norms import Normaliser
from .._numerics import all_finite


def keep_if_finite(
    new: "AbstractPrecond", old: "AbstractPrecond", *inputs: Array | None
) -> "AbstractPrecond":
    """`new` if all its arrays and all `inputs` (the fit pair) are finite, else `old`.

    A step on non-finite inputs, or on overflowing statistics (1e30 gradients square to inf
    in f32), is skipped as a whole rather than poisoning Q and L; checking the inputs too
    catches parts of a structure that guard themselves (XMat's middle element).
    """
    leaves = [x for x in jax.tree.leaves(new) if hasattr(x, "dtype")]
    leaves += [x for x in inputs if x is not None]
    ok = jnp.all(jnp.stack([all_finite(x) for x in leaves])) if leaves else jnp.array(True)
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def check_shape(name: str, want: tuple[int, ...], got: tuple[int, ...]) -> None:
    if tuple(want) != tuple(got):
        raise ValueError(f"`{name}` expects shape {tuple(want)}; got {tuple(got)}.")


def check_fit_pair(name: str, want: tuple[int, ...], v: Array | None, h: Array) -> None:
    """Both members of the fit pair must have the parameter's shape."""
    check_shape(f"{name}(h=...)", want, h.shape)
    if v is not None:
        check_shape(f"{name}(v=...)", want, v.shape)


def batched_update(inner, v, h, keys, mapper, **kwargs):
    """`inner.update` for each index of a leading batch axis (stacked layers, blocks).

    `mapper(fn, *xs)` maps `fn` over that axis (`vmap`, or `lax.map` in batches); each
    index gets its own key, and `v = None` (whitening) stays `None` inside.
    """

    def one(q, vv, hh, k):
        return q.update(vv, hh, key=k, **kwargs)

    if v is None:
        return mapper(lambda q, hh, k: one(q, None, hh, k), inner, h, keys)
    return mapper(one, inner, v, h, keys)


def as_shape(shape: tuple[int, ...] | int) -> tuple[int, ...]:
    """A parameter shape from a shape or, for the flat structures, a number of elements."""
    return (int(shape),) if isinstance(shape, int) else tuple(int(n) for n in shape)


def flat_size(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


class AbstractPrecond(eqx.Module):
    """A PSGD preconditioner P = QᴴQ, as a pure-data pytree.

    Subclasses are final: arrays are fields, trace-invariant configuration (which axes are
    dense, the geometry) is static. `apply` returns P·g; `update` returns a *new*
    preconditioner after one Lie-group fitting step on a pair (v, h). Both work under
    `jax.jit` and `jax.vmap` (one preconditioner per stacked layer).

    `update` is written once here: it checks the fit pair and then calls the structure's
    `_fit`. Whether it also skips non-finite steps is the class-level switch
    `_guards_finite`: the composites (`StackedQ`, `BlockedQ`, `AffineQ`) leave it to the
    `update` of their inner preconditioners, so a non-finite layer or block is skipped on
    its own while the others still move.
    """

    shape: eqx.AbstractVar[tuple[int, ...]]
    _guards_finite: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def apply(self, g: Shaped[Array, "..."]) -> Shaped[Array, "..."]:
        """Precondition a gradient-shaped array.

        **Arguments:**

        - `g`: an array with the parameter's shape.

        **Returns:** P·g, with the dtype of `g`.
        """

    def update(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser | None = None,
        balance_probability: float | ArrayLike = 0.01,
    ) -> "AbstractPrecond":
        """One fitting step of Q on the pair (v, h).

        Per factor the statistics (T₁, T₂) are formed by contracting all other axes (see
        the geometry table in the docs), normalised by the factor's Lipschitz estimate L,
        and the factor moves by its geometry's rule. A step whose result, or whose fit
        pair, is non-finite (e.g. statistics overflowing on 1e30 gradients) is skipped:
        the old factors and L are kept (per layer or block for the stacked, blocked and
        affine structures).

        **Arguments:**

        - `v`: the probe vector, or `None` for whitening with v integrated out (T₂ = c·I).
            Structures that need v explicitly (`needs_v`) raise if it is `None`.
        - `h`: the damped gradient/momentum (whitening) or Hessian-vector product (Newton),
            with the parameter's shape.
        - `lr`: the preconditioner learning rate μ (normalised: μ ≤ 1 is safe).
        - `key`: randomness for norm bounds and factor balancing.
        - `normaliser`: the step-size normaliser (Lipschitz EMA and norm bound);
            `None` = `Normaliser()`.
        - `balance_probability`: probability of rebalancing the factors' dynamic ranges
            (structures with one factor ignore it).

        **Returns:** the updated preconditioner (same structure, dtypes and static config).
        """
        normaliser = Normaliser() if normaliser is None else normaliser
        name = type(self).__name__
        if v is None and self.needs_v:
            raise ValueError(
                f"`{name}.update` needs the probe `v` explicitly: its fit has no form with "
                "v integrated out (T₂ = c·I); pass the sampled probe."
            )
        check_fit_pair(f"{name}.update", self.shape, v, h)
        new = self._fit(v, h, lr=lr, key=key, normaliser=normaliser,
                        balance_probability=balance_probability)
        if not self._guards_finite:
            return new
        return keep_if_finite(new, self, h, v)

    @abc.abstractmethod
    def _fit(
        self,
        v: Shaped[Array, "..."] | None,
        h: Shaped[Array, "..."],
        *,
        lr: ArrayLike,
        key: PRNGKeyArray,
        normaliser: Normaliser,
        balance_probability: float | ArrayLike,
    ) -> "AbstractPrecond":
        """The structure's fitting step behind `update`, on an already checked pair
        (`v` is `None` only if `needs_v` is false); `update` adds the finite guard."""

    # -- the fit form (see `_fit.py`): structures that are permutations of each other are
    # fitted as one. The defaults say "no other form".

    def _fit_form(self) -> "AbstractPrecond":
        """This preconditioner in its canonical fit layout (`self` when it has no other)."""
        return self

    def _fit_input(self, x: Array) -> Array:
        """A fit input (h or v, the parameter's shape) in the layout of `_fit_form`."""
        return x

    def _from_fit_form(self, fitted: "AbstractPrecond") -> "AbstractPrecond":
        """`fitted` (the fit of `_fit_form()`) back in this preconditioner's layout."""
        return fitted

    @property
    @abc.abstractmethod
    def needs_v(self) -> bool:
        """Whether `update` needs the probe v even for whitening."""

    @abc.abstractmethod
    def rescale(self, scale: ArrayLike) -> "AbstractPrecond":
        """Return the preconditioner with Q multiplied by `scale` (so P by `scale²`).

        **Arguments:**

        - `scale`: a positive scalar.

        **Returns:** the rescaled preconditioner.
        """

    @abc.abstractmethod
    def as_matrix(self) -> Shaped[Array, "n n"]:
        """P as a dense matrix over the row-major flattened parameter (for tests and
        small problems only).

        **Returns:** an `(N, N)` array, N the parameter's size.
        """

    @property
    def state_bytes(self) -> int:
        """Bytes of preconditioner state (every array field)."""
        leaves = [x for x in jax.tree.leaves(self) if hasattr(x, "dtype")]
        return int(sum(x.size * x.dtype.itemsize for x in leaves))


class AbstractGeometryPrecond(AbstractPrecond):
    """A preconditioner fitted by one of the Lie-group geometries of
    [`psgd_eqx.GEOMETRIES`][] (`KronQ`, `DiagQ`, `DenseQ`, `XMatQ`, and `AffineQ` through
    its `KronQ`): whether it needs v is the geometry's."""

    geometry: eqx.AbstractVar[str]

    def __check_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(
                f"`{type(self).__name__}(geometry=...)` unknown geometry {self.geometry!r}."
            )

    @property
    def needs_v(self) -> bool:
        return GeometrySpec(self.geometry).needs_v
