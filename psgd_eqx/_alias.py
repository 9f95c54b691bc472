"""User-facing optimizers: structure rule + `scale_by_psgd` + weight decay + learning rate."""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax
from jaxtyping import ArrayLike, PRNGKeyArray

from ._geometry import canonical_geometry
from ._numerics import compute_dtype, promote
from ._plan import dense_axes, validate_structure_rules
from ._precond.kron import KronQ
from ._transform import scale_by_psgd


def _fit_target(whiten_grad: bool | None, momentum_into_precond_update: bool | None) -> bool:
    """Reconcile the reference's `whiten_grad` with psgd_jax's `momentum_into_precond_update`."""
    if whiten_grad is not None and momentum_into_precond_update is not None:
        if bool(whiten_grad) == bool(momentum_into_precond_update):
            raise ValueError(
                "`whiten_grad` and `momentum_into_precond_update` contradict each other: "
                f"got whiten_grad={whiten_grad!r}, "
                f"momentum_into_precond_update={momentum_into_precond_update!r}."
            )
    if whiten_grad is not None:
        return bool(whiten_grad)
    if momentum_into_precond_update is not None:
        return not bool(momentum_into_precond_update)
    return True


def scale_by_kron(
    *,
    b1: ArrayLike = 0.9,
    preconditioner_update_probability: ArrayLike | Callable = 1.0,
    max_size_triangular: ArrayLike = 8192,
    min_ndim_triangular: ArrayLike = 2,
    max_skew_triangular: ArrayLike = float("inf"),
    memory_save_mode: str | None = None,
    preconditioner_lr: ArrayLike | Callable = 0.1,
    preconditioner_init_scale: ArrayLike | None = None,
    geometry: str = "PRO",
    mu_dtype=None,
    precond_dtype=None,
    whiten_grad: bool | None = None,
    momentum_into_precond_update: bool | None = None,
    cache_preconditioner: bool = False,
    key: PRNGKeyArray | ArrayLike = 42,
    momentum_warmup: bool = False,
    bernoulli_refit: bool = False,
    damping: ArrayLike = 1e-9,
    lipschitz_beta: ArrayLike = 0.9,
    norm_bound: str = "subspace",
    norm_bound_k: ArrayLike = 32,
    norm_bound_iters: ArrayLike = 2,
    balance_probability: ArrayLike = 0.01,
    update_preconditioner_first: bool = True,
    grad_clip_max_amp: ArrayLike | None = 2.0,
    grad_clip_max_element: ArrayLike | None = 10.0,
) -> optax.GradientTransformationExtraArgs:
    """Kronecker-factored PSGD (no learning rate, no weight decay): P·m, clipped.

    Every parameter gets a [`psgd_eqx.KronQ`][]; which axes are dense follows the structure
    rules (see [`psgd_eqx.kron_plan`][]).

    **Arguments:**

    - `b1`: momentum (0.9).
    - `preconditioner_update_probability`: refit probability, constant or schedule (1.0;
        use [`psgd_eqx.precond_update_prob_schedule`][]`()` for psgd_jax's 1 → 0.03 anneal).
    - `max_size_triangular`, `min_ndim_triangular`, `max_skew_triangular`,
        `memory_save_mode`: structure rules (defaults 8192, 2, ∞, `None`: psgd_jax's).
    - `preconditioner_lr`: μ (0.1), constant or schedule.
    - `preconditioner_init_scale`: `None` (data-driven from the first gradient) or a number.
    - `geometry`: `"PRO"` (= `"Q0.5EQ1.5"`, default), `"EQ"`, `"QEQ"`, `"QEP"`, `"QUAD"`.
    - `mu_dtype`: momentum storage dtype (default: the gradient's).
    - `precond_dtype`: factor storage dtype (default: f32, or the params' dtype if wider
        or complex); the fit is always computed in ≥ f32 and L kept in f32.
    - `whiten_grad` / `momentum_into_precond_update`: fit on the gradient (default) or on
        the momentum; either name works, they must not contradict each other.
    - `cache_preconditioner`: store Pᵢ = QᵢᴴQᵢ of dense factors (recomputed at each refit):
        one product per axis per step instead of two, for twice the factor memory.
    - `key`: PRNG key or int seed.
    - `momentum_warmup`, `bernoulli_refit`, `damping`, `lipschitz_beta`, `norm_bound`,
        `norm_bound_k`, `norm_bound_iters`, `balance_probability`,
        `update_preconditioner_first`, `grad_clip_max_amp`, `grad_clip_max_element`: see
        [`psgd_eqx.scale_by_psgd`][].

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state contains one
    [`psgd_eqx.PSGDState`][].
    """
    validate_structure_rules(
        max_size_triangular, min_ndim_triangular, max_skew_triangular, memory_save_mode
    )
    geometry = canonical_geometry(geometry)
    wg = _fit_target(whiten_grad, momentum_into_precond_update)
    rules = dict(
        max_size_triangular=max_size_triangular,
        min_ndim_triangular=min_ndim_triangular,
        max_skew_triangular=max_skew_triangular,
        memory_save_mode=memory_save_mode,
    )
    if precond_dtype is not None:
        precond_dtype = jnp.dtype(precond_dtype)

    def structure(path, p):
        del path
        dtype = compute_dtype(p.dtype)
        if precond_dtype is not None:
            dtype = precond_dtype
            if jnp.issubdtype(p.dtype, jnp.complexfloating):
                dtype = promote(dtype, jnp.complex64)
        return KronQ.init(
            p.shape,
            dtype,
            dense=dense_axes(p.shape, **rules),
            geometry=geometry,
            cache_preconditioner=cache_preconditioner,
        )

    return scale_by_psgd(
        structure,
        b1=b1,
        whiten_grad=wg,
        preconditioner_update_probability=preconditioner_update_probability,
        preconditioner_lr=preconditioner_lr,
        preconditioner_init_scale=preconditioner_init_scale,
        mu_dtype=mu_dtype,
        key=key,
        momentum_warmup=momentum_warmup,
        bernoulli_refit=bernoulli_refit,
        damping=damping,
        lipschitz_beta=lipschitz_beta,
        norm_bound=norm_bound,
        norm_bound_k=norm_bound_k,
        norm_bound_iters=norm_bound_iters,
        balance_probability=balance_probability,
        update_preconditioner_first=update_preconditioner_first,
        grad_clip_max_amp=grad_clip_max_amp,
        grad_clip_max_element=grad_clip_max_element,
    )


def kron(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: ArrayLike = 0.9,
    weight_decay: ArrayLike = 0.0,
    weight_decay_mask: Any = None,
    preconditioner_update_probability: ArrayLike | Callable = 1.0,
    max_size_triangular: ArrayLike = 8192,
    min_ndim_triangular: ArrayLike = 2,
    max_skew_triangular: ArrayLike = float("inf"),
    memory_save_mode: str | None = None,
    preconditioner_lr: ArrayLike | Callable = 0.1,
    preconditioner_init_scale: ArrayLike | None = None,
    geometry: str = "PRO",
    mu_dtype=None,
    precond_dtype=None,
    whiten_grad: bool | None = None,
    momentum_into_precond_update: bool | None = None,
    cache_preconditioner: bool = False,
    key: PRNGKeyArray | ArrayLike = 42,
    momentum_warmup: bool = False,
    bernoulli_refit: bool = False,
    damping: ArrayLike = 1e-9,
    lipschitz_beta: ArrayLike = 0.9,
    norm_bound: str = "subspace",
    norm_bound_k: ArrayLike = 32,
    norm_bound_iters: ArrayLike = 2,
    balance_probability: ArrayLike = 0.01,
    update_preconditioner_first: bool = True,
    grad_clip_max_amp: ArrayLike | None = 2.0,
    grad_clip_max_element: ArrayLike | None = 10.0,
) -> optax.GradientTransformationExtraArgs:
    """PSGD with Kronecker-factored preconditioners: the drop-in optax optimizer.

    `optax.chain(scale_by_kron(...), add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))`, i.e. θ ← θ − lr·(clip(P·m) + wd·θ), weight
    decay coupled to the lr as in `optax.adamw`. See
    [Learning rates and weight decay](../guides/learning_rates.md) for porting lr/wd from
    Adam and from the other PSGD implementations.

    **Arguments:**

    - `learning_rate`: a float or an optax schedule (1e-3: with the default gradient
        whitening the update has roughly Adam's scale).
    - `b1`: momentum.
    - `weight_decay`: decoupled (lr-scaled) weight decay, ≥ 0.
    - `weight_decay_mask`: a pytree of bools or a callable, as in `optax.adamw`.
    - the other arguments: see [`psgd_eqx.scale_by_kron`][].

    **Returns:** an `optax.GradientTransformationExtraArgs`.

    !!! Example

        ```python
        opt = psgd_eqx.kron(learning_rate=1e-3)
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ```
    """
    from ._transform import concrete

    if concrete(weight_decay) is not None and not concrete(weight_decay) >= 0:
        raise ValueError(f"`weight_decay` must be >= 0; got {weight_decay!r}.")
    if not callable(learning_rate) and concrete(learning_rate) is not None and not (
        concrete(learning_rate) >= 0
    ):
        raise ValueError(f"`learning_rate` must be >= 0; got {learning_rate!r}.")
    parts = [
        scale_by_kron(
            b1=b1,
            preconditioner_update_probability=preconditioner_update_probability,
            max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular,
            max_skew_triangular=max_skew_triangular,
            memory_save_mode=memory_save_mode,
            preconditioner_lr=preconditioner_lr,
            preconditioner_init_scale=preconditioner_init_scale,
            geometry=geometry,
            mu_dtype=mu_dtype,
            precond_dtype=precond_dtype,
            whiten_grad=whiten_grad,
            momentum_into_precond_update=momentum_into_precond_update,
            cache_preconditioner=cache_preconditioner,
            key=key,
            momentum_warmup=momentum_warmup,
            bernoulli_refit=bernoulli_refit,
            damping=damping,
            lipschitz_beta=lipschitz_beta,
            norm_bound=norm_bound,
            norm_bound_k=norm_bound_k,
            norm_bound_iters=norm_bound_iters,
            balance_probability=balance_probability,
            update_preconditioner_first=update_preconditioner_first,
            grad_clip_max_amp=grad_clip_max_amp,
            grad_clip_max_element=grad_clip_max_element,
        )
    ]
    # Skip the no-op decay only for a Python 0: an array (inject_hyperparams) must give the
    # same chain at init (concrete) and in update (traced).
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
