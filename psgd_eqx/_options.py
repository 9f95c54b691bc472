"""Every option of the optimizers, written once: name, default, check and doc line.

The optimizers' signatures, the "Arguments" lines of their docstrings and the validation of
their inputs are all built from the `Option` records here, so an option's default or
meaning is changed in one place. A function takes a list of options with `@takes(...)`:
calls are bound against the generated signature, every option is checked, and the body
receives one `Options` namespace of plain values.

Options that fix shapes or Python control flow (the structure rules, the norm-bound
subspace size, ...) are marked `static`: their defaults are wrapped in `Static`, which
`optax.inject_hyperparams` does not turn into (traced) arrays, so `jax.jit(opt.init)` of an
injected optimizer reads them concretely. A static option given explicitly to an injected
optimizer must be listed in its `static_args`; traced, it raises a `ValueError` saying so.
"""

import dataclasses
import functools
import inspect
import math
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._adaptive import AdaptiveRefits
from ._geometry import canonical_geometry
from ._misc import check_number, concrete, concrete_or_same, init_int
from ._schedules import precond_update_prob_schedule


class Static:
    """A default value that is configuration, not a hyperparameter.

    It prints as the value itself (so `help()` shows `norm_bound_k=32`) and is unwrapped
    before the optimizer sees it. It is deliberately neither an `int` nor a `float`, which
    is what keeps `optax.inject_hyperparams` from injecting it.
    """

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)

    def __eq__(self, other) -> bool:
        return unwrap(other) == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def unwrap(value):
    """The plain value of a `Static` default; anything else unchanged."""
    return value.value if isinstance(value, Static) else value


Check = Callable[[str, Any], None]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: its name, default, one-line (Markdown) doc and check.

    - `check(name, value)` raises `ValueError` naming the option for a bad value; it is
      skipped for traced values (they cannot be read) except where `static` says the value
      must be concrete.
    - `static`: the option fixes shapes or control flow (see the module docstring).
    """

    name: str
    default: Any
    doc: str
    check: Check | None = None
    static: bool = False
    annotation: Any = None  # None: unannotated (`Parameter.empty` cannot be a default here)


# -- checks ----------------------------------------------------------------------------


def is_real_number(value) -> bool:
    """A real number: a Python or NumPy int or float (not a bool), or a 0-d integer or
    floating array, concrete or traced (what `optax.inject_hyperparams` passes)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    dtype = getattr(value, "dtype", None)
    try:
        real = dtype is not None and (jnp.issubdtype(dtype, jnp.integer)
                                      or jnp.issubdtype(dtype, jnp.floating))
    except TypeError:  # not a NumPy-style dtype
        return False
    return real and jnp.ndim(value) == 0


def require_number(name: str, value, *, schedule: bool = False, integer: bool = False):
    """`ValueError` naming the option unless `value` is a real number (or, with
    `schedule`, a callable of the step count): the one check of an option's type, so a
    string such as `"0.1"` or a bool never reaches a comparison.

    **Arguments:**

    - `name`: the option's name, for the message.
    - `value`: the given value.
    - `schedule`: whether a schedule (a callable) is allowed.
    - `integer`: whether the option is an integer (changes only the message).

    **Returns:** nothing.
    """
    if is_real_number(value) or (schedule and callable(value)):
        return
    kind = "an int" if integer else "a number"
    if schedule:
        kind += " or a schedule"
    raise ValueError(f"`{name}` must be {kind}; got {value!r} ({type(value).__name__}).")


def interval(lo: float, hi: float, lo_open=False, hi_open=False, optional=False,
             schedule=False) -> Check:
    """A number in an interval (or a schedule, when `schedule`); `None` passes when
    `optional`."""

    def check(name, value):
        if value is None and optional:
            return
        require_number(name, value, schedule=schedule)
        check_number(name, value, lo, hi, lo_open, hi_open)

    return check


def integer(minimum: int, optional: bool = False) -> Check:
    def check(name, value):
        if value is None and optional:
            return
        require_number(name, value, integer=True)
        init_int(name, value, minimum)

    return check


def one_of(*choices) -> Check:
    def check(name, value):
        if not any(value is c or (isinstance(c, str) and value == c) for c in choices):
            raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")

    return check


def mesh_axes(name, value) -> None:
    """`None`, a mesh axis name, or a tuple of names."""
    names = (value,) if isinstance(value, str) else value
    if value is None or (isinstance(names, (tuple, list)) and names
                         and all(isinstance(n, str) for n in names)):
        return
    raise ValueError(f"`{name}` must be None, a mesh axis name or a tuple of names; "
                     f"got {value!r}.")


def boolean(optional: bool = False) -> Check:
    def check(name, value):
        if value is None and optional:
            return
        if not isinstance(value, bool):
            raise ValueError(f"`{name}` must be a bool; got {value!r}.")

    return check


def dtype_or_none(name, value):
    if value is None:
        return
    try:
        jnp.dtype(value)
    except TypeError:
        raise ValueError(f"`{name}` must be a dtype or None; got {value!r}.") from None


def key_check(name, value):
    """A PRNG key, or an int seed (also as an integer array: raw key data, or a seed that
    `optax.inject_hyperparams` turned into an array)."""
    dtype = getattr(value, "dtype", None)
    ok = (not isinstance(value, bool) and isinstance(value, (int, np.integer))) or (
        dtype is not None and (jnp.issubdtype(dtype, jax.dtypes.prng_key)
                               or jnp.issubdtype(dtype, jnp.integer)))
    if not ok:
        raise ValueError(f"`{name}` must be a PRNG key or an int seed; got {value!r}.")


def at_least_zero(name, value):
    """A number ≥ 0, or a schedule (a learning rate, a weight decay)."""
    require_number(name, value, schedule=True)
    number = None if callable(value) else concrete(value)
    if number is not None and not number >= 0:
        raise ValueError(f"`{name}` must be >= 0; got {value!r}.")


def nonneg_number(name, value):
    require_number(name, value)
    value = concrete_or_same(value)
    if value is None:
        return
    if not value >= 0:
        raise ValueError(f"`{name}` must be a number >= 0; got {value!r}.")


# -- namespaces and signatures --------------------------------------------------------


class Options(dict):
    """The bound, checked options of one call: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def pick(self, options: Sequence[Option]) -> dict:
        """The values of `options` (as keywords for another function taking them)."""
        return {o.name: self[o.name] for o in options}


def names(options: Sequence[Option]) -> tuple[str, ...]:
    return tuple(o.name for o in options)


def select(options: Sequence[Option], wanted: Sequence[str]) -> tuple[Option, ...]:
    """The options named in `wanted`, in the order of `options`."""
    wanted = set(wanted)
    return tuple(o for o in options if o.name in wanted)


def replace_defaults(options: Sequence[Option], **defaults) -> tuple[Option, ...]:
    """`options` with some defaults changed (an alias's own defaults)."""
    unknown = set(defaults) - set(names(options))
    assert not unknown, unknown
    return tuple(
        dataclasses.replace(o, default=defaults[o.name]) if o.name in defaults else o
        for o in options
    )


def parameter(option: Option, kind) -> inspect.Parameter:
    default = Static(option.default) if option.static else option.default
    annotation = inspect.Parameter.empty if option.annotation is None else option.annotation
    return inspect.Parameter(option.name, kind, default=default, annotation=annotation)


def doc_lines(options: Sequence[Option], width: int = 88) -> str:
    """One wrapped Markdown list item per option (Kidger style: 4-space continuation)."""
    return "\n".join(
        textwrap.fill(f"- `{o.name}`: {o.doc}", width, subsequent_indent="    ",
                      break_long_words=False, break_on_hyphens=False)
        for o in options
    )


def _read(option: Option, value):
    value = unwrap(value)
    if option.static and hasattr(value, "dtype") and concrete(value) is None:
        raise ValueError(
            f"`{option.name}` fixes the optimizer's structure and cannot be traced; with "
            f"`optax.inject_hyperparams`, pass it in `static_args` (or leave its default)."
        )
    if option.static:
        value = concrete_or_same(value)  # a concrete array (inject_hyperparams) as a number
    if option.check is not None:
        option.check(option.name, value)
    return value


def takes(
    options: Sequence[Option],
    *,
    leading: Sequence[inspect.Parameter] = (),
    trailing: Sequence[inspect.Parameter] = (),
    positional: bool = False,
):
    """Give `fn(o: Options)` the signature `(*leading, *options, *trailing)`.

    **Arguments:**

    - `options`: the options, in signature order.
    - `leading`, `trailing`: other parameters (not options: no check, passed as given).
    - `positional`: the options are positional-or-keyword (as `kron`'s, psgd_jax's order)
        instead of keyword-only.

    **Returns:** a decorator. The decorated function's docstring may contain a line
    `{options}`, replaced by one "- `name`: doc" line per option.
    """
    p = inspect.Parameter
    kind = p.POSITIONAL_OR_KEYWORD if positional else p.KEYWORD_ONLY
    params = [*leading, *(parameter(o, kind) for o in options), *trailing]
    sig = inspect.Signature(params)
    by_name = {o.name: o for o in options}

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            values = Options()
            for name, value in bound.arguments.items():
                if name in by_name:
                    value = _read(by_name[name], value)
                elif sig.parameters[name].kind == inspect.Parameter.VAR_KEYWORD:
                    value = {k: unwrap(v) for k, v in value.items()}
                values[name] = unwrap(value)
            return fn(values)

        del wrapper.__wrapped__  # `inspect.signature` must read `__signature__`
        wrapper.__signature__ = sig
        if fn.__doc__ and "{options}" in fn.__doc__:
            indent = fn.__doc__.split("{options}")[0].rsplit("\n", 1)[-1]
            lines = doc_lines(options).replace("\n", "\n" + indent)
            wrapper.__doc__ = fn.__doc__.replace("{options}", lines)
        return wrapper

    return decorate


# -- the lists -------------------------------------------------------------------------
#
# `TRANSFORM`: the options of the generic core `scale_by_psgd` (and, through it, of every
# alias). `KRON`: every option of `kron`, in its (psgd_jax) positional order; `scale_by_kron`,
# `kron_plan` and `get_opt_state_partition_specs` take subsets of it.

_SCHEDULE = "a constant or a schedule of the step count"


def _refit_probability(name, value):
    """A probability in (0, 1], a schedule, or an adaptive refit schedule."""
    if isinstance(value, AdaptiveRefits):
        return
    interval(0.0, 1.0, lo_open=True, schedule=True)(name, value)

TRANSFORM: tuple[Option, ...] = (
    Option("b1", 0.9, "momentum EMA factor (0 disables momentum; no buffer is kept).",
           interval(0.0, 1.0, hi_open=True)),
    Option("momentum_warmup", False,
           "`False` (default): bias-corrected EMA m/(1 − b1ᵗ) as optax; `True`: the "
           "reference's EMA with βₜ = min(t/(t+1), b1) and no correction.", boolean()),
    Option("nesterov", False,
           "Nesterov momentum: precondition b1·m̂ₜ₊₁ + (1 − b1)·ĝₜ (each bias-corrected, "
           "as `optax.adam(nesterov=True)`) instead of m̂ₜ; a look-ahead that usually "
           "damps oscillations. With `whiten_grad=False` the fit sees the same vector.",
           boolean()),
    Option("whiten_grad", True,
           "fit P on the raw gradient (`True`, the reference's default: P·m then shrinks as "
           "gradients vanish) or on the momentum (`False`: a scale-free, sign-like update; "
           "divide lr by √((1+b1)/(1−b1)) when switching).", boolean()),
    Option("preconditioner_update_probability", 1.0,
           f"refit probability, {_SCHEDULE} (see "
           "[`psgd_eqx.precond_update_prob_schedule`][] for psgd_jax's 1 → 0.03 anneal), "
           "or [`psgd_eqx.adaptive_refit_schedule`][] (refit when the fit residual says "
           "the preconditioner has gone stale).", _refit_probability),
    Option("bernoulli_refit", False,
           "`False`: a deterministic accumulator refits whenever the summed probability "
           "reaches 1 (rate exactly p, no variance); `True`: an independent Bernoulli(p) "
           "draw per step. The first step always refits.", boolean()),
    Option("preconditioner_lr", 0.1, f"μ, the preconditioner's learning rate, {_SCHEDULE}.",
           interval(0.0, math.inf, lo_open=True, schedule=True)),
    Option("preconditioner_init_scale", None,
           "`None` = data-driven global scale at the first step: (maxᵢ mean|gᵢ|⁴ + δ⁴)^(−1/8) "
           "for whitening, (Σ|v|²/Σ|Hv|²)^(1/4) for Newton fitting (exact for H = c·I); "
           "falls back to 1.0 for zero or non-finite inputs. A number = that fixed scale.",
           interval(0.0, math.inf, lo_open=True, hi_open=True, optional=True)),
    Option("damping", 1e-9, "δ of the damping noise (δ + eps·|x|)⊙v added to the fit input.",
           interval(0.0, math.inf)),
    Option("lipschitz_beta", 0.9,
           "β_L of the Lipschitz EMA L ← max(β L + (1−β) ℓ, ℓ) (0 = instantaneous "
           "normaliser, as psgd_jax).", interval(0.0, 1.0, hi_open=True), static=True),
    Option("norm_bound", "subspace",
           "the spectral-norm lower bound of a dense statistic: `\"subspace\"` (the "
           "reference's subspace iteration) or `\"one_step\"` (psgd_jax's power step).",
           one_of("subspace", "one_step")),
    Option("norm_bound_k", 32, "rows of the `\"subspace\"` bound (~128 suggested for bf16).",
           integer(1), static=True),
    Option("norm_bound_iters", 2, "half-iterations of the `\"subspace\"` bound.", integer(1),
           static=True),
    Option("balance_probability", 0.01,
           "probability per refit of rebalancing the dynamic ranges of Kron factors.",
           interval(0.0, 1.0)),
    Option("update_preconditioner_first", True,
           "refit before applying P (the reference's default, lower variance) or after "
           "(unbiased: the step uses a P independent of this gradient).", boolean()),
    Option("grad_clip_max_amp", 2.0,
           "per-tensor RMS ceiling of the preconditioned update (`None` disables).",
           interval(0.0, math.inf, lo_open=True, optional=True)),
    Option("grad_clip_max_element", 10.0,
           "element-wise clip after the RMS clip (`None` disables).",
           interval(0.0, math.inf, lo_open=True, optional=True)),
    Option("update_clip_style", "rms_element",
           "how P·m is clipped: `\"rms_element\"` (per tensor, the two bounds above), "
           "`\"soft\"` (HeavyBall's smooth, sign-preserving trust region, element-wise: "
           "≈ x near 0, logarithmic beyond ≈ 1, never past ±2) or `\"global_norm\"` (the "
           "whole update, every leaf together, scaled down to a global L2 norm of at most "
           "`update_global_norm_clip`: the reference's clip for Newton fitting). Only the "
           "chosen style's bounds are used.", one_of("rms_element", "soft", "global_norm")),
    Option("update_global_norm_clip", None,
           "the bound of the `\"global_norm\"` style (needed by it, unused by the others; "
           "the psgd_jax aliases select that style when it is given).",
           interval(0.0, math.inf, lo_open=True, optional=True)),
    Option("track_diagnostics", False,
           "measure, at every `update`, each leaf's RMS of P·m before clipping, whether "
           "the clip changed it and the fit residual, into `PSGDState.diagnostics` (read "
           "them with [`psgd_eqx.diagnostics`][]); costs one extra P·x per leaf per step.",
           boolean(), static=True),
    Option("mu_dtype", None, "storage dtype of the momentum (default: the gradient's).",
           dtype_or_none),
    Option("key", 42, "a PRNG key or an int seed (probes, norm bounds, refit draws).",
           key_check),
    Option("stochastic_rounding", True,
           "when the momentum or a preconditioner is stored in bfloat16, compute in f32 and "
           "round stochastically on write (unbiased: tiny updates are not lost to rounding); "
           "`False` rounds to nearest.", boolean()),
    Option("precond_grad_accum", False,
           "fit on the average of the fit inputs (gradients, or momenta with "
           "`whiten_grad=False`) since the last refit instead of the latest one (an extra "
           "params-sized f32 buffer; ignored for Newton fitting). Averaging k inputs shrinks "
           "their noise, so with refits every k steps the fitted P grows by up to √k for "
           "pure-noise gradients.", boolean()),
    Option("bucket_leaves", "auto",
           "run every part of the step (momentum, refit, apply, clip) once per bucket of "
           "leaves with identical structure and shapes, `vmap`ped over the bucket: compile "
           "time and per-step overhead then grow with the number of buckets, not leaves; "
           "the state stores each bucket's preconditioners as one stack "
           "([`psgd_eqx.LeafBuckets`][]) and every leaf keeps its own keys. Buckets whose "
           "preconditioners differ only by the order of their axes (an MLP's (d, 4d) and "
           "(4d, d) weights) are also refitted in one call, in a shared layout. `\"auto\"` "
           "and `True` bucket (`\"auto\"` is kept for backward compatibility); `False` "
           "runs every leaf separately.", one_of(True, False, "auto")),
    Option("owner_axes", None,
           "`None` (default): *placement* sharding, every state array follows its "
           "parameter's `PartitionSpec` and XLA decides the communication. A mesh axis "
           "name or a tuple of names: *owner-computes* sharding over those axes of the mesh "
           "set with `jax.set_mesh` (needed at `init` and `update`): each bucket's stack of "
           "preconditioners is padded with inert members to a multiple of the axes' size "
           "and sharded along the stack, so each device refits and applies only the "
           "members it owns, with one all-to-all in and one out per bucket; the members "
           "of all buckets are packed across the devices by their estimated work and the "
           "padding is skipped (see the *Scaling up* guide).", mesh_axes, static=True),
)

_BY_NAME = {o.name: o for o in TRANSFORM}


def _t(name: str, **changes) -> Option:
    """A transform option as the Kron family states it."""
    return dataclasses.replace(_BY_NAME[name], **changes)


MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "one_triu", "all_diag")
USE_KERNELS = ("auto", True, False, "interpret")
GEOMETRY_DOC = (
    "`\"PRO\"` (= `\"Q0.5EQ1.5\"`), `\"EQ\"`, `\"QEQ\"`, `\"QEP\"`, `\"QUAD\"`, "
    "`\"PRO4P\"` or `\"QUAD4P\"` (see [`psgd_eqx.GEOMETRIES`][])."
)


def _geometry_check(name, value):
    canonical_geometry(value)  # the geometry module owns the names


KRON: tuple[Option, ...] = (
    Option("learning_rate", 1e-3,
           "a float or an optax schedule (1e-3: with the default gradient whitening the "
           "update has roughly Adam's scale).", at_least_zero,
           annotation=optax.ScalarOrSchedule),
    _t("b1"),
    _t("nesterov"),
    Option("weight_decay", 0.0, "decoupled (lr-scaled) weight decay, ≥ 0, as `optax.adamw`.",
           at_least_zero),
    Option("weight_decay_mask", None, "a pytree of bools or a callable, as in `optax.adamw`."),
    _t("preconditioner_update_probability", default=precond_update_prob_schedule(),
       doc="refit probability, a constant in (0, 1] or a schedule of the step count; the "
           "default is psgd_jax's anneal [`psgd_eqx.precond_update_prob_schedule`][] "
           "(every step for 500 steps, then down to 0.03 by step ≈ 4,000: chosen by "
           "quality per wall-clock second, see the *Choosing kron's defaults* guide)."),
    Option("max_size_triangular", 8192, "axes longer than this get a diagonal factor.",
           nonneg_number, static=True),
    Option("min_ndim_triangular", 2,
           "tensors with fewer (squeezed) axes get only diagonal factors.", integer(0),
           static=True),
    Option("max_skew_triangular", 1.0,
           "axis i gets a diagonal factor when nᵢ² > max_skew · N (N = number of elements; "
           "the reference's `preconditioner_max_skew`). The default 1.0 (psgdax's) gives a "
           "256×1024 matrix a dense 256 and a diagonal 1024 factor; `math.inf` (psgd_jax's) "
           "makes every axis up to `max_size_triangular` dense (chosen by quality per "
           "wall-clock second, see the *Choosing kron's defaults* guide).", nonneg_number,
           static=True),
    Option("memory_save_mode", None,
           "`None`, `\"one_diag\"` (the largest axis diagonal), `\"smart_one_diag\"` (the "
           "largest axis diagonal only if strictly larger than the second), `\"one_triu\"` "
           "(only the smallest axis may be dense) or `\"all_diag\"`.",
           one_of(*MEMORY_SAVE_MODES)),
    _t("preconditioner_lr"),
    _t("preconditioner_init_scale"),
    Option("geometry", "PRO", GEOMETRY_DOC, _geometry_check),
    _t("mu_dtype"),
    Option("precond_dtype", None,
           "factor storage dtype (default: f32, or the params' dtype if wider or complex; "
           "kept complex for complex params); the fit is always computed in ≥ f32 and L "
           "kept in f32.", dtype_or_none),
    _t("whiten_grad", default=None, check=boolean(optional=True),
       doc="fit on the gradient (default) or on the momentum (`False`); see "
           "[`psgd_eqx.scale_by_psgd`][]. psgd_jax's `momentum_into_precond_update` is the "
           "same switch negated; they must not contradict each other."),
    Option("momentum_into_precond_update", None,
           "psgd_jax's name for `not whiten_grad` (`None` = not given).",
           boolean(optional=True)),
    Option("cache_preconditioner", False,
           "store Pᵢ = QᵢᴴQᵢ of dense factors (recomputed at each refit): one product per "
           "axis per step instead of two, for twice the factor memory.", boolean()),
    _t("key"),
    _t("momentum_warmup"),
    _t("bernoulli_refit"),
    _t("damping"),
    _t("lipschitz_beta"),
    _t("norm_bound"),
    _t("norm_bound_k"),
    _t("norm_bound_iters"),
    _t("balance_probability"),
    _t("update_preconditioner_first"),
    _t("grad_clip_max_amp"),
    _t("grad_clip_max_element"),
    _t("update_clip_style"),
    _t("update_global_norm_clip"),
    _t("track_diagnostics"),
    Option("scanned_layers", None,
           "leaves whose leading axis stacks layers (built with `eqx.filter_vmap`, run with "
           "`lax.scan`): a pytree of bools like the params, or a callable `(path, leaf) -> "
           "bool`. Each such leaf gets one preconditioner per layer "
           "([`psgd_eqx.StackedQ`][]), the structure rules applied to one layer's shape. "
           "`optax.inject_hyperparams` takes a callable (a predicate, or an `eqx.Module` "
           "with a `__call__`) for a schedule: list `scanned_layers` in its `static_args`."),
    Option("lax_map_scanned_layers", False,
           "run the per-layer work with `lax.map` over batches of `lax_map_batch_size` "
           "layers instead of one `vmap` (less peak memory for deep stacks).", boolean()),
    Option("lax_map_batch_size", 8, "layers per `lax.map` batch.", integer(1), static=True),
    _t("stochastic_rounding"),
    Option("memory_budget_bytes", None,
           "a cap on the total preconditioner state: at `init` the largest dense factors "
           "are demoted to diagonal until it holds (`ValueError` if even an all-diagonal "
           "preconditioner does not fit; see [`psgd_eqx.kron_plan`][]).",
           integer(0, optional=True), static=True),
    _t("precond_grad_accum"),
    Option("merge_small_dims", False,
           "merge adjacent axes (of one layer, after squeezing) into axes of at most "
           "`target_merged_dim_size`, as coarsely as possible, where the merged axis still "
           "gets a dense factor.", boolean()),
    Option("target_merged_dim_size", 4096, "the largest merged axis.", integer(1),
           static=True),
    Option("partition_grads_into_blocks", False,
           "cut every axis that is diagonal only because it is longer than "
           "`max_size_triangular` into blocks of at most `block_size`, each with a dense "
           "factor ([`psgd_eqx.BlockedQ`][]; blocks have (almost) equal lengths, nothing is "
           "padded).", boolean()),
    Option("block_size", 256, "the largest block length.", integer(2), static=True),
    Option("params_partition_specs", None,
           "distributed_kron's sharding option: a tree of `PartitionSpec`s like the params. "
           "When a mesh is set with `jax.set_mesh`, `update` constrains the new state and "
           "the updates to the specs of [`psgd_eqx.get_opt_state_partition_specs`][]."),
    Option("preconditioner_partition_spec", None,
           "one `PartitionSpec` for every dense factor (distributed_kron's option); "
           "`None` = inferred per factor."),
    _t("bucket_leaves"),
    _t("owner_axes"),
    Option("use_kernels", "auto",
           "Pallas kernels: `\"auto\"` (on GPU only where measured faster than XLA for the "
           "factor size and the size of the stack it runs in: so far the `EQ` factor "
           "update of large factors), `True` (on GPU/TPU: the fused refit of every dense "
           "`PRO`/`EQ`/`QUAD` factor and the fused apply of every matrix, one launch per "
           "stack, where the operands fit on chip), `False` (never), `\"interpret\"` (the "
           "Pallas interpreter on any platform, for tests). See the Kernels page.",
           one_of(*USE_KERNELS)),
)

# `kron`'s own options (the rest of `KRON` is `scale_by_kron`'s).
KRON_ALIAS_ONLY = ("learning_rate", "weight_decay", "weight_decay_mask")
# The options that decide the structure (what `kron_plan` takes).
KRON_PLAN = (
    "max_size_triangular", "min_ndim_triangular", "max_skew_triangular", "memory_save_mode",
    "geometry", "precond_dtype", "cache_preconditioner", "scanned_layers",
    "memory_budget_bytes", "merge_small_dims", "target_merged_dim_size",
    "partition_grads_into_blocks", "block_size",
)
SCALE_BY_KRON = tuple(o for o in KRON if o.name not in KRON_ALIAS_ONLY)
