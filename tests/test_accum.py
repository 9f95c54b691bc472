"""`precond_grad_accum`: the fit uses the average of the inputs since the last refit."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import psgd_eqx as pe


def _opt(accum):
    return pe.scale_by_psgd(
        lambda path, leaf: pe.KronQ.init(leaf.shape),
        b1=0.0,
        precond_grad_accum=accum,
        preconditioner_update_probability=1 / 3,
        key=7,
    )


def test_refit_sees_the_average_of_the_inputs_since_the_last_refit():
    params = {"w": jnp.zeros((5, 4), jnp.float32)}
    gs = [jax.random.normal(jax.random.PRNGKey(i), (5, 4)) for i in range(4)]
    mean = (gs[1] + gs[2] + gs[3]) / 3.0
    with_accum, plain = _opt(True), _opt(False)
    sa, sp = with_accum.init(params), plain.init(params)
    # refits happen at steps 0 and 3 (accumulated probability 1/3)
    for i, g in enumerate(gs):
        sa = with_accum.update({"w": g}, sa, params)[1]
        # the plain optimizer gets, at the refit step, exactly the average
        sp = plain.update({"w": mean if i == 3 else g}, sp, params)[1]
    assert int(sa.refits) == int(sp.refits) == 2
    qa, qp = sa.preconditioners()["w"], sp.preconditioners()["w"]
    for a, b in zip(qa.factors, qp.factors):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)
    # the buffer was reset by the refit
    assert int(sa.fit_accum[1]) == 0
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(sa.fit_accum[0]))


def test_accum_skips_non_finite_steps_and_serialises(tmp_path):
    params = {"w": jnp.zeros((3, 3), jnp.float32)}
    opt = _opt(True)
    state = opt.init(params)
    state = opt.update({"w": jnp.ones((3, 3))}, state, params)[1]  # refit at step 0
    state = opt.update({"w": jnp.full((3, 3), jnp.nan)}, state, params)[1]
    state = opt.update({"w": 2.0 * jnp.ones((3, 3))}, state, params)[1]
    sums, n = state.fit_accum
    assert int(n) == 1 and bool(jnp.all(sums["w"] == 2.0))
    eqx.tree_serialise_leaves(tmp_path / "s.eqx", state)
    back = eqx.tree_deserialise_leaves(tmp_path / "s.eqx", state)
    assert eqx.tree_equal(back, state)


@pytest.mark.parametrize("accum", [False, True])
def test_state_has_buffer_only_when_asked(accum):
    state = _opt(accum).init({"w": jnp.zeros((2, 2), jnp.float32)})
    assert (state.fit_accum is not None) == accum
