"""Owner-computes sharding on 1, 2, 4 and 8 simulated CPU devices, in a fresh process.

`tests/test_owner.py` runs it with `--xla_force_host_platform_device_count=8` and reads
the JSON it prints: per mesh size, the largest relative difference of the params and of
the per-leaf preconditioners from the single-device optimizer after `STEPS` training
steps; and, for 8 devices, what one compiled `update` costs in both sharding modes
(collectives in the optimized HLO, per-device FLOPs from `cost_analysis()`,
preconditioner bytes per device). Run by hand:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/owner_worker.py`.
"""

import json
import os
import re
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


STEPS = 5
LAYERS = 3  # 3 members per bucket: padded to 4 on 2 and 4 devices, to 8 on 8


def make_layers(key, n, d=16):
    ks = jax.random.split(key, 3 * n)
    return [{
        "w_in": 0.3 * jax.random.normal(ks[3 * i], (d, 2 * d)),
        "w_out": 0.2 * jax.random.normal(ks[3 * i + 1], (2 * d, d)),
        "b": 0.1 * jax.random.normal(ks[3 * i + 2], (2 * d,)),
    } for i in range(n)]


def transformer_params(key, n, d):
    """`n` layers of {qkv (d, 3d), o (d, d), up (d, 4d), down (4d, d)}: four buckets."""
    shapes = {"qkv": (d, 3 * d), "o": (d, d), "up": (d, 4 * d), "down": (4 * d, d)}
    ks = jax.random.split(key, 4 * n)
    return {"layers": [{name: 0.02 * jax.random.normal(ks[4 * i + j], shape)
                        for j, (name, shape) in enumerate(shapes.items())}
                       for i in range(n)]}


def make_params(key):
    ks = jax.random.split(key, 3 * LAYERS + 3)
    layers = [{
        "w_in": 0.3 * jax.random.normal(ks[3 * i], (16, 32)),
        "w_out": 0.2 * jax.random.normal(ks[3 * i + 1], (32, 16)),
        "b": 0.1 * jax.random.normal(ks[3 * i + 2], (32,)),
    } for i in range(LAYERS)]
    return {
        "layers": layers,
        "scan": 0.3 * jax.random.normal(ks[-3], (2, 16, 16)),  # scanned: a StackedQ
        "emb": 0.3 * jax.random.normal(ks[-2], (40, 16)),  # a blocked axis: a BlockedQ
        "head": 0.3 * jax.random.normal(ks[-1], (16, 8)),  # in no bucket (one of a kind)
    }


def loss_fn(params, x):
    h = x @ params["emb"].T @ params["emb"]
    for lp in params["layers"]:
        h = h + jnp.tanh(h @ lp["w_in"] + lp["b"]) @ lp["w_out"]
    h = h + jnp.tanh(h @ params["scan"][0]) @ params["scan"][1]
    return jnp.mean(jnp.square(h @ params["head"] - 0.5))


def kron_kwargs():
    # skew inf with a small max size: dense factors, diagonal ones (the biases) and a
    # 40-axis cut into blocks of ≤ 16
    return dict(learning_rate=3e-2, max_skew_triangular=float("inf"), max_size_triangular=24,
                partition_grads_into_blocks=True, block_size=16,
                scanned_layers=lambda path, leaf: "scan" in jax.tree_util.keystr(path))


def fsdp_specs(params, n):
    def spec(path, x):
        first = 1 if "scan" in jax.tree_util.keystr(path) else 0
        axes = [i for i in range(first, x.ndim) if x.shape[i] % n == 0]
        if not axes:
            return P()
        best = max(axes, key=lambda i: x.shape[i])
        return P(*[("fsdp" if i == best else None) for i in range(x.ndim)])

    return jax.tree_util.tree_map_with_path(spec, params)


def shardings(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def setup(params, n, owner, extra=None, base=None):
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    pspecs = fsdp_specs(params, n)
    kw = dict(kron_kwargs() if base is None else base, **(extra or {}),
              params_partition_specs=pspecs)
    if owner:
        kw["owner_axes"] = "fsdp"
    opt = psgd_eqx.kron(**kw)
    p_sh = shardings(mesh, pspecs)
    s_sh = shardings(mesh, psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw))
    with jax.set_mesh(mesh):
        state = jax.jit(opt.init, out_shardings=s_sh)(jax.device_put(params, p_sh))
    return mesh, opt, p_sh, s_sh, state


def train(params, x, n=None, owner=False, extra=None):
    if n is None:
        opt = psgd_eqx.kron(**kron_kwargs(), **(extra or {}))
        state, mesh = opt.init(params), None
        step_fn = jax.jit(lambda p, s: _step(opt, p, s, x))
    else:
        mesh, opt, p_sh, s_sh, state = setup(params, n, owner, extra)
        params = jax.device_put(params, p_sh)
        step_fn = jax.jit(lambda p, s: _step(opt, p, s, x), in_shardings=(p_sh, s_sh),
                          out_shardings=(p_sh, s_sh))
    with jax.set_mesh(mesh) if mesh is not None else _Null():
        for _ in range(STEPS):
            params, state = step_fn(params, state)
    return params, state


def _step(opt, p, s, x):
    g = jax.grad(loss_fn)(p, x)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def explicit_updates(params, n, steps=STEPS):
    """`steps` updates with fixed gradients on a mesh of `Explicit` axes (jax's default)
    in owner-computes mode, and on one device: `(updates, states)` of both."""
    grads = jax.tree.map(lambda p: 0.01 * jnp.cos(3.0 * p), params)
    mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:n])
    pspecs = fsdp_specs(params, n)
    kw = dict(kron_kwargs(), params_partition_specs=pspecs, owner_axes="fsdp")
    opt = psgd_eqx.kron(**kw)
    p_sh = shardings(mesh, pspecs)
    s_sh = shardings(mesh, psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw))
    with jax.set_mesh(mesh):
        p, g = jax.device_put(params, p_sh), jax.device_put(grads, p_sh)
        state = jax.device_put(jax.jit(opt.init)(p), s_sh)
        update = jax.jit(opt.update)
        for _ in range(steps):
            u, state = update(g, state, p)
    ref = psgd_eqx.kron(**kron_kwargs())
    ref_state = ref.init(params)
    for _ in range(steps):
        ref_u, ref_state = jax.jit(ref.update)(grads, ref_state, params)
    return (u, ref_u), (state, ref_state)


def rel_diff(a, b):
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out = max(out, float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30)))
    return out


def collectives(hlo: str) -> dict:
    kinds = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
    return {k: len(re.findall(rf"\b{k}(?:-start)?\(", hlo)) for k in kinds}


def update_costs(params, n, owner, base=None):
    """One compiled `update` (gradients given): collectives, FLOPs, precond bytes/device;
    `base`: kron's keywords (default `kron_kwargs()`)."""
    mesh, opt, p_sh, s_sh, state = setup(params, n, owner, base=base)
    grads = jax.device_put(jax.tree.map(lambda p: 0.01 * jnp.cos(3.0 * p), params), p_sh)
    fn = jax.jit(opt.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
    with jax.set_mesh(mesh):
        compiled = fn.lower(grads, state, jax.device_put(params, p_sh)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    per_device: dict = {}
    for leaf in jax.tree.leaves(state[0].precond):
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    layout = state[0].precond
    pads = layout.pad or (0,) * len(layout.index)
    bucket_pad_bytes = [sum(x.nbytes for x in jax.tree.leaves(stack)) * pad // (len(idx) + pad)
                        for idx, stack, pad in zip(layout.index, layout.stacks, pads)]
    return {"collectives": collectives(compiled.as_text()), "flops": float(cost["flops"]),
            "max_bucket_pad_bytes": max(bucket_pad_bytes, default=0),
            "precond_bytes_per_device": max(per_device.values()),
            "buckets": sum(len(idx) > 1 for idx in state[0].precond.index),
            "stack_pad": list(state[0].precond.pad)}


def main():
    params = make_params(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
    ref_p, ref_s = train(params, x)
    out = {"devices": len(jax.devices()), "equal": {}}
    for n in (1, 2, 4, 8):
        p, s = train(params, x, n, owner=True)
        out["equal"][n] = {"params": rel_diff(p, ref_p),
                           "preconditioners": rel_diff(s[0].preconditioners(),
                                                       ref_s[0].preconditioners()),
                           "count": int(s[0].count)}
    # the per-leaf health figures and the adaptive schedule's state, in owner mode: the
    # same refits and figures as on one device (padding rows do not count)
    extra = dict(track_diagnostics=True,
                 preconditioner_update_probability=psgd_eqx.adaptive_refit_schedule())
    ref_p, ref_s = train(params, x, extra=extra)
    ref_d = psgd_eqx.diagnostics(ref_s)
    out["equal_tracked"] = {}
    for n in (1, 4):
        p, s = train(params, x, n, owner=True, extra=extra)
        d = psgd_eqx.diagnostics(s)
        out["equal_tracked"][n] = {
            "params": rel_diff(p, ref_p),
            "refits": [int(s[0].refits), int(ref_s[0].refits)],
            "figures": rel_diff([(v.update_rms, v.fit_residual, v.staleness)
                                 for v in d.values()],
                                [(v.update_rms, v.fit_residual, v.staleness)
                                 for v in ref_d.values()]),
        }
    # a mesh of Explicit axes (jax.make_mesh's default), owner-computes on 8 devices
    (u, ref_u), (st, ref_st) = explicit_updates(params, 8)
    out["explicit"] = {"updates": rel_diff(u, ref_u),
                       "preconditioners": rel_diff(st[0].preconditioners(),
                                                   ref_st[0].preconditioners())}
    # the costs on a tree of buckets only, each of 8 members (no padding on 8 devices),
    # with matrices large enough that the factor work outweighs the per-step scalars
    params = {"layers": make_layers(jax.random.PRNGKey(2), 8, d=128)}
    single = update_costs(params, 1, owner=False)
    out["single_flops"] = single["flops"]
    out["single_precond_bytes"] = single["precond_bytes_per_device"]
    out["single_collectives"] = single["collectives"]
    for mode in ("placement", "owner"):
        out[mode] = update_costs(params, 8, owner=mode == "owner")
    # four buckets of 4 members on 8 devices: every stack is half padding, and only the
    # packing of the members across buckets keeps each device at an eighth of the work
    # (kron's defaults, every refit: the configuration of benchmarks/sharding_modes.py)
    params = transformer_params(jax.random.PRNGKey(3), 4, d=128)
    base = dict(learning_rate=1e-3, preconditioner_update_probability=1.0)
    packed_single = update_costs(params, 1, owner=False, base=base)
    out["packed_single_flops"] = packed_single["flops"]
    out["packed_single_precond_bytes"] = packed_single["precond_bytes_per_device"]
    out["packed"] = update_costs(params, 8, owner=True, base=base)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
