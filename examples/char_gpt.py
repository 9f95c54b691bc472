"""Char GPT: PSGD-Kron vs Adam on a small character-level GPT, with a learning-rate sweep.

Run with

    pip install -e ".[examples]" && python examples/char_gpt.py [--steps N] [--out FILE]

The JAX counterpart of the reference's tiny-GPT demo (`misc/gpt2.py` in lixilinx/psgd_torch,
nanoGPT on WikiText-103), scaled to a CPU and to text that needs no download: the help
texts that ship with Python (`pydoc_data.topics`, about 465,000 characters), split 90/10
into training and validation text. The model is a GPT in Equinox: token and learned
position embeddings, a stack of pre-LayerNorm blocks (causal multi-head self-attention,
4x GELU MLP), a final LayerNorm and an unembedding. The blocks are stacked with
`eqx.filter_vmap` and run with `jax.lax.scan`; `kron` is told so with `scanned_layers=` and
fits one preconditioner per layer.

`psgd_eqx.kron` (default gradient whitening, so Adam's learning rates apply) and
`optax.adam` get the same initialisation, the same minibatches, the same step budget and
the same schedule (linear warm-up, cosine decay to a tenth), for each peak learning rate of
the sweep (seed 0). The learning rate of each is chosen by the final validation loss, then
run again on another seed (another initialisation and other minibatches) to show how much
of the gap is seed noise. Losses are in nats per character (bits per character = nats /
ln 2).

The training step is compiled once per optimizer: the peak learning rate is an argument of
the jitted step (a traced scalar), so the sweep reuses one compiled step.
"""

import argparse
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import psgd_eqx


LRS = (1e-2, 3e-2, 1e-1)
SEED = 0
VAL_FRACTION = 0.1
VAL_BATCHES = 8  # validation windows: VAL_BATCHES x batch_size, fixed across runs
VAL_SEED = 1234

# Trace counter of the training step (a Python side effect runs once per compilation).
TRACES = {"step": 0}


# ----------------------------------------------------------------------------- data


def load_text() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Python's help topics, concatenated, as int32 character ids: the first 90% for
    training, the last 10% for validation; and the vocabulary (sorted characters)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), dtype=np.int32, count=len(text))
    cut = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:cut], ids[cut:], vocab


def windows(rng: np.random.Generator, ids: np.ndarray, n: int, seq_len: int):
    """`n` random windows: inputs `ids[i : i + T]`, targets shifted by one."""
    starts = rng.integers(0, len(ids) - seq_len - 1, size=n)
    window = ids[starts[:, None] + np.arange(seq_len + 1)[None, :]]
    return window[:, :-1], window[:, 1:]


# ---------------------------------------------------------------------------- model


class Block(eqx.Module):
    """Pre-LayerNorm transformer block on one sequence `(T, d)`."""

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
        out = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
        return jax.vmap(self.proj)(out.reshape(t, d))

    def __call__(self, x):
        x = x + self.attention(jax.vmap(self.ln1)(x))
        return x + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(jax.vmap(self.ln2)(x))))


class GPT(eqx.Module):
    """`(T,)` character ids -> `(T, vocab)` next-character logits."""

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


def scanned_flags(params: GPT):
    """`scanned_layers=` for `kron`: True for the stacked block leaves, False elsewhere."""
    flags = jax.tree.map(lambda _: False, params)
    return eqx.tree_at(lambda m: m.blocks, flags, jax.tree.map(lambda _: True, params.blocks))


# ------------------------------------------------------------------------- training


def loss_fn(params, static, x, y):
    logits = jax.vmap(eqx.combine(params, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def make_model(key, vocab, d_model, n_layers, n_heads, seq_len):
    # Jitted: one compiled program instead of one per initialiser and shape.
    return GPT(vocab, d_model, n_layers, n_heads, seq_len, key=key)


@eqx.filter_jit
def init_state(params, optimizer):
    return optimizer.init(params)


@eqx.filter_jit
def evaluate(params, static, x, y):
    """Mean loss over batches `x, y` of shape `(n_batches, batch, T)`."""
    return jax.lax.map(lambda xy: loss_fn(params, static, *xy), (x, y)).mean()


@eqx.filter_jit
def train_step(params, opt_state, x, y, lr, optimizer, static):
    """One step. `optimizer` was built with a unit peak learning rate (the schedule's
    shape only): both `kron` and `adam` end with `scale_by_learning_rate`, so scaling their
    update by `lr` is exactly the optimizer with peak learning rate `lr`. `lr` is a traced
    scalar: a new value does not recompile."""
    TRACES["step"] += 1
    loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss


def unit_schedule(steps: int, floor: float = 0.1):
    """Linear warm-up over 5% of the steps, then cosine decay to `floor`, peak 1 (the peak
    learning rate is applied in `train_step`). Written out rather than optax's schedules,
    which mix a Python float and the int32 step count."""
    warmup = max(1, steps // 20)

    def schedule(count):
        t = count.astype(jnp.float32)
        frac = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(t < warmup, (t + 1.0) / warmup, cosine)

    return schedule


def run(name, optimizer, lr, model, batches, val, *, eval_every, progress=True):
    """Train one (optimizer, lr); return per-step train losses and the validation curve."""
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = init_state(params, optimizer)
    lr_arr = jnp.asarray(lr, dtype=jnp.float32)
    steps = len(batches[0])
    losses, val_steps, val_losses = np.empty(steps), [], []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"{name} lr={lr:g}", disable=not progress, leave=False)
    for i in bar:
        params, opt_state, loss = train_step(
            params, opt_state, batches[0][i], batches[1][i], lr_arr, optimizer, static
        )
        losses[i] = float(loss)
        if (i + 1) % eval_every == 0 or i == steps - 1:
            val_steps.append(i + 1)
            val_losses.append(float(evaluate(params, static, *val)))
            bar.set_postfix(loss=f"{losses[i]:.3f}", val=f"{val_losses[-1]:.3f}")
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, min(50, steps // 10)):]
    return {
        "losses": losses,
        "train_loss": float(np.mean(tail)),
        "val_steps": val_steps,
        "val_losses": val_losses,
        "val_loss": val_losses[-1],
        "seconds": seconds,
    }


def plot(results: dict, names, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.8, 3.6))
    for name in names:
        r = results[name]
        label = f"{name} (lr {r['best_lr']:g})"
        losses = r["losses"]
        window = max(1, min(25, len(losses) // 10))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax1.plot(np.arange(window, len(losses) + 1), smooth, label=label)
        ax2.plot(r["val_steps"], r["val_losses"], marker="o", markersize=3, label=label)
    ax1.set_title("train loss (minibatch, smoothed)", fontsize=10)
    ax2.set_title("validation loss", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
        ax.set_ylabel("nats per character")
        ax.legend()
    fig.suptitle("Char-level GPT on Python's help texts: PSGD-Kron vs Adam (best lr of each)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(
    steps: int = 600,
    lrs: tuple = LRS,
    d_model: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    seq_len: int = 64,
    batch_size: int = 16,
    evals: int = 10,
    check_seeds: int = 1,
    out: str | None = "char_gpt.png",
    progress: bool = True,
    optimizers: tuple = ("kron", "adam"),
) -> dict:
    """Sweep `lrs` for PSGD-Kron and Adam (or those of `optimizers`), `steps` steps per
    run, on seed 0; then run each optimizer's best lr again on `check_seeds` more seeds
    (another initialisation and other minibatches; the same validation windows).

    **Returns:** `{"kron": {...}, "adam": {...}, "compiles": int, "n_params": int,
    "vocab": int}`. Each optimizer's dict has `sweep` (lr -> `train_loss`, `val_loss`),
    `best_lr` (by final validation loss) and for that lr: `train_loss` (mean minibatch
    loss of the last 10% of the steps, at most 50), `val_loss` (final), `initial_loss`
    (first-step minibatch loss), `losses` (per-step minibatch losses), `val_steps` and
    `val_losses` (the validation curve) and `seconds` (training wall time, evaluations
    included); `val_loss_seeds` and `train_loss_seeds` (the best lr on every seed, seed 0
    first); `sweep_seconds` (all runs of this optimizer, compilation and the seed checks
    included). Losses are in nats per character. `compiles` counts the training step's
    compilations in this call.
    """
    train_ids, val_ids, vocab = load_text()
    # One fixed set of validation windows for every run.
    vx, vy = windows(np.random.default_rng(VAL_SEED), val_ids, VAL_BATCHES * batch_size,
                     seq_len)
    val = (jnp.asarray(vx.reshape(VAL_BATCHES, batch_size, seq_len)),
           jnp.asarray(vy.reshape(VAL_BATCHES, batch_size, seq_len)))

    def setup(seed):
        """The initial model and the minibatches of a seed (the same for both optimizers)."""
        x, y = windows(np.random.default_rng(seed), train_ids, steps * batch_size, seq_len)
        batches = (jnp.asarray(x.reshape(steps, batch_size, seq_len)),
                   jnp.asarray(y.reshape(steps, batch_size, seq_len)))
        model = make_model(jax.random.PRNGKey(seed), len(vocab), d_model, n_layers,
                           n_heads, seq_len)
        return model, batches

    model, batches = setup(SEED)
    params = eqx.filter(model, eqx.is_array)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    eval_every = max(1, steps // max(evals, 1))

    traces0 = TRACES["step"]
    schedule = unit_schedule(steps)
    factories = {
        "kron": lambda: psgd_eqx.kron(learning_rate=schedule,
                                      scanned_layers=scanned_flags(params)),
        "adam": lambda: optax.adam(learning_rate=schedule),
    }
    optimizers = {name: factories[name]() for name in optimizers}
    results = {}
    outer = tqdm(total=len(optimizers) * (len(lrs) + check_seeds), desc="runs",
                 disable=not progress)
    for name, optimizer in optimizers.items():
        per_lr = {}
        for lr in lrs:
            per_lr[lr] = run(name, optimizer, lr, model, batches, val,
                             eval_every=eval_every, progress=progress)
            outer.update(1)
        sweep = {lr: {"train_loss": r["train_loss"], "val_loss": r["val_loss"]}
                 for lr, r in per_lr.items()}
        best_lr = min(lrs, key=lambda lr: sweep[lr]["val_loss"])
        best = per_lr[best_lr]
        checks = []
        for seed in range(SEED + 1, SEED + 1 + check_seeds):
            checks.append(run(name, optimizer, best_lr, *setup(seed), val,
                              eval_every=eval_every, progress=progress))
            outer.update(1)
        results[name] = {
            "val_loss_seeds": [best["val_loss"]] + [r["val_loss"] for r in checks],
            "train_loss_seeds": [best["train_loss"]] + [r["train_loss"] for r in checks],
            "sweep": sweep,
            "best_lr": best_lr,
            "sweep_seconds": float(sum(r["seconds"] for r in [*per_lr.values(), *checks])),
            "initial_loss": float(best["losses"][0]),
            **{k: best[k] for k in ("train_loss", "val_loss", "losses", "val_steps",
                                    "val_losses", "seconds")},
        }
    outer.close()
    results["compiles"] = TRACES["step"] - traces0
    results["n_params"] = int(n_params)
    results["vocab"] = len(vocab)

    print(f"char GPT ({n_params:,} parameters, vocabulary {len(vocab)}, "
          f"ln(vocab) = {math.log(len(vocab)):.3f}); {steps} steps of {batch_size} x "
          f"{seq_len} characters; lr chosen by final validation loss (nats/char)")
    print(f"{'':>5} {'lr':>7} {'train':>7} {'val':>7} {'val bits':>8}")
    for name in optimizers:
        for lr, s in results[name]["sweep"].items():
            mark = " *" if lr == results[name]["best_lr"] else ""
            print(f"{name:>5} {lr:>7g} {s['train_loss']:>7.4f} {s['val_loss']:>7.4f} "
                  f"{s['val_loss'] / math.log(2):>8.4f}{mark}")
    for name in optimizers:
        r = results[name]
        seeds_str = ", ".join(f"{v:.4f}" for v in r["val_loss_seeds"])
        print(f"{name:>5}: best lr {r['best_lr']:g}: train {r['train_loss']:.4f}, "
              f"validation {r['val_loss']:.4f} nats/char "
              f"({r['val_loss'] / math.log(2):.4f} bits/char); validation on seeds "
              f"0..{len(r['val_loss_seeds']) - 1}: {seeds_str}; {r['seconds']:.1f} s per run, "
              f"{r['sweep_seconds']:.0f} s in all")
    print(f"training step compiled {results['compiles']} time(s)")
    if out is not None:
        plot(results, list(optimizers), out)
        print(f"loss curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per run (600)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS),
                        help=f"peak learning rates to sweep {LRS}")
    parser.add_argument("--d-model", type=int, default=64, help="model width (64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    parser.add_argument("--seq-len", type=int, default=64, help="context length (64)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (16)")
    parser.add_argument("--check-seeds", type=int, default=1,
                        help="extra seeds for each optimizer's best lr (1)")
    parser.add_argument("--out", default="char_gpt.png", help="where to save the PNG")
    args = parser.parse_args()
    main(steps=args.steps, lrs=tuple(args.lrs), d_model=args.d_model, n_layers=args.layers,
         n_heads=args.heads, seq_len=args.seq_len, batch_size=args.batch,
         check_seeds=args.check_seeds, out=args.out)
