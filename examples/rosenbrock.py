"""Rosenbrock: PSGD with one dense Newton-type preconditioner on the 100-D Rosenbrock function.

Run with

    pip install -e ".[examples]" && python examples/rosenbrock.py [--steps N] [--out FILE]

The JAX counterpart of the reference's `hello_psgd.py` (github.com/lixilinx/psgd_torch):
f(x) = Σᵢ 100·(x₂ᵢ₊₁ − x₂ᵢ²)² + (1 − x₂ᵢ)² over 50 pairs, started from x = 0, minimised by
`psgd_eqx.dense` (the reference's `DenseNewton`: lr 1.0, preconditioner lr 0.5, momentum
0.9, no clipping) with the preconditioner fitted on an exact Hessian-vector product at
every step. The whole run is one `jax.lax.scan`, compiled once with the seed (which keys the
optimizer and the Hessian-vector probes) as an argument; it prints the first step with
f < 1e-6 per seed and saves the f-vs-step curves as a log-scale PNG.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd_eqx


DIM = 100
TARGET = 1e-6
# The reference's DenseNewton(lr_params=1.0, lr_preconditioner=0.5, momentum=0.9).
LR = 1.0
PRECONDITIONER_LR = 0.5
MOMENTUM = 0.9


def rosenbrock(x):
    """Σᵢ 100·(x₂ᵢ₊₁ − x₂ᵢ²)² + (1 − x₂ᵢ)²: minimum 0 at x = 1."""
    x1, x2 = x[0::2], x[1::2]
    return jnp.sum(100.0 * (x2 - x1 * x1) ** 2 + (1.0 - x1) ** 2)


def make_optimizer(key):
    """The reference's `DenseNewton` settings (geometry Q^0.5·E·Q^1.5, β_L 0.9, damping
    1e-9, no clipping, data-driven initial scale) with its momentum warm-up."""
    return psgd_eqx.dense(
        LR,
        preconditioner_lr=PRECONDITIONER_LR,
        b1=MOMENTUM,
        momentum_warmup=True,
        grad_clip_max_amp=None,
        grad_clip_max_element=None,
        key=key,
    )


@functools.cache
def trainer(steps: int, dim: int = DIM):
    """A compiled `seed -> f values` (before each step): minimise the `dim`-D Rosenbrock
    function from x = 0. The optimizer and the Hessian-vector probes are seeded by the
    (traced) int32 seed, so one compilation serves every seed."""

    def train(seed):
        k_opt, k_probes = jax.random.split(jax.random.PRNGKey(seed))
        optimizer = make_optimizer(k_opt)

        def step(carry, key):
            x, state = carry
            loss, grad, hvp, vector, refit = psgd_eqx.hessian_helper(key, rosenbrock, x)
            updates, state = optimizer.update(
                grad, state, x, Hvp=hvp, vector=vector, update_preconditioner=refit
            )
            return (optax.apply_updates(x, updates), state), loss

        x0 = jnp.zeros((dim,), jnp.float32)
        keys = jax.random.split(k_probes, steps)
        _, losses = jax.lax.scan(step, (x0, optimizer.init(x0)), keys)
        return losses

    return jax.jit(train).lower(jax.ShapeDtypeStruct((), jnp.int32)).compile()


def run(seed: int, steps: int, dim: int = DIM) -> np.ndarray:
    """The f values before each of `steps` steps of seed `seed` on the `dim`-D function."""
    return np.asarray(trainer(steps, dim)(jnp.int32(seed)))


def first_below(losses: np.ndarray, target: float = TARGET) -> int | None:
    """The first step whose f is below `target` (`None` if none is)."""
    hits = np.flatnonzero(losses < target)
    return int(hits[0]) if hits.size else None


def plot(curves: dict, out: str, dim: int = DIM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for seed, losses in curves.items():
        ax.semilogy(losses, label=f"seed {seed}")
    ax.axhline(TARGET, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$f(x)$")
    ax.set_title(f"{dim}-D Rosenbrock, psgd_eqx.dense (Newton-type fit)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(
    steps: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
    out: str | None = "rosenbrock.png",
    progress: bool = True,
    dim: int = DIM,
) -> dict:
    """Run every seed on the `dim`-D function (100 by default); print a table and save
    the curves.

    **Returns:** `{seed: {"losses", "first_below_1e-6", "final_loss", "seconds"}}`, with
    `losses` the f value before each step (a NumPy array) and `first_below_1e-6` the first
    step with f < 1e-6 (`None` if never), `seconds` the wall time of the seed's run (the
    run is compiled beforehand, but the first seed's time still includes some of XLA's
    first-execution work).
    """
    results = {}
    t0 = time.perf_counter()
    trainer(steps, dim)  # compile once for all seeds
    if progress:
        print(f"compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    for seed in seeds:
        t0 = time.perf_counter()
        losses = run(seed, steps, dim)
        seconds = time.perf_counter() - t0
        results[seed] = {
            "losses": losses,
            "first_below_1e-6": first_below(losses),
            "final_loss": float(losses[-1]),
            "seconds": seconds,
        }
        if progress:
            print(f"seed {seed} done in {seconds:.1f} s", flush=True)

    print(f"{'seed':>4}  {'first f < 1e-6':>14}  {'final f':>10}  {'time (s)':>8}")
    for seed, r in results.items():
        hit = r["first_below_1e-6"]
        print(
            f"{seed:>4}  {'never' if hit is None else hit:>14}  {r['final_loss']:>10.3g}  "
            f"{r['seconds']:>8.1f}"
        )
    if out is not None:
        plot({seed: r["losses"] for seed, r in results.items()}, out, dim)
        print(f"curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="iterations per seed (2000)")
    parser.add_argument("--out", default="rosenbrock.png", help="where to save the PNG")
    args = parser.parse_args()
    main(steps=args.steps, out=args.out)
