"""Pairwise logistic regression: PSGD-Kron vs Adam vs L-BFGS on a large, badly conditioned
convex problem, with lr sweeps.

Run with

    pip install -e ".[examples]" && python examples/pairwise_logistic.py [--steps N] [--out FILE]

The JAX counterpart of the reference's `misc/mnist_logistic_regression.py`
(github.com/lixilinx/psgd_torch), scaled to a CPU: a linear softmax model on the pixels of
scikit-learn's digits (8×8 images, 1,797 samples; nothing is downloaded) and on all their
pairwise products xᵢ·xⱼ, i ≤ j: 64 + 2,080 = 2,144 features, 10 classes, 21,450
parameters. The products of standardised pixels are strongly correlated and of very
different scales, so the problem is badly conditioned. With more features than training
samples the data are separable and the plain cross-entropy has no minimiser, so the
objective adds a small ridge penalty (λ/2)·‖W‖², λ = `L2`.

Every optimizer runs full batch (the 75 % training split) from zero weights, for the same
number of steps:

- `kron`: `psgd_eqx.kron` whitening the gradient (the reference's `KronWhiten` without
  momentum);
- `kron_newton`: the same preconditioner fitted on exact Hessian-vector products from
  `psgd_eqx.hessian_helper` (a Newton-type fit, as the reference's `LRA` in this demo);
- `adam`: `optax.adam`;
- `lbfgs`: `optax.lbfgs` (memory 10) with its zoom line search, no learning rate; a step
  may evaluate the gradient several times (the table counts the evaluations).

Both PSGD variants cut the weight matrix's 2,144-long axis into dense blocks of at most
`BLOCK_SIZE` (`partition_grads_into_blocks`), so the preconditioner sees the correlations
between features within a block (by default that axis would get a diagonal factor). The
runs of one optimizer over its learning rates are one `jax.lax.scan`, `vmap`ped over the lrs
and compiled once. The script prints each sweep and a table (best lr per optimizer by final
training objective, final objective, test accuracy, wall time) and saves the best runs'
curves.
"""

import argparse
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

import psgd_eqx


N_CLASSES = 10
BLOCK_SIZE = 128
# Learning rates swept per optimizer (L-BFGS has none: its line search sets the step).
LRS = {
    "kron": (3e-4, 1e-3, 3e-3, 1e-2),
    "kron_newton": (0.03, 0.1, 0.3),
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
}
SEED = 0
L2 = 1e-4
# XLA options of the compiled programs (`jax.jit(..., compiler_options=...)`); the smoke
# tests set {"xla_backend_optimization_level": 0}, which halves the compile time.
COMPILER_OPTIONS: dict | None = None


def pairwise_features(x: np.ndarray) -> np.ndarray:
    """[x, (xᵢ·xⱼ)_{i ≤ j}]: the pixels followed by all their pairwise products."""
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([x, x[:, i] * x[:, j]], axis=1)


def load_data(seed: int = SEED):
    """Digits, split 75/25, pixels standardised with the training split's statistics, then
    expanded with `pairwise_features` (the products are not rescaled)."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)
    x_train = pairwise_features(scaler.transform(x_train)).astype(np.float32)
    x_test = pairwise_features(scaler.transform(x_test)).astype(np.float32)
    return (
        jnp.asarray(x_train),
        jnp.asarray(y_train, dtype=jnp.int32),
        jnp.asarray(x_test),
        jnp.asarray(y_test, dtype=jnp.int32),
    )


def init_params(n_features: int) -> dict:
    """Zero weights and biases, as the reference."""
    return {
        "w": jnp.zeros((n_features, N_CLASSES), jnp.float32),
        "b": jnp.zeros((N_CLASSES,), jnp.float32),
    }


def loss_fn(params: dict, x, y):
    """Mean softmax cross-entropy of the linear model x·W + b, plus (λ/2)·‖W‖²."""
    logits = x @ params["w"] + params["b"][None, :]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * L2 * jnp.sum(params["w"] ** 2)


def accuracy(params: dict, x, y):
    logits = x @ params["w"] + params["b"][None, :]
    return jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))


def make_optimizer(name: str, lr=None):
    """`kron` (whitening), `kron_newton` (Newton-type fit), `adam` or `lbfgs` (no lr)."""
    if name == "adam":
        return optax.adam(lr)
    if name in ("kron", "kron_newton"):
        # No momentum, as the reference's KronWhiten and LRA defaults; the 2,144-long
        # axis in dense blocks (the default would give it a diagonal factor).
        return psgd_eqx.kron(
            lr,
            b1=0.0,
            max_size_triangular=BLOCK_SIZE,
            max_skew_triangular=math.inf,
            partition_grads_into_blocks=True,
            block_size=BLOCK_SIZE,
            preconditioner_update_probability=1.0,
        )
    if name == "lbfgs":
        return optax.lbfgs()
    raise ValueError(f"unknown optimizer {name!r}")


@functools.cache
def trainer(name: str, steps: int):
    """A compiled `(lrs, seed, x_train, y_train, x_test, y_test) -> (losses, evals,
    test_acc)`: one full-batch run per lr (`vmap`ped; L-BFGS ignores the lr); `losses`
    (runs, steps) the training objective before each step, `evals` (runs, steps) the
    evaluations of each step (one gradient; two for `kron_newton`, a gradient and a
    Hessian-vector product; for L-BFGS those of its line search, which also gives the next
    step's gradient), `test_acc` after the last step. `seed` keys the Hessian-vector
    probes."""

    def train(lr, seed, x, y, x_test, y_test):
        params = init_params(x.shape[1])
        optimizer = make_optimizer(name, lr)

        def objective(p):
            return loss_fn(p, x, y)

        def step(carry, key):
            params, state = carry
            if name == "lbfgs":
                value, grad = optax.value_and_grad_from_state(objective)(params, state=state)
                updates, state = optimizer.update(
                    grad, state, params, value=value, grad=grad, value_fn=objective
                )
                evals = optax.tree.get(state, "num_linesearch_steps")
            elif name == "kron_newton":
                value, grad, hvp, vector, refit = psgd_eqx.hessian_helper(
                    key, objective, params
                )
                updates, state = optimizer.update(
                    grad, state, params, Hvp=hvp, vector=vector, update_preconditioner=refit
                )
                evals = jnp.asarray(2, jnp.int32)
            else:
                value, grad = jax.value_and_grad(objective)(params)
                updates, state = optimizer.update(grad, state, params)
                evals = jnp.asarray(1, jnp.int32)
            return (optax.apply_updates(params, updates), state), (value, evals)

        keys = jax.random.split(jax.random.PRNGKey(seed), steps)
        (params, _), (losses, evals) = jax.lax.scan(
            step, (params, optimizer.init(params)), keys
        )
        if name == "lbfgs":  # the first step's gradient, outside the line search
            evals = evals.at[0].add(1)
        return losses, evals, accuracy(params, x_test, y_test)

    return jax.jit(
        jax.vmap(train, in_axes=(0, None, None, None, None, None)),
        compiler_options=COMPILER_OPTIONS,
    )


def plot(curves: dict, reference: float, out: str) -> None:
    """`curves`: {label: objective per step}, drawn as the gap to `reference` (log scale;
    the points at or below it are not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, losses in curves.items():
        gap = losses - reference
        ax.semilogy(np.where(gap > 0, gap, np.nan), label=label)
    ax.set_xlabel("step (full batch)")
    ax.set_ylabel(r"$f - f_{\min}$")
    ax.set_title(
        "Digits, pixels + pairwise products, softmax regression\n"
        r"$f$: training cross-entropy + $\lambda/2\,\|W\|^2$; $f_{\min}$: lowest $f$ of any run",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def first_within(losses: np.ndarray, reference: float, rel: float = 0.1) -> int | None:
    """The first step whose objective is within `rel` of `reference` (`None` if none is)."""
    hits = np.flatnonzero(losses <= (1.0 + rel) * reference)
    return int(hits[0]) if hits.size else None


def main(
    steps: int = 200,
    out: str | None = "pairwise_logistic.png",
    progress: bool = True,
    lrs: dict | None = None,
    seed: int = SEED,
    lbfgs: bool = True,
) -> dict:
    """Sweep the lrs of the optimizers in `lrs` (default `LRS`: `kron`, `kron_newton`,
    `adam`) and, if `lbfgs`, run L-BFGS, all for `steps` full-batch steps; print the sweeps
    and a table, and save the best runs' curves. `seed` picks the train/test split and the
    Hessian-vector probes.

    **Returns:** `{name: {"best_lr", "final_loss", "test_acc", "evals", "seconds",
    "losses", "step_within_10pct", "evals_within_10pct", "sweep"}}` per optimizer
    (`best_lr` `None` for L-BFGS): the best run's numbers (by final training objective),
    `losses` its objective before each step (a NumPy array), `evals` its evaluations in all
    (see `trainer`), `step_within_10pct` / `evals_within_10pct` the first step within 10 %
    of the lowest objective any run reached and the evaluations spent before it (`None` if
    never), `sweep` `{lr: (final_loss, test_acc)}` over every lr tried, `seconds` the wall
    time of the optimizer's whole sweep (compilation included).
    """
    lrs = LRS if lrs is None else lrs
    data = load_data(seed)
    print(f"{data[0].shape[0]} training samples, {data[0].shape[1]} features", flush=True)
    results = {}
    names = (*lrs, "lbfgs") if lbfgs else tuple(lrs)
    for name in tqdm(names, desc="optimizers", disable=not progress):
        grid = tuple(lrs.get(name, (0.0,)))
        t0 = time.perf_counter()
        losses, evals, test_acc = trainer(name, steps)(
            jnp.asarray(grid, jnp.float32), jnp.int32(seed), *data
        )
        losses, evals, test_acc = np.asarray(losses), np.asarray(evals), np.asarray(test_acc)
        seconds = time.perf_counter() - t0
        final = np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)
        best = int(np.argmin(final))
        results[name] = {
            "best_lr": None if name == "lbfgs" else grid[best],
            "final_loss": float(losses[best, -1]),
            "test_acc": float(test_acc[best]),
            "evals": int(evals[best].sum()),
            "cumulative_evals": np.cumsum(evals[best]),
            "seconds": seconds,
            "losses": losses[best],
            "sweep": {lr: (float(losses[i, -1]), float(test_acc[i])) for i, lr in enumerate(grid)},
        }
        if name != "lbfgs":
            sweep = ", ".join(
                f"lr {lr:g}: {loss:.5g} ({acc:.4f})"
                for lr, (loss, acc) in results[name]["sweep"].items()
            )
            tqdm.write(f"{name} sweep, final objective (test accuracy): {sweep}")

    reference = min(float(np.nanmin(r["losses"])) for r in results.values())
    for r in results.values():
        hit = first_within(r["losses"], reference)
        r["step_within_10pct"] = hit
        # evaluations spent on the steps before `hit` (the objective at `hit` is evaluated
        # by step `hit` itself)
        r["evals_within_10pct"] = (
            None if hit is None else int(r["cumulative_evals"][hit - 1]) if hit else 0
        )
        del r["cumulative_evals"]
    print(
        f"pairwise logistic regression, {steps} full-batch steps, split seed {seed}; lowest "
        f"objective of any run f_min = {reference:.5g}"
    )
    print(
        f"{'optimizer':>11}  {'best lr':>7}  {'final f':>9}  {'step f<1.1·f_min':>16}  "
        f"{'evals then':>10}  {'evals':>5}  {'test acc':>8}  {'time (s)':>8}"
    )
    for name, r in results.items():
        lr = "-" if r["best_lr"] is None else f"{r['best_lr']:g}"
        hit, hit_evals = r["step_within_10pct"], r["evals_within_10pct"]
        print(
            f"{name:>11}  {lr:>7}  {r['final_loss']:>9.5g}  "
            f"{'never' if hit is None else hit:>16}  "
            f"{'-' if hit_evals is None else hit_evals:>10}  {r['evals']:>5}  "
            f"{r['test_acc']:>8.4f}  {r['seconds']:>8.1f}"
        )
    if out is not None:
        plot(
            {
                name if r["best_lr"] is None else f"{name} (lr {r['best_lr']:g})": r["losses"]
                for name, r in results.items()
            },
            reference,
            out,
        )
        print(f"loss curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="full-batch steps (200)")
    parser.add_argument(
        "--out", default="pairwise_logistic.png", help="where to save the loss-curve PNG"
    )
    args = parser.parse_args()
    main(steps=args.steps, out=args.out)
