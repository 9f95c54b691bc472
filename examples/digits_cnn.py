"""Digits CNN: PSGD-Kron vs Adam on a small convolutional network, with a learning-rate sweep.

Run with

    pip install -e ".[examples]" && python examples/digits_cnn.py [--steps N] [--seeds N]

The JAX counterpart of the reference's LeNet-5 demo (`mnist_with_lenet5.py` in
lixilinx/psgd_torch), scaled to what a CPU trains in minutes and to data that needs no
download: scikit-learn's digits (1,797 handwritten digits, 8x8 pixels, shipped with
scikit-learn). An Equinox CNN (two 3x3 convolutions, max-pooling, two dense layers) is
trained with `psgd_eqx.kron` (default gradient whitening) and with `optax.adam`:

- the same initialisation and the same minibatches for both optimizers (per seed);
- a sweep over the same learning rates for each, the same step budget, the same cosine
  decay of the learning rate (to a tenth of its peak);
- the learning rate of each optimizer is chosen by validation accuracy (mean over the
  seeds); the test accuracy is reported for that choice only.

The training step is compiled once per optimizer: the peak learning rate is an argument of
the jitted step (a traced scalar), not a constant baked into the optimizer, so the sweep and
the seeds reuse one compiled step.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import psgd_eqx


LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
BATCH_SIZE = 64
SEED = 0

# Trace counter of the training step (a Python side effect runs once per compilation).
TRACES = {"step": 0}


def load_data(seed: int = SEED):
    """Digits as `(N, 1, 8, 8)` images scaled to [0, 1]; split 60/15/25 into train,
    validation and test (stratified). Returns `(x, y)` for each split, then all three
    concatenated with their split ids."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.2, random_state=seed, stratify=y_rest
    )
    as_jnp = lambda a, b: (jnp.asarray(a), jnp.asarray(b, dtype=jnp.int32))
    # All three splits concatenated, with split ids 0/1/2 (train/val/test), for evaluation.
    parts = ((x_train, y_train), (x_val, y_val), (x_test, y_test))
    everything = (
        *as_jnp(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
        np.concatenate([np.full(len(p[1]), i) for i, p in enumerate(parts)]),
    )
    return (*(as_jnp(*p) for p in parts), everything)


class CNN(eqx.Module):
    """`(1, 8, 8)` image -> 10 logits: conv 3x3 (16) - ReLU - conv 3x3 (32) - ReLU -
    max-pool 2x2 - dense 512 -> 64 - ReLU - dense 64 -> 10."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, *, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = eqx.nn.Conv2d(1, 16, kernel_size=3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 32, kernel_size=3, padding=1, key=k2)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2, stride=2)
        self.fc1 = eqx.nn.Linear(32 * 4 * 4, 64, key=k3)
        self.fc2 = eqx.nn.Linear(64, 10, key=k4)

    def __call__(self, x):
        x = jax.nn.relu(self.conv1(x))
        x = self.pool(jax.nn.relu(self.conv2(x)))
        x = jax.nn.relu(self.fc1(x.reshape(-1)))
        return self.fc2(x)


def loss_fn(params, static, x, y):
    logits = jax.vmap(eqx.combine(params, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@eqx.filter_jit
def evaluate(params, static, x, y):
    """Per-example losses and hits (1.0 where the prediction is right)."""
    logits = jax.vmap(eqx.combine(params, static))(x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return losses, (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)


@eqx.filter_jit
def make_model(key):
    # Jitted: one compiled program instead of one per initialiser and shape.
    return CNN(key=key)


@eqx.filter_jit
def init_state(params, optimizer):
    # Jitted: one compiled program instead of many small eagerly dispatched ones.
    return optimizer.init(params)


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


def unit_cosine_schedule(steps: int, floor: float = 0.1):
    """Cosine decay from 1 to `floor` over `steps` steps: the shape of the learning-rate
    schedule, its peak being applied in `train_step`. (Written out rather than
    `optax.cosine_decay_schedule`, which mixes a Python float and the int32 step count.)"""

    def schedule(count):
        frac = jnp.minimum(count.astype(jnp.float32) / max(steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def make_batches(seed: int, n: int, steps: int) -> np.ndarray:
    """`(steps, BATCH_SIZE)` indices, drawn without replacement within each epoch."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * BATCH_SIZE // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return order[: steps * BATCH_SIZE].reshape(steps, BATCH_SIZE)


def run(name, optimizer, lr, seed, data, steps, *, progress=True):
    """Train one (optimizer, lr, seed); return its per-step losses and final metrics."""
    (x_train, y_train), _, _, (x_all, y_all, splits) = data
    model = make_model(jax.random.PRNGKey(seed))
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = init_state(params, optimizer)
    lr_arr = jnp.asarray(lr, dtype=jnp.float32)
    batches = make_batches(seed, x_train.shape[0], steps)
    losses = np.empty(steps)
    t0 = time.perf_counter()
    bar = tqdm(batches, desc=f"{name} lr={lr:g} seed={seed}", disable=not progress,
               leave=False)
    for i, idx in enumerate(bar):
        idx = jnp.asarray(idx)
        params, opt_state, loss = train_step(
            params, opt_state, x_train[idx], y_train[idx], lr_arr, optimizer, static
        )
        losses[i] = float(loss)
        if i % 50 == 0:
            bar.set_postfix(loss=f"{losses[i]:.4f}")
    seconds = time.perf_counter() - t0
    # One evaluation of all three splits at once (one compiled shape).
    example_losses, hits = (np.asarray(a) for a in evaluate(params, static, x_all, y_all))
    return {
        "losses": losses,
        "train_loss": float(example_losses[splits == 0].mean()),
        "val_acc": float(hits[splits == 1].mean()),
        "test_acc": float(hits[splits == 2].mean()),
        "seconds": seconds,
    }


def plot(results: dict, names, out: str, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8.8, 3.6))
    window = max(1, min(20, steps // 10))
    for name in names:
        r = results[name]
        x = np.arange(window, len(r["losses"]) + 1)
        smooth = lambda a: np.convolve(a, np.ones(window) / window, mode="valid")
        (line,) = ax1.plot(x, smooth(r["losses"]), label=f"{name} (lr {r['best_lr']:g})")
        for losses in r.get("losses_seeds", []):  # each seed, thin
            ax1.plot(x, smooth(losses), color=line.get_color(), alpha=0.3, linewidth=0.7)
        lrs = sorted(r["sweep"])
        ax2.plot(lrs, [r["sweep"][lr]["val_acc"] for lr in lrs], marker="o", label=name)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title(f"train loss (minibatch, mean of {window} steps)", fontsize=10)
    ax2.set_xscale("log")
    ax2.set_xlabel("peak learning rate")
    ax2.set_title("validation accuracy after training", fontsize=10)
    for ax in (ax1, ax2):
        ax.legend()
    fig.suptitle("Digits CNN: PSGD-Kron vs Adam (best lr of each; bold: mean over seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(
    steps: int = 800,
    seeds: int = 3,
    lrs: tuple = LRS,
    out: str | None = "digits_cnn.png",
    progress: bool = True,
    optimizers: tuple = ("kron", "adam"),
) -> dict:
    """Sweep `lrs` for PSGD-Kron and Adam (or those of `optimizers`), `seeds` seeds each,
    `steps` steps per run.

    **Returns:** `{"kron": {...}, "adam": {...}, "compiles": int}`. Each optimizer's dict
    has `sweep` (lr -> mean over seeds of `train_loss`, `val_acc`, `test_acc`), `best_lr`
    (by mean validation accuracy, ties to the lower final train loss), and for that lr:
    `train_loss`, `val_acc`, `test_acc` (means over seeds), `test_acc_seeds`,
    `initial_loss` (first-step minibatch loss, mean over seeds), `losses` (per-step
    minibatch losses, mean over seeds; `losses_seeds`: each seed's), `seconds` (training
    wall time per run, mean over seeds) and `sweep_seconds` (all runs of this optimizer,
    compilation included). `compiles` counts the training step's compilations in this call.
    """
    data = load_data()
    traces0 = TRACES["step"]
    schedule = unit_cosine_schedule(steps)
    factories = {
        "kron": lambda: psgd_eqx.kron(learning_rate=schedule),
        "adam": lambda: optax.adam(learning_rate=schedule),
    }
    optimizers = {name: factories[name]() for name in optimizers}
    results = {}
    total = len(optimizers) * len(lrs) * seeds
    outer = tqdm(total=total, desc="runs", disable=not progress)
    for name, optimizer in optimizers.items():
        per_lr = {}
        for lr in lrs:
            per_lr[lr] = [
                run(name, optimizer, lr, seed, data, steps, progress=progress)
                for seed in range(seeds)
            ]
            outer.update(seeds)
        sweep = {
            lr: {k: float(np.mean([r[k] for r in rs]))
                 for k in ("train_loss", "val_acc", "test_acc")}
            for lr, rs in per_lr.items()
        }
        best_lr = max(lrs, key=lambda lr: (sweep[lr]["val_acc"], -sweep[lr]["train_loss"]))
        best = per_lr[best_lr]
        results[name] = {
            "sweep": sweep,
            "best_lr": best_lr,
            **sweep[best_lr],
            "test_acc_seeds": [r["test_acc"] for r in best],
            "initial_loss": float(np.mean([r["losses"][0] for r in best])),
            "losses": np.mean([r["losses"] for r in best], axis=0),
            "losses_seeds": [r["losses"] for r in best],
            "seconds": float(np.mean([r["seconds"] for r in best])),
            "sweep_seconds": float(sum(r["seconds"] for rs in per_lr.values() for r in rs)),
        }
    outer.close()
    results["compiles"] = TRACES["step"] - traces0

    print(f"digits CNN, {steps} steps of {BATCH_SIZE}, {seeds} seed(s); "
          f"lr chosen by validation accuracy")
    print(f"{'':>5} {'lr':>7} {'train loss':>10} {'val acc':>8} {'test acc':>8}")
    for name in optimizers:
        for lr, s in results[name]["sweep"].items():
            mark = " *" if lr == results[name]["best_lr"] else ""
            print(f"{name:>5} {lr:>7g} {s['train_loss']:>10.2e} {s['val_acc']:>8.4f} "
                  f"{s['test_acc']:>8.4f}{mark}")
    for name in optimizers:
        r = results[name]
        seeds_str = ", ".join(f"{a:.4f}" for a in r["test_acc_seeds"])
        print(f"{name:>5}: best lr {r['best_lr']:g}: test accuracy {r['test_acc']:.4f} "
              f"(seeds: {seeds_str}), train loss {r['train_loss']:.2e}; "
              f"{r['seconds']:.1f} s per run, {r['sweep_seconds']:.0f} s for the sweep")
    print(f"training step compiled {results['compiles']} time(s)")
    if out is not None:
        plot(results, list(optimizers), out, steps)
        print(f"loss curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800, help="training steps per run (800)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per learning rate (3)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS),
                        help=f"peak learning rates to sweep {LRS}")
    parser.add_argument("--out", default="digits_cnn.png",
                        help="where to save the loss-curve PNG")
    args = parser.parse_args()
    main(steps=args.steps, seeds=args.seeds, lrs=tuple(args.lrs), out=args.out)
