"""Runs the checks of tests/test_reshard_checkpoint.py in a fresh process with 8 CPU devices.

Trains a tiny model for a few steps on an 8-device FSDP mesh (with the sharding helpers of
`examples/sharded_transformer.py`), saves the params and the optimizer state with Orbax,
restores them onto a 4-device and a 1-device mesh (target shardings from
`get_opt_state_partition_specs` for that mesh), and compares the next `update` there with
the 8-device run's. Also runs the code sample of the "Checkpoints that reshard" section of
docs/guides/scaling.md. Prints a JSON summary. Run by hand:
`python tests/reshard_checkpoint_worker.py CHECKPOINT_DIR`.

The optimizer state is handled as an opaque pytree: only `kron`,
`get_opt_state_partition_specs` and `jax.eval_shape(opt.init, params)` are used.
"""

import os


# Read by XLA when its CPU backend starts, so it is set before JAX is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import psgd_eqx  # noqa: E402


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import sharded_transformer as ex  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guides" / "scaling.md"
STEPS_BEFORE_SAVE = 3
BATCH, VOCAB, WIDTH, LAYERS = 16, 64, 16, 2
# Which leaves are stacks of layers (a leading layer axis): `scanned_layers=` for kron.
FLAGS = {"emb": False, "stack": True, "head": False, "norm": False}


def make_params(key):
    """A tiny model with each kind of preconditioner: dense x dense (`emb`, `head`), a stack
    of per-layer ones (`stack`) and a diagonal (`norm`). Compile time grows with the number
    of leaves, so there are few."""
    k_emb, k_stack, k_head = jax.random.split(key, 3)
    return {
        "emb": 0.1 * jax.random.normal(k_emb, (VOCAB, WIDTH)),
        "stack": 0.1 * jax.random.normal(k_stack, (LAYERS, WIDTH, WIDTH)),
        "head": 0.1 * jax.random.normal(k_head, (WIDTH, VOCAB)),
        "norm": jnp.ones((WIDTH,)),
    }


def loss_fn(params, tokens, targets):
    x = params["emb"][tokens] * params["norm"]
    x, _ = jax.lax.scan(lambda h, w: (h + jnp.tanh(h @ w), None), x, params["stack"])
    logits = x @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def make_mesh(n: int):
    return jax.make_mesh((n,), ("fsdp",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def setup(params, flags, mesh):
    """The optimizer for `mesh`, the shardings of the params, its state and a batch, and
    the optimizer's keywords."""
    param_specs = ex.fsdp_specs(params, mesh, flags)
    kw = dict(learning_rate=1e-2, scanned_layers=flags, params_partition_specs=param_specs)
    opt = psgd_eqx.kron(**kw)
    state_specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw)
    return (opt, ex.named(mesh, param_specs), ex.named(mesh, state_specs),
            NamedSharding(mesh, P("fsdp", None)), kw)


def abstract(tree, shardings):
    """Shapes and dtypes of `tree` (arrays or `ShapeDtypeStruct`s) with `shardings`."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def host(tree):
    """Every leaf as a NumPy array (PRNG keys as their key data)."""
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def max_diff(a, b) -> tuple[float, float]:
    """(max absolute difference, max over leaves of it / the leaf's max |b|) over the
    floating leaves; non-float leaves must be equal (else inf)."""
    abs_d = rel_d = 0.0
    for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True):
        if not np.issubdtype(y.dtype, np.floating):
            if not np.array_equal(x, y):
                return float("inf"), float("inf")
            continue
        d = float(np.max(np.abs(x - y), initial=0.0))
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / (float(np.max(np.abs(y), initial=0.0)) + 1e-30))
    return abs_d, rel_d


def main(ckpt_dir: pathlib.Path) -> dict:
    params0 = make_params(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = [tuple(rng.integers(0, VOCAB, size=(BATCH, 8), dtype=np.int32) for _ in "xy")
               for _ in range(STEPS_BEFORE_SAVE + 1)]

    def make_update(opt, p_sh, s_sh, b_sh):
        def update(p, state, x, y):
            grads = jax.grad(loss_fn)(p, x, y)
            return opt.update(grads, state, p)

        return jax.jit(update, in_shardings=(p_sh, s_sh, b_sh, b_sh),
                       out_shardings=(p_sh, s_sh))

    # ---- the uninterrupted 8-device run
    mesh8 = make_mesh(8)
    opt, p_sh, s_sh, b_sh, kw = setup(params0, FLAGS, mesh8)
    update8 = make_update(opt, p_sh, s_sh, b_sh)
    params = ex.to_global(params0, p_sh)
    with jax.set_mesh(mesh8):
        state = jax.jit(opt.init, out_shardings=s_sh)(params)
        for x, y in batches[:-1]:
            updates, state = update8(params, state, *ex.to_global((x, y), (b_sh, b_sh)))
            params = optax.apply_updates(params, updates)

    path = ckpt_dir / "step_3"
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, {"params": params, "opt_state": state})
    ckpt.wait_until_finished()

    x, y = batches[-1]
    with jax.set_mesh(mesh8):
        ref_updates, ref_state = update8(params, state, *ex.to_global((x, y), (b_sh, b_sh)))
    saved = {"params": params, "opt_state": state}

    out = {"devices": jax.device_count(), "restored": {}}
    for n in (4, 1):
        mesh = make_mesh(n)
        opt_n, p_sh_n, s_sh_n, b_sh_n, _ = setup(params0, FLAGS, mesh)
        target = {
            "params": abstract(params0, p_sh_n),
            "opt_state": abstract(jax.eval_shape(opt_n.init, params0), s_sh_n),
        }
        restored = ckpt.restore(path, target)
        wanted = jax.tree.leaves({"params": p_sh_n, "opt_state": s_sh_n})
        got = [leaf.sharding for leaf in jax.tree.leaves(restored)]
        with jax.set_mesh(mesh):
            updates, new_state = make_update(opt_n, p_sh_n, s_sh_n, b_sh_n)(
                restored["params"], restored["opt_state"],
                *ex.to_global((x, y), (b_sh_n, b_sh_n)),
            )
        out["restored"][n] = {
            "same_structure": jax.tree.structure(restored) == jax.tree.structure(saved),
            "shardings_as_asked": len(got) == len(wanted)
            and all(g.is_equivalent_to(w, leaf.ndim)
                    for g, w, leaf in zip(got, wanted, jax.tree.leaves(restored))),
            "devices_used": sorted({d.id for leaf in jax.tree.leaves(restored)
                                    for d in leaf.sharding.device_set}),
            "restored_vs_saved": max_diff(restored, saved),
            "update_diff": max_diff(updates, ref_updates),
            "state_diff": max_diff(new_state, ref_state),
        }
    ckpt.close()
    out["guide_sample"] = guide_sample(ckpt_dir / "guide", saved, kw)
    return out


def guide_sample(workdir: pathlib.Path, saved: dict, kw: dict) -> dict:
    """Run the guide's code sample (it saves into the working directory) on the 8-device
    params and state, and report whether it restored them, unchanged, onto 4 devices."""
    text = GUIDE.read_text()
    section = text[text.index("## Checkpoints that reshard"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    namespace = dict(
        jax=jax, psgd_eqx=psgd_eqx, NamedSharding=NamedSharding, AxisType=AxisType,
        fsdp_specs=ex.fsdp_specs, flags=FLAGS, kw=kw,
        params=saved["params"], opt_state=saved["opt_state"],
    )
    workdir.mkdir()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        exec(compile(code, str(GUIDE), "exec"), namespace)
    finally:
        os.chdir(cwd)
    restored = {"params": namespace["params"], "opt_state": namespace["opt_state"]}
    return {
        "restored_vs_saved": max_diff(restored, saved),
        "devices_used": sorted({d.id for leaf in jax.tree.leaves(restored)
                                for d in leaf.sharding.device_set}),
        "saved_under_workdir": (workdir / "checkpoints" / "step_100").is_dir(),
    }


if __name__ == "__main__":
    json.dump(main(pathlib.Path(sys.argv[1]).resolve()), sys.stdout)
