"""The fit of the preconditioners: one Lie-group step each on a damped probe (v, h).

Every refit of a step runs inside one `lax.cond` (not one per leaf, see `_step.py`);
preconditioners of identical structure are fitted in one batched call per group
(`_bucket.py`), and groups that differ only by a permutation of their axes are fitted in
one call too, in a shared layout (`fit_form`). bf16 storage is handled here once for every
structure: the step is taken on an f32 copy and the result rounded stochastically.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PRNGKeyArray

from . import _rng
from ._bucket import Groups, signature
from ._norms import Normaliser
from ._numerics import has_narrow_float, tree_cast_up, tree_stochastic_round
from ._precond.base import AbstractPrecond
from ._probe import damped_probe


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """What one refit needs besides the preconditioner and its inputs."""

    newton: bool
    damping: ArrayLike
    lr: ArrayLike
    normaliser: Normaliser
    balance_probability: ArrayLike
    stochastic_rounding: bool


def fit_one(
    q: AbstractPrecond, key: PRNGKeyArray, x: Array, v: Array | None, s: FitSettings
) -> AbstractPrecond:
    """One fitting step of `q` on the input `x` (gradient, momentum or Hv) and probe `v`.

    **Arguments:**

    - `q`: the preconditioner.
    - `key`: randomness for the probe, the step and the rounding.
    - `x`: the fit input; `v`: the Newton probe, or `None` (whitening: v is drawn).
    - `s`: the settings.

    **Returns:** the refitted preconditioner (same dtypes as `q`).
    """
    k_probe, k_step, k_round = _rng.split(key, 3)
    vv, hh = damped_probe(k_probe, x, s.damping, v)
    pass_v = vv if (s.newton or q.needs_v) else None
    narrow = s.stochastic_rounding and has_narrow_float(q)
    new = (tree_cast_up(q) if narrow else q).update(
        pass_v, hh, lr=s.lr, key=k_step, normaliser=s.normaliser,
        balance_probability=s.balance_probability,
    )
    return tree_stochastic_round(new, q, k_round) if narrow else new


def fit_form(q: AbstractPrecond, x: Array, v: Array | None):
    """`(q, x, v)` in `q`'s canonical fit layout (`AbstractPrecond._fit_form`)."""
    return q._fit_form(), q._fit_input(x), None if v is None else q._fit_input(v)


def fit_member(q, key: PRNGKeyArray, x: Array, v: Array | None, s: FitSettings):
    """`fit_one` for one member of a group, in its fit layout (what `refit_groups` does
    for it, merged with other groups or not); a group without a preconditioner of its
    own (`None`, a global-group slot) keeps what it has."""
    if not isinstance(q, AbstractPrecond):
        return q
    qf, xf, vf = fit_form(q, x, v)
    return q._from_fit_form(fit_one(qf, key, xf, vf, s))


def _merge_classes(groups: Groups, forms: dict) -> list[list[int]]:
    """The groups whose members are fitted by one call: equal structure in the fit form
    (`bucket.signature` of one member's `(q, key, x, v)`), in first-seen order."""
    classes: dict = {}
    for g, args in forms.items():
        # one member's shapes (no ops: a stack's leading axis dropped)
        member = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), args) \
            if groups.stacked(g) else args
        classes.setdefault(signature(member), []).append(g)
    return list(classes.values())


def _fit_merged(members: list[int], groups: Groups, forms: dict, s: FitSettings) -> dict:
    """`fit_one` on the fit forms of several groups as one `vmap` over their
    concatenated members (one refit graph for all of them). **Returns:** `{group: its
    fitted forms}` (stacked like the group)."""
    fit = functools.partial(fit_one, s=s)
    if len(members) == 1:
        g = members[0]
        return {g: (jax.vmap(fit) if groups.stacked(g) else fit)(*forms[g])}
    rows = [forms[g] if groups.stacked(g) else jax.tree.map(lambda a: a[None], forms[g])
            for g in members]
    merged = jax.vmap(fit)(*jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows))
    out, start = {}, 0
    for g in members:
        n = groups.size(g) if groups.stacked(g) else 1
        part = jax.tree.map(lambda a, a0=start, n=n: groups.rows(a, a0, n), merged)
        out[g] = part if groups.stacked(g) else jax.tree.map(lambda a: a[0], part)
        start += n
    return out


def refit_groups(
    preconds: tuple[list, AbstractPrecond | None],
    groups: Groups,
    keys: list,
    inputs: list,
    vectors: list,
    global_pair: tuple[Array, Array | None] | None,
    global_key: PRNGKeyArray,
    s: FitSettings,
    skip: Sequence[int] = (),
    merge: bool = True,
) -> tuple[list, AbstractPrecond | None]:
    """Refit every group's preconditioners and the global one.

    Each group's members are fitted in their fit layout (`fit_form`); groups whose fit
    forms have the same structure (KronQs whose axes are permutations of each other,
    e.g. an MLP's (d, 4d) and (4d, d) weights) are fitted by one `vmap`ped call over
    their concatenated members, so the step holds one refit graph per distinct fit form
    (a refit graph is most of the optimizer's compile time). The numbers are what
    `fit_member` gives each member alone. Owner-computes stacks are not merged (their
    rows stay on their owners), nor are groups with `merge=False` (`bucket_leaves=False`).

    **Arguments:**

    - `preconds`: `(per-group preconditioners, None where a group has none; global one)`.
    - `groups`: the step's [`Groups`][psgd_eqx._bucket.Groups].
    - `keys`, `inputs`, `vectors`: per group, each leaf's key, fit input and Newton probe.
    - `global_pair`: the global group's concatenated `(input, probe)`, or `None`.
    - `global_key`: the global fit's key.
    - `s`: the settings.
    - `skip`: groups refitted elsewhere (owner-computes stacks with padding, `_step.py`):
        their preconditioners are returned unchanged.
    - `merge`: fit groups with equal fit forms in one call.

    **Returns:** `(per-group preconditioners, global preconditioner)`.
    """
    qs, gq = preconds
    out = list(qs)
    live = [g for g, q in enumerate(qs) if g not in skip and isinstance(q, AbstractPrecond)]
    forms = {}
    for g in live:
        f = jax.vmap(fit_form) if groups.stacked(g) else fit_form
        qf, xf, vf = f(qs[g], inputs[g], vectors[g])
        forms[g] = (qf, keys[g], xf, vf)
    classes = (_merge_classes(groups, forms) if merge and groups.owner is None
               else [[g] for g in live])
    for members in classes:
        for g, fitted in _fit_merged(members, groups, forms, s).items():
            back = (jax.vmap(lambda q, f: q._from_fit_form(f)) if groups.stacked(g)
                    else lambda q, f: q._from_fit_form(f))
            out[g] = back(qs[g], fitted)
    if gq is not None and global_pair is not None:
        gq = fit_one(gq, global_key, *global_pair, s)
    return out, gq
