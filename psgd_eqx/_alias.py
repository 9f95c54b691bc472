"""The generic `psgd` optimizer and the one-structure aliases `xmat`, `lra`, `dense`,
`affine`, `diag` (psgd_jax's optimizers and the reference's `DenseNewton`).

Each alias is `psgd(lr, structure)` for a fixed structure rule; its signature is built from
the option lists in `_options.py` (its own options, `psgd`'s, `scale_by_psgd`'s with the
alias's defaults, and psgd_jax's legacy names), so `optax.inject_hyperparams` and `help()`
see every keyword.
"""

import inspect
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax

from ._eager import eager_cached
from ._geometry import canonical_geometry
from ._misc import as_key, concrete
from ._numerics import storage_dtype
from ._options import (
    GEOMETRY_DOC,
    TRANSFORM,
    Option,
    Options,
    at_least_zero,
    boolean,
    dtype_or_none,
    integer,
    interval,
    names,
    nonneg_number,
    replace_defaults,
    takes,
)
from ._precond import LRAQ, AffineQ, DenseQ, DiagQ, XMatQ
from ._shapes import affine_dense_sides
from ._transform import GLOBAL, scale_by_psgd
from ._weight_decay import with_lr_and_decay


# psgd_jax's names for the same settings (xmat / low_rank_approximation / affine).
_RENAMED = {"precond_lr": "preconditioner_lr", "precond_init_scale": "preconditioner_init_scale",
            "seed": "key"}
# psgd_jax options we implement differently: accepted at their psgd_jax default only.
_FIXED_LEGACY = {"step_normalizer_order": "2nd", "precision": "tensorfloat32"}
_TRANSFORM_DEFAULTS = {o.name: o.default for o in TRANSFORM}
_TRANSFORM_CHECKS = {o.name: o.check for o in TRANSFORM}


def _is_default(name: str, value) -> bool:
    """Whether `value` is `scale_by_psgd`'s default for `name` (also as an f32 array, the
    form `optax.inject_hyperparams` gives it)."""
    default = _TRANSFORM_DEFAULTS[name]
    if value is None or default is None or isinstance(value, (str, bool)):
        return value is default or value == default
    value = concrete(value)
    if value is None:  # traced (inject_hyperparams inside jit): checked at init already
        return True
    try:
        return bool(np.isclose(value, default, rtol=1e-6))
    except TypeError:
        return False


def _legacy_kwargs(kwargs: dict) -> dict:
    """Map psgd_jax argument names onto ours; reject settings we cannot honour.

    A legacy name set to `None` counts as absent (its default in the aliases' signatures,
    which `optax.inject_hyperparams` passes explicitly).
    """
    out = dict(kwargs)
    for old, new in _RENAMED.items():
        if old in out:
            value = out.pop(old)
            if value is None:
                continue
            if new in out and not _is_default(new, out[new]):
                raise ValueError(f"pass only one of `{old}` and `{new}`.")
            out[new] = value
    if out.get("nesterov", False) is None:  # psgd_jax's default
        out["nesterov"] = False
    for name, ok in _FIXED_LEGACY.items():
        if name in out:
            value = out.pop(name)
            if value is not None and value != ok:
                raise ValueError(
                    f"`{name}={value!r}` is not supported (psgd_eqx always uses the "
                    f"equivalent of {ok!r}: a Lipschitz-normalised step in ≥ f32)."
                )
    return out


_PSGD_OPTIONS = (
    Option("weight_decay", 0.0, "decoupled (lr-scaled) weight decay, as `optax.adamw`.",
           at_least_zero),
    Option("weight_decay_mask", None, "a pytree of bools or a callable, as `optax.adamw`."),
    Option("update_global_norm_clip", None,
           "clip the preconditioned update's global norm to this (psgd_jax's option; "
           "`None` = off): selects the `\"global_norm\"` `update_clip_style`.",
           interval(0.0, float("inf"), lo_open=True, optional=True)),
)
def _renamed_check(new: str):
    """The check of the option `new`, for its legacy name: `None` (not given) passes, and
    the message names both."""
    check = _TRANSFORM_CHECKS[new]

    def legacy(name, value):
        if value is None:
            return
        try:
            check(name, value)
        except ValueError as e:
            raise ValueError(f"{e} (`{name}` is psgd_jax's name for `{new}`.)") from None

    return legacy


_LEGACY = tuple(
    Option(n, None, f"psgd_jax's name for `{new}`.", _renamed_check(new))
    for n, new in _RENAMED.items()
) + tuple(
    Option(n, None, f"psgd_jax's option, accepted only at its default {v!r}.")
    for n, v in _FIXED_LEGACY.items()
) + (
    # psgd_jax's slot for it (default None = off), so its signature is unchanged
    Option("nesterov", None, "Nesterov momentum (`None` or `False`: off), as psgd_jax's "
           "option; see [`psgd_eqx.scale_by_psgd`][].", boolean(optional=True)),
    Option("mask", None, "psgd_jax's name for `weight_decay_mask`."),
)
# the aliases take `nesterov` in psgd_jax's slot (in `_LEGACY`), not in the transform's,
# and `update_global_norm_clip` in the slot of `_PSGD_OPTIONS`
_ALIAS_TRANSFORM = tuple(t for t in TRANSFORM
                         if t.name not in ("nesterov", "update_global_norm_clip"))
_PSGD_LEADING = (
    inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                      annotation=optax.ScalarOrSchedule),
    inspect.Parameter("structure", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("global_structure", inspect.Parameter.KEYWORD_ONLY, default=None),
)


@takes((*_PSGD_OPTIONS, *_ALIAS_TRANSFORM, *_LEGACY), leading=_PSGD_LEADING)
@eager_cached
def psgd(o: Options) -> optax.GradientTransformationExtraArgs:
    """The generic PSGD optimizer: your own preconditioner structure per leaf.

    `optax.chain(scale_by_psgd(structure, ...), [add_decayed_weights],
    scale_by_learning_rate(learning_rate))`; `update_global_norm_clip` selects
    `scale_by_psgd`'s `"global_norm"` clip style.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule.
    - `structure`: `structure(path, leaf)` → a preconditioner, `None` (plain momentum) or
        [`psgd_eqx.GLOBAL`][]; see [`psgd_eqx.scale_by_psgd`][].
    - `global_structure`: `global_structure(n, dtype)` → the global group's
        preconditioner.
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.

    !!! Example

        ```python
        def structure(path, leaf):
            name = jax.tree_util.keystr(path)
            if "embed" in name:
                return psgd_eqx.DiagQ.init(leaf.shape)
            if leaf.ndim == 2:
                return psgd_eqx.KronQ.init(leaf.shape)
            return psgd_eqx.GLOBAL  # everything else shares one dense Q

        opt = psgd_eqx.psgd(1e-3, structure,
                            global_structure=lambda n, dt: psgd_eqx.DenseQ.init(n, dt))
        ```
    """
    at_least_zero("learning_rate", o.learning_rate)  # a leading parameter, not an Option
    mask = o.weight_decay_mask
    if o.mask is not None:
        if mask is not None:
            raise ValueError("pass only one of `mask` and `weight_decay_mask`.")
        mask = o.mask
    kwargs = _legacy_kwargs({k: o[k] for k in (*names(TRANSFORM), *_RENAMED, *_FIXED_LEGACY)})
    if o.update_global_norm_clip is not None:  # psgd_jax's switch for the global-norm clip
        if kwargs["update_clip_style"] == "soft":
            raise ValueError("`update_global_norm_clip` selects the \"global_norm\" clip "
                             "style; it cannot be combined with `update_clip_style='soft'`.")
        kwargs["update_clip_style"] = "global_norm"
    scale = scale_by_psgd(o.structure, global_structure=o.global_structure, **kwargs)
    return with_lr_and_decay(scale, o.learning_rate, o.weight_decay, mask)


# -- the one-structure aliases ---------------------------------------------------------

_PER_LEAF = Option("per_leaf", False,
                   "one preconditioner per leaf instead of one over all leaves.", boolean())
_PRECOND_DTYPE = Option("precond_dtype", None,
                        "storage dtype (default f32, or the params' if wider or complex).",
                        dtype_or_none)
# psgd_jax's (affine) and the reference's (dense) default: no update clipping.
_NO_CLIP = dict(grad_clip_max_amp=None, grad_clip_max_element=None)


def _geometry(default: str) -> Option:
    return Option("geometry", default, GEOMETRY_DOC,
                  lambda name, value: canonical_geometry(value))


def _alias(own: Sequence[Option], lr: float, clip: dict, legacy: Sequence[Option] = ()):
    """The signature of a one-structure alias: `(learning_rate, *, own, psgd's options,
    scale_by_psgd's options with `clip` defaults, legacy names)`."""
    lr_param = inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                 default=lr, annotation=optax.ScalarOrSchedule)
    options = (*own, *_PSGD_OPTIONS, *replace_defaults(_ALIAS_TRANSFORM, **clip), *_LEGACY,
               *legacy)
    return takes(options, leading=(lr_param,))


def _build(o: Options, make: Callable, per_leaf: bool) -> optax.GradientTransformationExtraArgs:
    """`psgd(o.learning_rate, structure, **options)` where `structure` is
    `make(shape, dtype, path)` per leaf, or `make((n,), dtype, None)` over all leaves
    (`per_leaf=False`)."""

    def structure(path, p):
        return make(p.shape, storage_dtype(p.dtype, o.precond_dtype), path) if per_leaf \
            else GLOBAL

    def global_structure(n, dtype):
        return make((n,), storage_dtype(dtype, o.precond_dtype), None)

    passed = names((*_PSGD_OPTIONS, *_ALIAS_TRANSFORM, *_LEGACY))
    return psgd(o.learning_rate, structure, global_structure=global_structure,
                **{k: o[k] for k in passed})


# psgd_jax's unclipped xmat and LRA diverge to NaN at their default lr 0.01 on the 2-D
# Rosenbrock function from (0, 0) (optax's contrib battery); with kron's clipping (RMS 2,
# element 10) both converge there, and on the quadratics nothing changes.
_CLIP = {}


@_alias((_geometry("EQ"), _PER_LEAF, _PRECOND_DTYPE), 0.01, _CLIP)
@eager_cached
def xmat(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with the X-shaped preconditioner [`psgd_eqx.XMatQ`][] (psgd_jax's `xmat`).

    One global X-matrix over all parameters (memory 2n), or one per leaf. Unlike psgd_jax,
    the update is clipped by default (RMS 2, element 10, as `kron`): unclipped, the default
    lr diverges on the Rosenbrock function.

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`; pass `Hvp=`, `vector=`,
    `update_preconditioner=` to `update` for Newton fitting (see
    [`psgd_eqx.hessian_helper`][]).
    """
    geometry = canonical_geometry(o.geometry)
    return _build(o, lambda shape, dt, _: XMatQ.init(shape, dt, geometry=geometry), o.per_leaf)


_RANK = Option("rank", 10,
               "r of Q = (I + UVᵀ)diag(d) (psgd_jax's `uvd_rank_of_approximation`, also "
               "accepted); memory n·(2r + 1). Capped at n − 1 for small parameters.",
               integer(0), static=True)
_UVD = Option("uvd_rank_of_approximation", None, "psgd_jax's name for `rank`.",
              integer(0, optional=True))


@_alias((_RANK, _PER_LEAF, _PRECOND_DTYPE), 0.01, _CLIP, legacy=(_UVD,))
@eager_cached
def lra(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with the low-rank-approximation preconditioner [`psgd_eqx.LRAQ`][]
    (psgd_jax's `low_rank_approximation`, the reference's `LRAWhiten`/`LRANewton`).

    The update is clipped by default (RMS 2, element 10, as `kron`; psgd_jax's unclipped
    default diverges on the Rosenbrock function).

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    rank = o.rank if o.uvd_rank_of_approximation is None else o.uvd_rank_of_approximation
    rank = int(concrete(rank))
    seed = o.key if o.seed is None else o.seed

    def make(shape, dt, path):
        n = int(np.prod(shape))
        # U's random start: from the optimizer's key (a separate stream from the probes,
        # which split the same key), distinct per leaf by its path, so every `init` of one
        # optimizer draws the same U (the global group's Q is number 0).
        index = 0 if path is None else zlib.crc32(jax.tree_util.keystr(path).encode()) >> 1
        k = jax.random.fold_in(jax.random.fold_in(as_key(seed), 0x4C5241), index)
        return LRAQ.init(shape, dt, rank=min(rank, max(n - 1, 0)), key=k)

    return _build(o, make, o.per_leaf)


_MAX_SIZE = Option("max_size", 32768,
                   "the largest n for which a Q is built (n² floats: 4 GiB in f32 at the "
                   "default); `init` raises `ValueError` beyond it rather than allocating.",
                   integer(1), static=True)


@_alias((_geometry("PRO"), _PER_LEAF, _PRECOND_DTYPE, _MAX_SIZE), 0.01, _NO_CLIP)
@eager_cached
def dense(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with one dense [`psgd_eqx.DenseQ`][] over all parameters (the reference's
    `DenseNewton`, a BFGS alternative for up to ~10⁴ parameters), or one per leaf.

    Clipping is off by default (the reference's `grad_clip_max_norm=inf`).

    **Arguments:**

    - `learning_rate`: a float or schedule (the reference's 0.01; 1.0 with Newton fitting
        on smooth problems).
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(o.geometry)

    def make(shape, dt, _):
        n = int(np.prod(shape))
        if n > o.max_size:
            raise ValueError(
                f"`dense` would build a {n}×{n} Q ({n * n * np.dtype(dt).itemsize:,} bytes), "
                f"more than `max_size`={o.max_size}; use `lra`, `kron` or `per_leaf=True`, "
                "or raise `max_size`."
            )
        return DenseQ.init(shape, dt, geometry=geometry)

    return _build(o, make, o.per_leaf)


_AFFINE_RULES = (
    Option("max_size_triangular", 4096,
           "a side longer than this is diagonal (psgd_jax's 4096; 0 with "
           "`max_skew_triangular=0` gives an all-diagonal preconditioner).", nonneg_number,
           static=True),
    Option("max_skew_triangular", 128,
           "a side more than this many times longer than the other is diagonal "
           "(psgd_jax's 128).", nonneg_number, static=True),
)


@_alias((*_AFFINE_RULES, _geometry("PRO"), _PRECOND_DTYPE), 0.01, _NO_CLIP)
@eager_cached
def affine(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with an affine (left ⊗ right) preconditioner per leaf, [`psgd_eqx.AffineQ`][]
    (psgd_jax's `affine`).

    **Arguments:**

    - `learning_rate`: a float or schedule (psgd_jax's default 0.01).
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(o.geometry)
    size, skew = o.max_size_triangular, o.max_skew_triangular
    affine_dense_sides((2, 2), size, skew)  # validates
    return _build(o, lambda shape, dt, _: AffineQ.init(
        shape, dt, max_size_triangular=size, max_skew_triangular=skew, geometry=geometry,
    ), True)


@_alias((_geometry("PRO"), _PRECOND_DTYPE), 1e-3, {})
@eager_cached
def diag(o: Options) -> optax.GradientTransformationExtraArgs:
    """PSGD with an element-wise diagonal [`psgd_eqx.DiagQ`][] per leaf: Adam's memory,
    a Lie-group fit of the inverse 4th root of E[g²] instead of an EMA.

    Any geometry but `QUAD`/`QUAD4P` gives the same diagonal step; clipping defaults are
    `kron`'s (RMS 2, element 10).

    **Arguments:**

    - `learning_rate`: a float or schedule (1e-3, as `kron`: whitening gives Adam's scale).
    {options}

    **Returns:** an `optax.GradientTransformationExtraArgs`.
    """
    geometry = canonical_geometry(o.geometry)
    return _build(o, lambda shape, dt, _: DiagQ.init(shape, dt, geometry=geometry), True)
