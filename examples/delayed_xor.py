"""Delayed XOR: a small tanh RNN trained with PSGD-Kron and with Adam, with lr sweeps.

Run with

    pip install -e ".[examples]" && python examples/delayed_xor.py [--steps N] [--out FILE]
        [--optimizers NAME ...] [--seq-len T]

The JAX counterpart of the reference's `rnn_xor_problem_general_purpose_preconditioner.py`
(github.com/lixilinx/psgd_torch), the delayed-XOR problem of the LSTM paper. Each sample is
a sequence of `SEQ_LEN` random ±1 signs with two positions marked on a second input channel,
the first in the first 10 % of the sequence and the second in the next 40 %; the target is
the XOR of the two marked signs, read from the RNN's last hidden state through the logistic
loss mean(−log σ(y·f(x))). A model that has not learned to carry the marked signs to the end
of the sequence predicts nothing better than chance: loss ln 2 ≈ 0.693. The run counts as
solved when the 20-step mean of the minibatch loss drops below 0.1 (the reference stops at
the first minibatch below 0.1).

The model is the reference's: h ← tanh(x·Wx + h·Wh + b) with 30 hidden units, an orthogonal
initial Wh, and a linear read-out of the last h. The reference's sequences have 16 steps;
this demo uses 32 by default, because at 16 steps Adam solves the problem too (at 24 steps
Adam with lr 1e-3 still does).

The optimizers, each with a learning-rate sweep over the same seeds (a seed fixes the
initialisation and the stream of minibatches, the same for every optimizer and lr):

- `kron`: `psgd_eqx.kron` whitening the gradient, with the reference's `KronWhiten`
  settings (preconditioner lr 0.01, initial scale 1, refit every step, no momentum);
- `adam`: `optax.adam`;
- `kron_newton` (not in the default sweep: `--optimizers kron adam kron_newton`): the same
  Kron preconditioner fitted on Hessian-vector products from `psgd_eqx.hessian_helper` (the
  Newton-type fit of the reference's LSTM version of this demo), several times the cost of
  a whitening step.

All the (lr, seed) runs of one optimizer advance together, `vmap`ped, in compiled chunks of
`jax.lax.scan` steps (the minibatches are drawn inside the scan). The script prints the
sweep and a table (best lr per optimizer, final loss, step at which each seed solved the
problem, wall time) and saves the loss curves of each optimizer's best lr.
"""

import argparse
import functools
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import psgd_eqx


BATCH_SIZE = 128
SEQ_LEN = 32
HIDDEN = 30
TARGET = 0.1
WINDOW = 20  # minibatch losses averaged by the "solved" test
FINAL_WINDOW = 100  # minibatch losses averaged into the reported final loss
CHUNK = 250  # steps per compiled chunk (the progress bar advances by chunks)
# Learning rates swept per optimizer (same steps, same seeds for all).
LRS = {
    "kron": (2e-4, 5e-4, 1e-3, 2e-3),
    "adam": (1e-4, 3e-4, 1e-3, 3e-3),
}
NEWTON_LRS = (3e-3, 1e-2, 3e-2)
SEEDS = (0, 1)
# The reference's KronWhiten(preconditioner_init_scale=1.0, lr_preconditioner=0.01).
PRECONDITIONER_LR = 0.01
PRECONDITIONER_INIT_SCALE = 1.0
# XLA options of the compiled programs (`jax.jit(..., compiler_options=...)`); the smoke
# tests set {"xla_backend_optimization_level": 0}, which halves the compile time.
COMPILER_OPTIONS: dict | None = None


class RNN(eqx.Module):
    """h ← tanh(x·Wx + h·Wh + b) over the sequence, then the logit h·w + c of the last h."""

    w_x: jax.Array
    w_h: jax.Array
    b_h: jax.Array
    w_out: jax.Array
    b_out: jax.Array

    def __init__(self, key, dim_in: int = 2, hidden: int = HIDDEN):
        k_x, k_h, k_out = jax.random.split(key, 3)
        self.w_x = 0.1 * jax.random.normal(k_x, (dim_in, hidden))
        # A random orthogonal recurrent matrix, as the reference.
        self.w_h, _ = jnp.linalg.qr(jax.random.normal(k_h, (hidden, hidden)))
        self.b_h = jnp.zeros((hidden,))
        self.w_out = 0.1 * jax.random.normal(k_out, (hidden, 1))
        self.b_out = jnp.zeros(())

    def __call__(self, xs):
        """`xs`: (seq_len, batch, dim_in) → logits (batch,)."""
        h0 = jnp.zeros((xs.shape[1], self.w_h.shape[0]), xs.dtype)

        def cell(h, x):
            return jnp.tanh(x @ self.w_x + h @ self.w_h + self.b_h[None, :]), None

        h, _ = jax.lax.scan(cell, h0, xs)
        return (h @ self.w_out)[:, 0] + self.b_out


def make_batch(key, seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE):
    """Random ±1 signs on channel 0; channel 1 marks a position i1 in [0, 0.1·T) and a
    position i2 in [0.1·T, 0.5·T) (they may coincide for short sequences); the label is +1
    if the two marked signs differ, −1 if they agree. Returns `xs` (seq_len, batch, 2) and
    `ys` (batch,)."""
    k_sign, k_1, k_2 = jax.random.split(key, 3)
    signs = jnp.where(jax.random.bernoulli(k_sign, 0.5, (batch_size, seq_len)), 1.0, -1.0)
    i1 = jnp.floor(jax.random.uniform(k_1, (batch_size,)) * (0.1 * seq_len))
    i2 = jnp.floor(jax.random.uniform(k_2, (batch_size,)) * (0.4 * seq_len) + 0.1 * seq_len)
    i1, i2 = i1.astype(jnp.int32), i2.astype(jnp.int32)
    positions = jnp.arange(seq_len)[None, :]
    marks = (positions == i1[:, None]) | (positions == i2[:, None])
    rows = jnp.arange(batch_size)
    ys = jnp.where(signs[rows, i1] == signs[rows, i2], -1.0, 1.0)
    xs = jnp.stack([signs, marks.astype(signs.dtype)], axis=-1).transpose(1, 0, 2)
    return xs, ys


def loss_fn(model: RNN, xs, ys):
    """The logistic loss mean(−log σ(y·f(x))) = mean(softplus(−y·f(x)))."""
    return jnp.mean(jax.nn.softplus(-ys * model(xs)))


# The refit schedules compared in the *Diagnostics and refits* guide: the reference refits
# every step; kron's default anneal; the adaptive schedule.
REFITS = {"kron": 1.0, "kron_newton": 1.0,
          "kron_anneal": psgd_eqx.precond_update_prob_schedule(),
          "kron_adaptive": psgd_eqx.adaptive_refit_schedule()}


def make_optimizer(name: str, lr):
    """`adam`, or `kron` / `kron_newton` with the reference's KronWhiten settings
    (`kron_anneal` / `kron_adaptive`: the same with another refit schedule)."""
    if name == "adam":
        return optax.adam(lr)
    if name in REFITS:
        return psgd_eqx.kron(
            lr,
            b1=0.0,
            preconditioner_lr=PRECONDITIONER_LR,
            preconditioner_init_scale=PRECONDITIONER_INIT_SCALE,
            preconditioner_update_probability=REFITS[name],
        )
    raise ValueError(f"unknown optimizer {name!r}")


def _keys(seed):
    """(model, minibatches, Hessian-vector probes) keys of a seed."""
    return jax.random.split(jax.random.PRNGKey(seed), 3)


@functools.cache
def initialiser(name: str):
    """A compiled `(lrs, seeds) -> (params, opt_states)`, `vmap`ped over the runs."""

    def init(lr, seed):
        params = RNN(_keys(seed)[0])
        return params, make_optimizer(name, lr).init(params)

    return jax.jit(jax.vmap(init), compiler_options=COMPILER_OPTIONS)


@functools.cache
def chunk_runner(name: str, length: int, seq_len: int = SEQ_LEN):
    """A compiled `(lrs, seeds, params, states, start) -> (params, states, losses)` that
    runs steps `start, …, start + length − 1` of every run (`vmap`ped): `losses` (runs,
    length) are the minibatch losses before each step. Step t's minibatch and probe are
    keyed by (seed, t), so the chunking does not change the run."""

    def run(lr, seed, params, state, start):
        optimizer = make_optimizer(name, lr)
        _, k_data, k_probe = _keys(seed)

        def step(carry, t):
            params, state = carry
            xs, ys = make_batch(jax.random.fold_in(k_data, t), seq_len)
            if name == "kron_newton":
                loss, grad, hvp, vector, refit = psgd_eqx.hessian_helper(
                    jax.random.fold_in(k_probe, t), loss_fn, params, (xs, ys)
                )
                updates, state = optimizer.update(
                    grad, state, params, Hvp=hvp, vector=vector, update_preconditioner=refit
                )
            else:
                loss, grad = jax.value_and_grad(loss_fn)(params, xs, ys)
                updates, state = optimizer.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), loss

        ts = start + jnp.arange(length, dtype=jnp.int32)
        (params, state), losses = jax.lax.scan(step, (params, state), ts)
        return params, state, losses

    return jax.jit(
        jax.vmap(run, in_axes=(0, 0, 0, 0, None)), compiler_options=COMPILER_OPTIONS
    )


def sweep(
    name: str,
    lrs,
    seeds,
    steps: int,
    seq_len: int = SEQ_LEN,
    progress: bool = True,
) -> np.ndarray:
    """Minibatch losses (len(lrs), len(seeds), steps) of every (lr, seed) run."""
    grid_lrs = jnp.asarray([lr for lr in lrs for _ in seeds], jnp.float32)
    grid_seeds = jnp.asarray([seed for _ in lrs for seed in seeds], jnp.int32)
    params, states = initialiser(name)(grid_lrs, grid_seeds)
    chunks, start = [], 0
    with tqdm(total=steps, desc=name, disable=not progress, leave=True) as bar:
        while start < steps:
            length = min(CHUNK, steps - start)
            params, states, losses = chunk_runner(name, length, seq_len)(
                grid_lrs, grid_seeds, params, states, jnp.int32(start)
            )
            chunks.append(np.asarray(losses))
            start += length
            bar.update(length)
            bar.set_postfix(lowest_run_loss=f"{chunks[-1][:, -WINDOW:].mean(1).min():.3f}")
    return np.concatenate(chunks, axis=1).reshape(len(lrs), len(seeds), steps)


def first_below(losses: np.ndarray, target: float = TARGET, window: int = WINDOW) -> int | None:
    """The first step at which the mean of the last `window` minibatch losses is below
    `target` (`None` if never)."""
    if len(losses) < window:
        return None
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    hits = np.flatnonzero(smooth < target)
    return int(hits[0]) + window - 1 if hits.size else None


def _summary(losses: np.ndarray) -> dict:
    """Per-seed numbers of one lr: `losses` (seeds, steps)."""
    hits = [first_below(run) for run in losses]
    finals = [float(np.mean(run[-FINAL_WINDOW:])) for run in losses]
    return {
        "final_loss": float(np.mean(finals)),
        "final_loss_per_seed": finals,
        "first_below": hits,
        "solved": sum(h is not None for h in hits),
    }


def _rank(summary: dict, steps: int):
    """Best first: most seeds solved, then earliest mean solve step, then lowest loss."""
    mean_hit = np.mean([steps if h is None else h for h in summary["first_below"]])
    return (-summary["solved"], mean_hit, summary["final_loss"])


def plot(curves: dict, out: str, seq_len: int = SEQ_LEN) -> None:
    """`curves`: {label: (seeds, steps) losses}; one colour per label, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    window = 50
    for i, (label, runs) in enumerate(curves.items()):
        for j, losses in enumerate(runs):
            w = min(window, len(losses))
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(
                np.arange(w - 1, len(losses)),
                smooth,
                color=f"C{i}",
                linestyle=("-", "--", ":", "-.")[j % 4],
                linewidth=1.2,
                label=label if j == 0 else None,
            )
    ax.axhline(math.log(2.0), color="grey", linestyle=":", linewidth=0.8, label="ln 2 (chance)")
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=0.8, label=f"{TARGET} (solved)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"minibatch loss ({window}-step mean)")
    ax.set_title(f"Delayed XOR, tanh RNN, length {seq_len} (one line per seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(
    steps: int = 6000,
    out: str | None = "delayed_xor.png",
    progress: bool = True,
    lrs: dict | None = None,
    seeds: tuple[int, ...] = SEEDS,
    seq_len: int = SEQ_LEN,
) -> dict:
    """Sweep the lrs of each optimizer in `lrs` (default `LRS`: `kron` and `adam`) over
    `seeds`; print the sweep and a table, and save the best lr's curves of each optimizer.

    **Returns:** `{name: {"best_lr", "final_loss", "final_loss_per_seed", "first_below",
    "solved", "seconds", "losses", "sweep"}}`: for the best lr (most seeds solved, then
    earliest mean solve step, then lowest final loss), `final_loss` the mean over seeds of
    the last 100 minibatch losses, `first_below` each seed's first step with the 20-step
    mean loss below 0.1 (`None` if never), `solved` how many seeds got there, `losses` the
    minibatch losses (seeds, steps); `sweep` `{lr: {...}}` the same numbers for every lr;
    `seconds` the wall time of the optimizer's whole sweep (compilation included).
    """
    lrs = LRS if lrs is None else lrs
    results = {}
    for name, grid in lrs.items():
        t0 = time.perf_counter()
        losses = sweep(name, grid, seeds, steps, seq_len, progress)
        seconds = time.perf_counter() - t0
        summaries = {lr: _summary(run) for lr, run in zip(grid, losses)}
        best = min(range(len(grid)), key=lambda i: _rank(summaries[grid[i]], steps))
        results[name] = {
            "best_lr": grid[best],
            **summaries[grid[best]],
            "seconds": seconds,
            "losses": losses[best],
            "sweep": summaries,
        }

    def row(name, lr, summary):
        per_seed = ", ".join(f"{v:.4f}" for v in summary["final_loss_per_seed"])
        hits = ", ".join("never" if h is None else str(h) for h in summary["first_below"])
        return (
            f"{name:>11}  {lr:>7g}  {summary['final_loss']:>10.4f}  {per_seed:>16}  "
            f"{hits:>14}  {summary['solved']:>3}/{len(seeds):<2}"
        )

    header = (
        f"{'optimizer':>11}  {'lr':>7}  {'final loss':>10}  {'per seed':>16}  "
        f"{'step loss<0.1':>14}  {'solved':>6}"
    )
    print(f"delayed XOR, sequence length {seq_len}, {steps} steps, seeds {tuple(seeds)}")
    print(header)
    for name, r in results.items():
        for lr, summary in r["sweep"].items():
            print(row(name, lr, summary))
    print("best lr per optimizer:")
    print(f"{header}  {'time (s)':>8}")
    for name, r in results.items():
        print(f"{row(name, r['best_lr'], r)}  {r['seconds']:>8.1f}")
    if out is not None:
        plot(
            {f"{name} (lr {r['best_lr']:g})": r["losses"] for name, r in results.items()},
            out,
            seq_len,
        )
        print(f"loss curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000, help="steps per run (6000)")
    parser.add_argument("--out", default="delayed_xor.png", help="where to save the PNG")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=("kron", "adam", "kron_newton"),
        default=list(LRS),
        help="the optimizers to sweep (kron adam)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=SEQ_LEN, help=f"sequence length ({SEQ_LEN})"
    )
    args = parser.parse_args()
    all_lrs = {**LRS, "kron_newton": NEWTON_LRS}
    main(
        steps=args.steps,
        out=args.out,
        lrs={name: all_lrs[name] for name in args.optimizers},
        seq_len=args.seq_len,
    )
