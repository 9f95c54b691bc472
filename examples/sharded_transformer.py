"""Sharded transformer: PSGD-Kron on a scanned-layer Equinox language model with FSDP.

Run with

    pip install -e ".[examples]" && python examples/sharded_transformer.py [--steps N] [--devices N]

A small character-level transformer (token and position embeddings, a stack of identical
pre-LayerNorm causal self-attention + MLP blocks, final LayerNorm, unembedding) trained with
`psgd_eqx.kron` on the help texts that ship with Python (`pydoc_data.topics`: nothing is
downloaded). What it shows:

- **scanned layers**: the blocks are built with `eqx.filter_vmap` over keys (every block
  parameter gets a leading layer axis) and applied with `jax.lax.scan`; `kron` is told so with
  `scanned_layers=` (a pytree of bools like the parameters) and fits one Kronecker
  preconditioner per layer instead of one across the layer axis;
- **FSDP**: a 1-D device mesh with axis `"fsdp"`; every parameter is sharded along its largest
  axis divisible by the number of devices (never along the layer axis), the batch along its
  first axis; the optimizer state gets its shardings from
  `psgd_eqx.get_opt_state_partition_specs`, so each device holds a slice of the
  preconditioners and momenta;
- per-device and total optimizer-state bytes, the `kron_plan` table, and loss and time per
  step.

On a CPU-only machine the devices are simulated: the first lines below set
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX is imported (unless
`XLA_FLAGS` already names a device count). That flag only affects the host (CPU) platform,
so on a machine with several accelerators it is harmless and the line can be removed;
`--devices N` then picks the first N of `jax.devices()`.

The same code runs as one program over several processes (each process calls `main` after
`jax.distributed.initialize`): arrays are built with `jax.make_array_from_callback`, which
only asks a process for the slices its own devices hold, and only process 0 prints.
`examples/multiprocess_train.py` does that, on 2 processes of 4 devices each.
"""

import os


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import psgd_eqx  # noqa: E402


SEED = 0
VOCAB_MULTIPLE = 8
# Peak learning rate (warm-up, then cosine decay to a tenth). In a short sweep (200 steps,
# the default model) 1e-3, 3e-3 and 1e-2 ended at a loss (mean of the last 20 steps) of
# 2.64, 2.37 and 2.26; 3e-3 is kept as the middle ground.
LR = 3e-3


# ----------------------------------------------------------------------------- data


def load_text() -> tuple[np.ndarray, list[str]]:
    """Python's help topics (the text behind `help("if")` etc.), concatenated, as int32
    character ids; and the vocabulary (the sorted characters, then padding)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    # Padded to a multiple of 8 with unused ids, so the embedding and unembedding (and
    # their preconditioner factors) can be split over up to 8 devices.
    vocab += [f"<unused {i}>" for i in range(-len(vocab) % VOCAB_MULTIPLE)]
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    return ids, vocab


def sample_batch(rng: np.random.Generator, ids: np.ndarray, batch_size: int, seq_len: int):
    """`batch_size` random windows: inputs `ids[i : i + T]`, targets shifted by one."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    window = ids[idx]
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------- model


class Block(eqx.Module):
    """Pre-LayerNorm transformer block on one sequence `(T, d)`: causal self-attention,
    then a 4x MLP, each added to the residual stream."""

    ln1: eqx.nn.LayerNorm
    qkv: eqx.nn.Linear
    proj: eqx.nn.Linear
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear
    n_heads: int = eqx.field(static=True)

    def __init__(self, d_model: int, n_heads: int, *, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.ln1 = eqx.nn.LayerNorm(d_model)
        self.qkv = eqx.nn.Linear(d_model, 3 * d_model, key=k1)
        self.proj = eqx.nn.Linear(d_model, d_model, key=k2)
        self.ln2 = eqx.nn.LayerNorm(d_model)
        self.fc1 = eqx.nn.Linear(d_model, 4 * d_model, key=k3)
        self.fc2 = eqx.nn.Linear(4 * d_model, d_model, key=k4)
        self.n_heads = n_heads

    def attention(self, x):
        t, d = x.shape
        h = self.n_heads
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (a.reshape(t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("hts,shd->thd", weights, v).reshape(t, d)
        return jax.vmap(self.proj)(out)

    def __call__(self, x):
        x = x + self.attention(jax.vmap(self.ln1)(x))
        hidden = jax.nn.gelu(jax.vmap(self.fc1)(jax.vmap(self.ln2)(x)))
        return x + jax.vmap(self.fc2)(hidden)


class Transformer(eqx.Module):
    """Character-level language model: `(T,)` ids -> `(T, vocab)` next-character logits."""

    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: Block  # stacked: every array has a leading axis of length n_layers
    ln_f: eqx.nn.LayerNorm
    unembed: eqx.nn.Linear

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 *, key):
        k_emb, k_pos, k_blocks, k_out = jax.random.split(key, 4)
        self.embed = eqx.nn.Embedding(vocab, d_model, key=k_emb)
        self.pos = 0.02 * jax.random.normal(k_pos, (seq_len, d_model))
        # The stacked-module pattern: one Block per key, arrays stacked along a new axis 0.
        keys = jax.random.split(k_blocks, n_layers)
        self.blocks = eqx.filter_vmap(lambda k: Block(d_model, n_heads, key=k))(keys)
        self.ln_f = eqx.nn.LayerNorm(d_model)
        self.unembed = eqx.nn.Linear(d_model, vocab, use_bias=False, key=k_out)

    def __call__(self, tokens):
        x = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        dynamic, static = eqx.partition(self.blocks, eqx.is_array)

        def body(h, layer):
            return eqx.combine(layer, static)(h), None

        x, _ = jax.lax.scan(body, x, dynamic)
        return jax.vmap(self.unembed)(jax.vmap(self.ln_f)(x))


def scanned_flags(params: Transformer):
    """`scanned_layers=` for `kron`: True for the stacked block leaves, False elsewhere."""
    flags = jax.tree.map(lambda _: False, params)
    return eqx.tree_at(lambda m: m.blocks, flags, jax.tree.map(lambda _: True, params.blocks))


# ------------------------------------------------------------------------- sharding


def fsdp_specs(params, mesh: jax.sharding.Mesh, flags=None):
    """FSDP `PartitionSpec`s: each array is sharded over `"fsdp"` along its largest axis
    whose length the mesh size divides, the leading layer axis of stacked leaves
    (`flags` True) excepted; arrays with no such axis are replicated (`P()`)."""
    n = mesh.shape["fsdp"]
    if flags is None:
        flags = jax.tree.map(lambda _: False, params)

    def spec(leaf, stacked):
        first = 1 if stacked else 0
        axes = [i for i in range(first, leaf.ndim) if leaf.shape[i] % n == 0]
        if not axes:
            return P()
        best = max(axes, key=lambda i: (leaf.shape[i], -i))  # largest; first on ties
        return P(*(("fsdp" if i == best else None) for i in range(leaf.ndim)))

    return jax.tree.map(spec, params, flags)


def named(mesh, specs):
    """A tree of `PartitionSpec`s (with `None` holes) -> the same tree of `NamedSharding`s."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def to_global(tree, shardings):
    """Host values -> global `jax.Array`s with the given shardings.

    Every process holds the whole value and hands over only the slices that its own devices
    hold. On one process this is `jax.device_put`; on several it also works, where
    `device_put` would need the devices of the other processes.

    **Arguments:**

    - `tree`: a pytree of NumPy or single-device arrays, the same on every process.
    - `shardings`: a pytree of `jax.sharding.Sharding`s with the structure of `tree`.

    **Returns:** the pytree of global arrays.
    """

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def bytes_per_device(tree) -> tuple[int, int]:
    """`(max over devices of the bytes of the shards it holds, total logical bytes)`; with
    several processes, over this process' devices."""
    per_device: dict = {}
    total = 0
    for leaf in jax.tree.leaves(tree):
        total += leaf.nbytes
        for shard in leaf.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()), total


# ------------------------------------------------------------------------- training


def main(
    steps: int = 200,
    devices: int | None = None,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seq_len: int = 64,
    batch_size: int = 32,
    learning_rate: float = LR,
    log_every: int = 20,
    seed: int = SEED,
    owner: bool = False,
) -> dict:
    """Train the model for `steps` steps on `devices` devices (default: all); with `owner`,
    in owner-computes sharding mode (`owner_axes="fsdp"`) instead of placement.

    **Returns:** a dict with `losses` (per-step minibatch loss, a list of floats), `step_ms`
    (mean milliseconds per step, the first, compiling, step excluded), `state_bytes_per_device`
    and `state_bytes_total` (optimizer state: the most any one device holds, and the
    logical total), `n_devices` and `plan` (the `kron_plan` table, a Markdown string).
    """
    # With several processes, only process 0 prints (every process computes the same).
    log = print if jax.process_index() == 0 else (lambda *args, **kwargs: None)
    n_devices = devices or len(jax.devices())
    if n_devices > len(jax.devices()):
        raise ValueError(f"--devices {n_devices}, but JAX sees only {len(jax.devices())}")
    if batch_size % n_devices:
        raise ValueError(f"batch size {batch_size} is not divisible by {n_devices} devices")
    mesh = jax.make_mesh(
        (n_devices,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
        devices=jax.devices()[:n_devices],
    )

    ids, vocab = load_text()
    model = Transformer(len(vocab), d_model, n_layers, n_heads, seq_len,
                        key=jax.random.PRNGKey(seed))
    params, static = eqx.partition(model, eqx.is_array)
    flags = scanned_flags(params)
    param_specs = fsdp_specs(params, mesh, flags)
    param_sh = named(mesh, param_specs)
    batch_sh = NamedSharding(mesh, P("fsdp", None))
    params = to_global(params, param_sh)

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=max(1, min(50, steps // 10)),
        decay_steps=max(steps, 2), end_value=0.1 * learning_rate,
    )
    # The recipe of distributed_kron: the same keywords build the optimizer and its
    # state's partition specs; every dense factor is split by rows over "fsdp".
    kw = dict(
        learning_rate=schedule,
        scanned_layers=flags,
        params_partition_specs=param_specs,
        preconditioner_partition_spec=P("fsdp", None),
    )
    if owner:  # each bucket of same-shape stacks owned whole, member by member
        kw["owner_axes"] = "fsdp"
    # owner-computes reads the mesh at `init` and at every `update`
    in_mesh = (lambda: jax.set_mesh(mesh)) if owner else contextlib.nullcontext
    opt = psgd_eqx.kron(**kw)
    state_specs = psgd_eqx.get_opt_state_partition_specs(params, mesh=mesh, **kw)
    state_sh = named(mesh, state_specs)
    with in_mesh():
        opt_state = jax.jit(opt.init, out_shardings=state_sh)(params)

    plan = psgd_eqx.plan_table(psgd_eqx.kron_plan(params, scanned_layers=flags))
    state_per_device, state_total = bytes_per_device(opt_state)
    param_per_device, param_total = bytes_per_device(params)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log(f"{n_devices} device(s), mesh {dict(mesh.shape)}; {len(ids):,} characters of text, "
        f"vocabulary {len(vocab)} (with padding); {n_params:,} parameters")
    log(plan)
    log(f"parameters:      {param_per_device:>10,} bytes on the busiest device, "
        f"{param_total:,} in total")
    log(f"optimizer state: {state_per_device:>10,} bytes on the busiest device, "
        f"{state_total:,} in total")

    def loss_fn(p, x, y):
        logits = jax.vmap(eqx.combine(p, static))(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def train_step(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    step = jax.jit(
        train_step,
        in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
        out_shardings=(param_sh, state_sh, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )

    rng = np.random.default_rng(seed)
    losses, times = [], []
    for i in range(steps):
        x, y = sample_batch(rng, ids, batch_size, seq_len)
        # Every process draws the same global batch (same seed) and keeps its own rows.
        x, y = to_global((x, y), (batch_sh, batch_sh))
        t0 = time.perf_counter()
        with in_mesh():
            params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))  # blocks until the step is done
        times.append(time.perf_counter() - t0)
        if i % log_every == 0 or i == steps - 1:
            recent = times[1:][-log_every:]
            ms = f"{1e3 * np.mean(recent):7.1f} ms/step" if recent else "  (compiling step)"
            log(f"step {i:5d}  loss {losses[-1]:.4f}  {ms}")

    step_ms = 1e3 * float(np.mean(times[1:])) if steps > 1 else float("nan")
    tail = losses[-min(20, len(losses)):]
    log(f"loss {losses[0]:.3f} -> {np.mean(tail):.3f} (mean of the last {len(tail)} steps; "
        f"log(vocab) = {math.log(len(vocab)):.3f}), {step_ms:.1f} ms/step")
    return {
        "losses": losses,
        "step_ms": step_ms,
        "state_bytes_per_device": int(state_per_device),
        "state_bytes_total": int(state_total),
        "n_devices": n_devices,
        "plan": plan,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (200)")
    parser.add_argument("--devices", type=int, default=None,
                        help="use the first N devices (default: all; 8 simulated on CPU)")
    parser.add_argument("--d-model", type=int, default=64, help="model width (64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--seq-len", type=int, default=64, help="context length (64)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per step (32)")
    parser.add_argument("--lr", type=float, default=LR, help=f"peak learning rate ({LR})")
    parser.add_argument("--json", default=None, help="write the result dict to this file")
    parser.add_argument("--owner", action="store_true",
                        help="owner-computes sharding (owner_axes='fsdp') instead of placement")
    args = parser.parse_args()
    result = main(
        steps=args.steps, devices=args.devices, d_model=args.d_model, n_layers=args.layers,
        n_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch, learning_rate=args.lr,
        owner=args.owner,
    )
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
