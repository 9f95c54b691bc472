"""The behaviour lock: what every alias computes on a fixed problem, recorded once.

`python -m tests.behaviour_lock` (from the repository root) writes
`tests/data/behaviour_lock.npz`; `tests/test_behaviour_lock.py` recomputes every case and
compares. The cases cover every alias and the options that take a different code path
(geometry, scanned layers, blocks, merging, bf16 storage, cached factors, accumulation,
Newton pairs, the global group, momentum warm-up, refit after apply, Bernoulli refits).
A refactor that changes any update beyond f32 rounding fails the test; an intended change
re-records the file and says why in the commit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd_eqx


STEPS = 5


def params0() -> dict:
    k = jax.random.split(jax.random.PRNGKey(7), 5)
    return {
        "w": jax.random.normal(k[0], (6, 4), jnp.float32),
        "b": jax.random.normal(k[1], (4,), jnp.float32),
        "t": jax.random.normal(k[2], (3, 2, 5), jnp.float32),
        "stack": jax.random.normal(k[3], (3, 4, 4), jnp.float32),
        "long": jax.random.normal(k[4], (2, 40), jnp.float32),
    }


def _loss(params, step):
    # a fixed non-quadratic loss with step-dependent noise: different gradients each step
    out = 0.0
    for i, (name, x) in enumerate(sorted(params.items())):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), step), i)
        target = 0.3 * jax.random.normal(key, x.shape, x.dtype)
        out = out + jnp.sum(jnp.cosh(x - target)) + 0.1 * jnp.sum((x * x) @ jnp.ones(
            (x.shape[-1],), x.dtype))
    return out


def _scanned(path, leaf):
    return "stack" in jax.tree_util.keystr(path)


def _newton(name):
    return name.startswith("newton")


def cases() -> dict:
    """name -> optimizer (built fresh on each call)."""
    k = psgd_eqx.kron
    return {
        "kron": k(1e-2),
        "kron_eq": k(1e-2, geometry="EQ"),
        "kron_qeq": k(1e-2, geometry="QEQ"),
        "kron_qep": k(1e-2, geometry="QEP"),
        "kron_quad": k(1e-2, geometry="QUAD"),
        "kron_pro4p": k(1e-2, geometry="PRO4P"),
        "kron_quad4p": k(1e-2, geometry="QUAD4P"),
        "kron_scanned": k(1e-2, scanned_layers=_scanned),
        "kron_scanned_map": k(1e-2, scanned_layers=_scanned, lax_map_scanned_layers=True,
                              lax_map_batch_size=2),
        "kron_blocks_merge": k(1e-2, partition_grads_into_blocks=True, block_size=16,
                               max_size_triangular=32, merge_small_dims=True,
                               target_merged_dim_size=12),
        "kron_skew_budget": k(1e-2, max_skew_triangular=1.0, memory_budget_bytes=900),
        "kron_bf16": k(1e-2, precond_dtype=jnp.bfloat16, mu_dtype=jnp.bfloat16),
        "kron_cache_wd": k(1e-2, cache_preconditioner=True, weight_decay=0.1),
        "kron_accum_p": k(1e-2, precond_grad_accum=True, preconditioner_update_probability=0.5),
        "kron_warmup_after_m": k(1e-2, momentum_warmup=True, update_preconditioner_first=False,
                                 whiten_grad=False, lipschitz_beta=0.0, norm_bound="one_step"),
        "kron_bernoulli_sched": k(1e-2, bernoulli_refit=True, preconditioner_init_scale=0.5,
                                  preconditioner_update_probability=(
                                      psgd_eqx.precond_update_prob_schedule(flat_start=2,
                                                                            decay=0.3))),
        "kron_noclip_nobucket": k(1e-2, grad_clip_max_amp=None, grad_clip_max_element=None,
                                  bucket_leaves=False, b1=0.0),
        "affine": psgd_eqx.affine(1e-2),
        "diag": psgd_eqx.diag(1e-2),
        "xmat": psgd_eqx.xmat(1e-3),
        "xmat_leaf_pro": psgd_eqx.xmat(1e-3, per_leaf=True, geometry="PRO"),
        "lra": psgd_eqx.lra(1e-3, rank=3),
        "lra_leaf": psgd_eqx.lra(1e-3, rank=2, per_leaf=True),
        "dense": psgd_eqx.dense(1e-2),
        "psgd_mixed": psgd_eqx.psgd(
            1e-2,
            lambda path, leaf: (
                psgd_eqx.GLOBAL if leaf.ndim == 1 or "long" in jax.tree_util.keystr(path)
                else psgd_eqx.DiagQ.init(leaf.shape) if leaf.ndim == 3
                else psgd_eqx.KronQ.init(leaf.shape)
            ),
            global_structure=lambda n, dt: psgd_eqx.DenseQ.init(n, dt),
            update_global_norm_clip=1.0,
        ),
        "newton_xmat": psgd_eqx.xmat(1e-2),
        "newton_dense_eq": psgd_eqx.dense(1e-2, geometry="EQ"),
        "newton_kron": k(1e-2, preconditioner_lr=0.2),
        "newton_lra": psgd_eqx.lra(1e-2, rank=2),
    }


def run(name: str, opt) -> dict[str, np.ndarray]:
    """`STEPS` jitted steps of `opt`; returns the params after every step and the final
    state's array leaves, as float32 numpy arrays keyed by position."""
    params = params0()
    state = opt.init(params)
    newton = _newton(name)

    @jax.jit
    def step(params, state, t):
        grads = jax.grad(_loss)(params, t)
        extra = {}
        if newton:
            key = jax.random.fold_in(jax.random.PRNGKey(11), t)
            vec = jax.tree.map(lambda x: jax.random.normal(key, x.shape, x.dtype), params)
            hvp = jax.jvp(lambda p: jax.grad(_loss)(p, t), (params,), (vec,))[1]
            extra = dict(Hvp=hvp, vector=vec)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    out = {}
    for t in range(STEPS):
        params, state = step(params, state, t)
        for i, x in enumerate(jax.tree.leaves(params)):
            out[f"p{t}_{i}"] = np.asarray(x, np.float32)
    arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
    for i, x in enumerate(arrays):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out[f"s_{i}"] = np.asarray(x.astype(jnp.float32) if jnp.issubdtype(
            x.dtype, jnp.floating) else x).astype(np.float32)
    return out


def main(path: str = "tests/data/behaviour_lock.npz") -> None:
    data = {}
    for name, opt in cases().items():
        for key, value in run(name, opt).items():
            data[f"{name}/{key}"] = value
        print("recorded", name)
    np.savez_compressed(path, **data)


if __name__ == "__main__":
    main()
