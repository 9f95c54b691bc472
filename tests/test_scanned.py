"""Scanned / stacked layers: `StackedQ` and `kron(scanned_layers=...)`."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd_eqx as pe
from psgd_eqx import LRAQ, KronQ, StackedQ, _rng
from psgd_eqx._plan import scanned_predicate


@pytest.mark.parametrize("batch", [None, 2])
def test_stacked_update_equals_per_layer_updates(batch):
    """Layer i of a StackedQ update is the single-layer update with the i-th split key."""
    shape = (3, 4, 5)
    q = StackedQ.init(lambda s: KronQ.init(s), shape, map_batch_size=batch)
    g = jax.random.normal(jax.random.PRNGKey(0), shape)
    key = jax.random.PRNGKey(1)
    new = jax.jit(lambda q, g: q.update(None, g, lr=0.2, key=key))(q, g)
    keys = _rng.split(key, 3)  # the fits' own cheap key derivation
    for i in range(3):
        one = KronQ.init(shape[1:]).update(None, g[i], lr=0.2, key=keys[i])
        layer = jax.tree.map(lambda x: x[i], new.inner)
        for a, b in zip(layer.factors, one.factors):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # apply is per layer, and equals the block-diagonal matrix
    np.testing.assert_allclose(
        new.apply(g).reshape(-1), new.as_matrix() @ g.reshape(-1), rtol=1e-4, atol=1e-5
    )


def test_stacked_non_finite_layer_is_skipped_alone():
    shape = (3, 6)
    q = StackedQ.init(lambda s: LRAQ.init(s, rank=2), shape)
    v = jax.random.normal(jax.random.PRNGKey(0), shape)
    h = jax.random.normal(jax.random.PRNGKey(1), shape).at[1, 2].set(jnp.nan)
    new = q.update(v, h, lr=0.3, key=jax.random.PRNGKey(2))
    moved = [not eqx.tree_equal(jax.tree.map(lambda x: x[i], new.inner),
                                jax.tree.map(lambda x: x[i], q.inner)) for i in range(3)]
    assert moved == [True, False, True]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))


def test_stacked_rescale_serialise_and_validation(tmp_path):
    q = StackedQ.init(lambda s: KronQ.init(s), (2, 3, 3))
    np.testing.assert_allclose(q.rescale(2.0).as_matrix(), 4.0 * q.as_matrix(), rtol=1e-6)
    path = tmp_path / "q.eqx"
    eqx.tree_serialise_leaves(path, q)
    assert eqx.tree_equal(eqx.tree_deserialise_leaves(path, q), q)
    with pytest.raises(ValueError, match="lax_map_batch_size"):
        StackedQ.init(lambda s: KronQ.init(s), (2, 3), map_batch_size=0)
    with pytest.raises(ValueError, match="scanned_layers"):
        StackedQ.init(lambda s: KronQ.init(s), ())
    with pytest.raises(ValueError, match=r"StackedQ.apply"):
        q.apply(jnp.ones((3, 3, 3)))


def _stacked_model():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    layers = eqx.filter_vmap(lambda k: eqx.nn.Linear(12, 12, key=k))(keys)
    params, static = eqx.partition(layers, eqx.is_array)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 12))
    y = jnp.roll(x, 1, axis=1)

    def loss(p):
        def body(h, layer):
            return jnp.tanh(jax.vmap(layer)(h)), None

        h, _ = jax.lax.scan(body, x, eqx.combine(p, static))
        return jnp.mean((h - y) ** 2)

    return params, loss


def _train(opt, params, loss, steps=60):
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, value

    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return state, values


@pytest.mark.slow  # default-suite time budget; run with -m slow
def test_kron_scanned_layers_equinox_stack():
    """An `eqx.filter_vmap`-built stack run with `lax.scan`: one Kron per layer, and the
    `lax.map` path gives the same result as the `vmap` path."""
    params, loss = _stacked_model()
    flags = jax.tree.map(lambda _: True, params)
    st_v, losses_v = _train(pe.kron(3e-3, scanned_layers=flags), params, loss)
    st_m, losses_m = _train(
        pe.kron(3e-3, scanned_layers=lambda path, leaf: True, lax_map_scanned_layers=True,
                lax_map_batch_size=3),
        params, loss,
    )
    w = st_v[0].preconditioners().weight
    assert isinstance(w, StackedQ) and w.layers == 4
    assert [f.shape for f in w.inner.factors] == [(4, 12, 12), (4, 12, 12)]
    assert losses_v[-1] < 0.8 * losses_v[0]
    np.testing.assert_allclose(losses_m, losses_v, rtol=2e-4)


def test_scanned_predicate_forms():
    params = {"blocks": {"w": jnp.ones((3, 4, 4))}, "head": jnp.ones((4, 2))}
    tree = scanned_predicate({"blocks": {"w": True}, "head": False})
    fn = scanned_predicate(lambda path, leaf: leaf.ndim == 3)
    none = scanned_predicate(None)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = leaf.ndim == 3
        assert tree(path, leaf) == want and fn(path, leaf) == want and not none(path, leaf)


def test_scanned_layers_with_inject_hyperparams():
    params = {"w": jnp.ones((4, 6, 6), jnp.float32), "b": jnp.ones((6,), jnp.float32)}
    opt = optax.inject_hyperparams(pe.kron)(
        learning_rate=1e-3, scanned_layers={"w": True, "b": False}, lax_map_scanned_layers=True
    )
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(params, state, params)
    assert isinstance(state.inner_state[0].preconditioners()["w"], StackedQ)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state)


@pytest.mark.parametrize("spike", [
    "none", pytest.param("from_start", marks=pytest.mark.slow), "late"])
def test_scanned_stack_is_exactly_its_layers(spike):
    """A scanned leaf's updates equal those of its layers given as separate leaves, over
    several steps with the default options: the clips and the init-scale statistic act per
    layer, so one layer's gradient (×100 from the start: the init scale; ×100 at the last
    step only: a whitened update far over the RMS clip) never changes another layer's
    update. The only difference left is the random start of each factor's norm bound (the
    layers' keys differ), ~1e-4 relative; a clip over the whole stack moves the other
    layers by O(1)."""
    layers, shape, steps = 3, (6, 5), 4
    key = jax.random.PRNGKey(0)
    w0 = jax.random.normal(key, (layers, *shape)) * 0.3
    stacked, separate = pe.kron(1e-3, scanned_layers={"w": True}), pe.kron(1e-3)
    ps, pl = {"w": w0}, {f"w{i}": w0[i] for i in range(layers)}
    ss, sl = stacked.init(ps), separate.init(pl)
    assert isinstance(ss[0].preconditioners()["w"], StackedQ)
    step_s, step_l = jax.jit(stacked.update), jax.jit(separate.update)
    for t in range(steps):
        g = jax.random.normal(jax.random.fold_in(key, t), (layers, *shape))
        if spike == "from_start" or (spike == "late" and t == steps - 1):
            g = g.at[0].multiply(100.0)
        us, ss = step_s({"w": g}, ss, ps)
        ul, sl = step_l({f"w{i}": g[i] for i in range(layers)}, sl, pl)
        ps, pl = optax.apply_updates(ps, us), optax.apply_updates(pl, ul)
        for i in range(layers):
            want = ul[f"w{i}"]
            scale = float(jnp.max(jnp.abs(want)))
            np.testing.assert_allclose(us["w"][i], want, atol=2e-3 * scale, rtol=0,
                                       err_msg=f"step {t} layer {i}")
