"""The fit form: KronQs whose axes are permutations of each other are fitted in one layout
(`AbstractPrecond._fit_form`), and groups with equal fit forms in one call
(`_fit.refit_groups`). Same maths, one refit graph."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd_eqx
from psgd_eqx import KronQ, _fit
from psgd_eqx._norms import Normaliser


# (shape, init kwargs): orders that the fit form permutes, a size-1 axis, a merged shape
_CASES = [
    ((6, 4), {}),
    ((32, 16), {"dense": (False, True)}),
    ((3, 1, 5), {"dense": (True, False)}),
    ((5, 2, 3), {"merged": (5, 6), "dense": (False, True)}),
    ((4, 6), {"cache_preconditioner": True}),
]


@pytest.mark.parametrize("geometry", psgd_eqx.GEOMETRIES)
@pytest.mark.parametrize("shape,kw", _CASES)
def test_fit_in_fit_form_is_the_same_step(geometry, shape, kw):
    # With the deterministic bound and no rebalancing the step draws no random numbers,
    # so the step taken in the fit form must be the direct step, permuted.
    q = KronQ.init(shape, geometry=geometry, init_scale=0.7, **kw)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    h = jax.random.normal(k1, shape)
    v = jax.random.normal(k2, shape) if q.needs_v else None
    fit = dict(lr=0.3, key=jax.random.PRNGKey(3), normaliser=Normaliser(bound="one_step"),
               balance_probability=0.0)
    want = q.update(v, h, **fit)
    form = q._fit_form()
    assert form.shape == tuple(sorted(form.shape)) or not all(form.dense)
    got = q._from_fit_form(form.update(None if v is None else q._fit_input(v),
                                       q._fit_input(h), **fit))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_form_puts_dense_axes_first_then_by_size():
    q = KronQ.init((32, 16), dense=(False, True))
    assert q._fit_form().shape == (16, 32) and q._fit_form().dense == (True, False)
    q = KronQ.init((6, 4))
    assert q._fit_form().shape == (4, 6)
    q = KronQ.init((4, 6))
    assert q._fit_form() is q  # already in its fit form: nothing is permuted
    x = jnp.arange(24.0).reshape(6, 4)
    np.testing.assert_array_equal(KronQ.init((6, 4))._fit_input(x), x.T)


def _run(params, grads, steps=3, **kw):
    opt = psgd_eqx.kron(1e-2, preconditioner_update_probability=1.0, **kw)
    state = opt.init(params)
    step = jax.jit(opt.update)
    outs = []
    for _ in range(steps):
        u, state = step(grads, state, params)
        outs.append(u)
    return outs, state


def test_transposed_parameter_gets_transposed_updates():
    # Both layouts are fitted in the same fit form with the same key: the updates of Wᵀ
    # are those of W, transposed (they were different random draws before).
    w = jax.random.normal(jax.random.PRNGKey(1), (12, 40))
    g = 0.1 * jnp.sin(3.0 * w)
    a, _ = _run({"w": w}, {"w": g})
    b, _ = _run({"w": w.T}, {"w": g.T})
    for ua, ub in zip(a, b):
        np.testing.assert_allclose(ub["w"], ua["w"].T, rtol=1e-5, atol=1e-7)


def _mlp(layers=3):
    key = jax.random.PRNGKey(0)
    out = []
    for i in range(layers):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out.append({"w_in": jax.random.normal(k1, (8, 24)),
                    "w_out": jax.random.normal(k2, (24, 8)) * 0.1, "b": jnp.zeros(24)})
    return out


@pytest.mark.parametrize("lone", [False, True])
def test_merged_refit_equals_separate_refits(monkeypatch, lone):
    params = _mlp()
    if lone:  # a group of one ((1, 24, 8): a bucket of its own) joins the two stacks
        params.append({"lone": jax.random.normal(jax.random.PRNGKey(5), (1, 24, 8))})
    grads = jax.tree.map(lambda p: 0.1 * jnp.cos(3.0 * p) + 0.01, params)
    seen = []
    merge = _fit._merge_classes

    def spy(groups, forms):
        seen.append(merge(groups, forms))
        return seen[-1]

    monkeypatch.setattr(_fit, "_merge_classes", spy)
    merged, s1 = _run(params, grads)
    # w_in and w_out (and the lone leaf): one call
    assert any(len(c) == 2 + lone for c in seen[-1]), seen
    monkeypatch.setattr(_fit, "_merge_classes",
                        lambda groups, forms: [[g] for g in forms])
    alone, s2 = _run(params, grads)
    for x, y in zip(jax.tree.leaves((merged, s1[0].preconditioners())),
                    jax.tree.leaves((alone, s2[0].preconditioners()))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)


def test_merging_emits_fewer_ops(monkeypatch):
    params = _mlp(layers=4)
    grads = jax.tree.map(jnp.ones_like, params)

    def ops():  # a new optimizer each time: jit caches traces per function
        opt = psgd_eqx.kron(1e-2)
        text = jax.jit(opt.update).lower(grads, opt.init(params), params).as_text()
        return len(re.findall(r"stablehlo\.", text))

    merged = ops()
    monkeypatch.setattr(_fit, "_merge_classes", lambda groups, forms: [[g] for g in forms])
    assert merged < 0.85 * ops()
