"""Checks of what `update` is given, before anything is traced: a mismatch is reported
with the parameter path it concerns."""

from jaxtyping import PyTree


def check_update_inputs(grads: PyTree, state, hvp: PyTree | None,
                        vector: PyTree | None) -> None:
    """Raise a clear error when the inputs of `update` do not fit the state.

    **Arguments:**

    - `grads`: the gradients given to `update`.
    - `state`: the optimizer's `PSGDState`.
    - `hvp`, `vector`: the Newton pair, or `None`.

    **Returns:** nothing; raises `ValueError`/`TypeError` naming the offending path.
    """
    if (hvp is None) != (vector is None):
        raise ValueError("`Hvp` and `vector` must be given together for Newton fitting.")
