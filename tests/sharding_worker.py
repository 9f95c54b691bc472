"""Runs the multi-device checks of tests/test_sharding.py in a fresh process.

XLA reads `--xla_force_host_platform_device_count` when its CPU backend starts, which has
already happened in the pytest process; so the test runs this script with the flag set and
reads the JSON it prints. Run by hand:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py
[fsdp] [fsdp_tp] [memory]` (the parts to run; all three by default).
"""

import json
import os
import sys


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import psgd_eqx  # noqa: E402


STEPS = 4
FACTOR_THRESHOLD = 4096  # entries: any factor at least this big must not be replicated


def make_params(key):
    ks = jax.random.split(key, 5)
    return {
        "emb": 0.1 * jax.random.normal(ks[0], (1024, 64)),
        "stack": {
            "w1": 0.1 * jax.random.normal(ks[1], (4, 64, 256)),
            "w2": 0.1 * jax.random.normal(ks[2], (4, 256, 64)),
        },
        "head": 0.1 * jax.random.normal(ks[3], (64, 32)),
        "norm": jnp.ones((64,)),
    }


SCANNED = {"emb": False, "stack": {"w1": True, "w2": True}, "head": False, "norm": False}


def loss_fn(params, batch):
    tokens, targets = batch
    x = params["emb"][tokens] * params["norm"]

    def layer(x, w):
        return x + jnp.tanh(x @ w[0]) @ w[1], None

    x, _ = jax.lax.scan(layer, x, (params["stack"]["w1"], params["stack"]["w2"]))
    logits = x @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def fsdp_specs(params, mesh):
    """Shard the largest axis divisible by the mesh size (never a layer axis)."""
    n = mesh.shape["fsdp"]

    def spec(path, x):
        stacked = "stack" in jax.tree_util.keystr(path)
        axes = [i for i in range(int(stacked), x.ndim) if x.shape[i] % n == 0]
        if not axes:
            return P()
        best = max(axes, key=lambda i: x.shape[i])
        return P(*[("fsdp" if i == best else None) for i in range(x.ndim)])

    return jax.tree_util.tree_map_with_path(spec, params)


def fsdp_tp_specs(params):
    return {
        "emb": P("fsdp", "tp"),
        "stack": {"w1": P(None, "fsdp", "tp"), "w2": P(None, "tp", "fsdp")},
        "head": P("fsdp", "tp"),
        "norm": P(),
    }


def kron_kwargs(pspecs):
    return dict(
        learning_rate=3e-3,
        scanned_layers=SCANNED,
        partition_grads_into_blocks=True,
        max_size_triangular=512,
        block_size=128,
        params_partition_specs=pspecs,
    )


def shardings(mesh, specs):
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def run(params, batch, kw, mesh=None):
    opt = psgd_eqx.kron(**kw)

    def step(p, s, b):
        g = jax.grad(loss_fn)(p, b)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    if mesh is None:
        state = jax.jit(opt.init)(params)
        fn = jax.jit(step)
    else:
        p_sh = shardings(mesh, kw["params_partition_specs"])
        s_sh = shardings(mesh, psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw))
        b_sh = NamedSharding(mesh, P())
        params = jax.device_put(params, p_sh)
        state = jax.jit(opt.init, out_shardings=s_sh)(params)
        fn = jax.jit(step, in_shardings=(p_sh, s_sh, b_sh), out_shardings=(p_sh, s_sh))
    with jax.set_mesh(mesh) if mesh is not None else _null():
        for _ in range(STEPS):
            params, state = fn(params, state, batch)
    return params, state


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def rel_diff(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    out = 0.0
    for x, y in zip(la, lb):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            if not np.array_equal(np.asarray(jax.random.key_data(x) if jnp.issubdtype(
                    x.dtype, jax.dtypes.prng_key) else x), np.asarray(
                    jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key)
                    else y)):
                return float("inf")
            continue
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)))
    return out


def factor_leaves(state):
    st = state[0]
    qs = jax.tree.leaves(
        st.preconditioners(), is_leaf=lambda x: isinstance(x, psgd_eqx.AbstractPrecond)
    )
    return [leaf for q in qs for leaf in jax.tree.leaves(q) if leaf.ndim >= 2]


def per_device_bytes(tree):
    totals: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values())


def main():
    out = {"devices": len(jax.devices())}
    params = make_params(jax.random.PRNGKey(0))
    kt, ky = jax.random.split(jax.random.PRNGKey(1))
    batch = (jax.random.randint(kt, (64,), 0, 1024), jax.random.randint(ky, (64,), 0, 32))

    parts = set(sys.argv[1:]) or {"fsdp", "fsdp_tp", "memory"}
    meshes = {
        "fsdp": lambda: jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,)),
        "fsdp_tp": lambda: jax.make_mesh((4, 2), ("fsdp", "tp"),
                                         axis_types=(AxisType.Auto,) * 2),
    }
    meshes = {name: make() for name, make in meshes.items() if name in parts}
    ref_p, ref_s = run(params, batch, kron_kwargs(None)) if meshes else (None, None)
    for name, mesh in meshes.items():
        pspecs = fsdp_specs(params, mesh) if name == "fsdp" else fsdp_tp_specs(params)
        p, s = run(params, batch, kron_kwargs(pspecs), mesh)
        factors = factor_leaves(s)
        out[name] = {
            "params_rel_diff": rel_diff(p, ref_p),
            "state_rel_diff": rel_diff(s, ref_s),
            "loss_single": float(loss_fn(ref_p, batch)),
            "loss_sharded": float(loss_fn(p, batch)),
            "large_factors": sum(f.size >= FACTOR_THRESHOLD for f in factors),
            "replicated_large_factors": [
                list(f.shape) for f in factors
                if f.size >= FACTOR_THRESHOLD and f.sharding.is_fully_replicated
            ],
            "factor_specs": sorted({str(f.sharding.spec) for f in factors}),
        }

    memory = {}
    for n in (1, 2, 4, 8) if "memory" in parts else ():
        mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,),
                             devices=jax.devices()[:n])
        kw = kron_kwargs(fsdp_specs(params, mesh))
        opt = psgd_eqx.kron(**kw)
        s_sh = shardings(mesh, psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw))
        state = jax.jit(opt.init, out_shardings=s_sh)(jax.device_put(
            params, shardings(mesh, kw["params_partition_specs"])))
        memory[n] = {
            "per_device": per_device_bytes(state),
            "total": sum(x.nbytes for x in jax.tree.leaves(state)),
        }
    out["memory"] = memory
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
