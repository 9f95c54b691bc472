"""`psgd_eqx.diagnostics`: the health figures of every parameter's preconditioner."""

import equinox as eqx
import jax
from jaxtyping import PyTree

from . import _global
from ._adaptive import leaf_staleness
from ._diagnostics import LeafDiagnostics, leaf_diagnostics
from ._transform import PSGDState


def _psgd_state(state: PyTree) -> PSGDState:
    found = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PSGDState))
             if isinstance(x, PSGDState)]
    if len(found) != 1:
        raise ValueError(
            f"`diagnostics` needs an optimizer state with exactly one `PSGDState` (the "
            f"state of a psgd_eqx optimizer, or a chain around one); found {len(found)}.")
    return found[0]


def diagnostics(state: PyTree) -> dict[str, LeafDiagnostics]:
    """Is the preconditioner healthy? Per parameter, its refit count, each factor's
    Lipschitz estimate L and conditioning, and (with `track_diagnostics=True`) the last
    update's RMS before clipping, whether it was clipped and the fit residual.

    Computed on device (one compiled call per state structure); nothing is synced to the
    host until you read a value. The figures, and what healthy values look like:

    - `lipschitz` (per factor): the normaliser of the factor's fitting step, following the
        scale of the fit statistics. Healthy: it settles within a few hundred refits; jumps
        by decades mean the gradients' scale jumped.
    - `conditioning` (per factor): max|dᵢ|/min|dᵢ| of the factor's diagonal (exact for a
        triangular or diagonal factor). Up to ~1e4 is ordinary; towards 1e7 an f32 factor
        has lost precision (lower `preconditioner_lr`, or check for dead units: a
        parameter whose gradient is always zero drives its entry of Q up without bound).
    - `update_rms`: the RMS of P·m before clipping. With whitening (the default) it is
        about 0.1–1 when the fit keeps up; `clipped` true on most steps means the clip, not P,
        is setting the step size (lower the learning rate, or look at the residual).
    - `fit_residual` ρ: log(‖P·x‖² / n) for whitening, log(‖P·h‖² / ‖v‖²) for a Newton
        fit, on the step's fit input with P before that step's refit. 0 is a perfect
        fit, and ρ stays near 0 on a stationary problem (one-sample noise alone is
        ≈ √(2/n)); while the loss falls fast it sits between about −3 and 0 (P, refitted
        in small steps, lags the shrinking gradients). Well above 0 means P is too large
        for the current gradients (erratic, or grown since P was fitted); far below,
        refits are too rare to keep up (see [`psgd_eqx.adaptive_refit_schedule`][]).
    - `staleness` (with [`psgd_eqx.adaptive_refit_schedule`][]): what that schedule
        reads, per parameter: near 0 when P fits the recent inputs in scale and shape.

    **Arguments:**

    - `state`: the state of a psgd_eqx optimizer (or of an `optax.chain` around one).

    **Returns:** a dict from each parameter's path (`jax.tree_util.keystr`, e.g.
    `"['layers'][0]['w']"`) to its [`psgd_eqx.LeafDiagnostics`][]. Parameters without a
    preconditioner are left out; a parameter of the global group reports the global
    preconditioner's factors. A parameter of a scanned stack has one value per layer.
    """
    return _report(_psgd_state(state))


@eqx.filter_jit
def _report(st: PSGDState) -> dict[str, LeafDiagnostics]:
    layout = st._layout()
    qs = layout.leaves()
    dummy = jax.tree.unflatten(layout.treedef, list(range(len(qs))))
    paths = {i: jax.tree_util.keystr(p)
             for p, i in jax.tree_util.tree_flatten_with_path(dummy)[0]}
    tracked = ([None] * len(qs) if st.diagnostics is None
               else layout.treedef.flatten_up_to(st.diagnostics))
    stale = [None] * len(qs)
    if st.staleness is not None:
        debias, emas = st.staleness
        n_groups = len(layout.index)
        per_leaf = layout.groups.unstack(list(emas[:n_groups]))
        glob = emas[n_groups] if len(emas) > n_groups else None
        stale = [leaf_staleness(e, debias) if e else None for e in per_leaf]
    out = {}
    for i, q in enumerate(qs):
        if _global.is_slot(q):
            q = st.global_precond
            if st.staleness is not None:
                stale[i] = leaf_staleness(glob, debias)
        entry = leaf_diagnostics(q, st.refits, tracked[i], stale[i])
        if entry is not None:
            out[paths[i]] = entry
    return out
