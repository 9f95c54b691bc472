"""Tensor rank decomposition: PSGD-LRA and PSGD-Kron Newton vs gradient descent.

Run with

    pip install -e ".[examples]" && python examples/tensor_decomposition.py [--steps N] [--out FILE]

The JAX counterpart of the reference's `demo_usage_of_all_preconditioners.py`
(github.com/lixilinx/psgd_torch): fit a rank-10 CP decomposition
T̂ᵢⱼₖ = Σᵣ xᵣᵢ yᵣⱼ zᵣₖ to a 20×50×100 tensor T that has an exact rank-10 decomposition
(T from standard-normal factors, the fit started from other standard-normal factors:
1,700 parameters), with loss ‖T − T̂‖². Compared, with the reference's settings:

- `psgd_eqx.lra` (the reference's `LRANewton`: rank 10, lr 0.5, preconditioner lr 0.2);
- `psgd_eqx.kron` (the reference's `KronNewton` with `preconditioner_max_skew=inf`: every
  factor dense, lr 0.2, preconditioner lr 0.1);
- plain gradient descent (lr 1e-4) as a baseline.

Both PSGD optimizers fit their preconditioner on an exact Hessian-vector product at every
step, with no momentum and no clipping (the reference's defaults for its Newton classes).
Without clipping the LRA fit diverges on about one random problem in ten (seed 0 is one):
it sits for hundreds of steps on a plateau of the CP loss, and when the iterate escapes,
the Newton step taken with the preconditioner fitted on the plateau overshoots and the
degree-6 loss blows up. The reference's algorithm does the same at a similar rate; its
trust-region option `grad_clip_max_norm` (here `update_global_norm_clip=`) prevents it.
A few problems also have plateaus that no method leaves within 2,000 steps.

Each method's run is one `lax.scan`, compiled once with the seed as an argument (the
target, the initial factors and the probes all derive from it). Prints the final loss per
method and seed and saves the loss curves as a log-scale PNG.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd_eqx


RANK, SHAPE = 10, (20, 50, 100)
TARGET = 1e-6
METHODS = ("lra", "kron", "gd")
LABELS = {"lra": "PSGD-LRA Newton", "kron": "PSGD-Kron Newton", "gd": "gradient descent"}


def make_problem(key, rank: int = RANK, shape: tuple[int, ...] = SHAPE):
    """The target tensor T (an exact rank-`rank` CP tensor) and the initial factors.

    Both the true factors and the initial guess are standard normal, `(rank, n)` each,
    as in the reference.
    """
    k_true, k_init = jax.random.split(key)
    truth = [
        jax.random.normal(k, (rank, n), jnp.float32)
        for k, n in zip(jax.random.split(k_true, len(shape)), shape)
    ]
    init = tuple(
        jax.random.normal(k, (rank, n), jnp.float32)
        for k, n in zip(jax.random.split(k_init, len(shape)), shape)
    )
    return reconstruct(truth), init


def reconstruct(factors):
    """T̂ᵢⱼₖ = Σᵣ xᵣᵢ yᵣⱼ zᵣₖ."""
    x, y, z = factors
    return jnp.einsum("ri,rj,rk->ijk", x, y, z)


def loss_fn(factors, target):
    """‖T − T̂‖² (a sum, not a mean, as in the reference)."""
    err = target - reconstruct(factors)
    return jnp.sum(err * err)


def make_optimizer(method: str, key):
    """The reference's settings for each method (`key` seeds the PSGD optimizer)."""
    if method == "lra":  # LRANewton(lr_params=0.5, lr_preconditioner=0.2)
        return psgd_eqx.lra(0.5, rank=10, b1=0.0, preconditioner_lr=0.2, key=key)
    if method == "kron":  # KronNewton(preconditioner_max_skew=inf, lr 0.2, precond lr 0.1)
        return psgd_eqx.kron(
            0.2,
            b1=0.0,
            preconditioner_lr=0.1,
            max_size_triangular=float("inf"),
            max_skew_triangular=float("inf"),
            grad_clip_max_amp=None,  # the reference's grad_clip_max_norm=inf
            grad_clip_max_element=None,
            key=key,
        )
    if method == "gd":  # torch.optim.SGD(lr=1e-4)
        return optax.sgd(1e-4)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


@functools.cache
def trainer(method: str, steps: int, rank: int = RANK, shape: tuple[int, ...] = SHAPE):
    """A compiled `seed -> losses` (the loss before each step) for one method: the problem,
    the optimizer and the probes all derive from the (traced) int32 seed, so the run is
    compiled once per method and reused for every seed."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
    newton = method != "gd"

    def train(seed):
        key = jax.random.PRNGKey(seed)
        k_problem, k_opt, k_probes = jax.random.split(key, 3)
        target, params = make_problem(k_problem, rank, shape)
        optimizer = make_optimizer(method, k_opt)

        def step(carry, k):
            params, state = carry
            if newton:
                loss, grad, hvp, vector, refit = psgd_eqx.hessian_helper(
                    k, loss_fn, params, loss_fn_extra_args=(target,)
                )
                updates, state = optimizer.update(
                    grad, state, params, Hvp=hvp, vector=vector, update_preconditioner=refit
                )
            else:
                loss, grad = jax.value_and_grad(loss_fn)(params, target)
                updates, state = optimizer.update(grad, state, params)
            return (optax.apply_updates(params, updates), state), loss

        keys = jax.random.split(k_probes, steps)
        _, losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
        return losses

    return jax.jit(train).lower(jax.ShapeDtypeStruct((), jnp.int32)).compile()


def run(
    method: str, seed: int, steps: int, rank: int = RANK, shape: tuple[int, ...] = SHAPE
) -> np.ndarray:
    """Fit the rank-`rank` decomposition of seed `seed`'s tensor with `method`; return
    the loss before each step."""
    return np.asarray(trainer(method, steps, rank, tuple(shape))(jnp.int32(seed)))


def plot(results: dict, out: str, rank: int = RANK, shape: tuple[int, ...] = SHAPE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 4.0))
    colors = dict(zip(METHODS, ("C0", "C1", "C2")))
    styles = ("-", "--", ":")
    top = 0.0
    for method, per_seed in results.items():
        for i, (seed, r) in enumerate(per_seed.items()):
            diverged = not np.isfinite(r["losses"][-1])
            ax.semilogy(
                r["losses"],
                color=colors[method],
                linewidth=1.0,
                linestyle=styles[i % len(styles)],
                label=f"{LABELS[method]}, seed {seed}" + (" (diverged)" if diverged else ""),
            )
            top = max(top, float(r["losses"][0]))
    if top > 0:
        ax.set_ylim(top=10 * top)  # a diverging run would stretch the axis to 1e30
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$\|T - \hat T\|^2$")
    ax.set_title(f"Rank-{rank} decomposition of a {'×'.join(map(str, shape))} tensor")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(
    steps: int = 2000,
    seeds: tuple[int, ...] = (0, 1, 2),
    out: str | None = "tensor_decomposition.png",
    progress: bool = True,
    methods: tuple[str, ...] = METHODS,
    rank: int = RANK,
    shape: tuple[int, ...] = SHAPE,
) -> dict:
    """Run every method on every seed; print a table and save the curves.

    `rank` and `shape` set the problem's size (the demo's 10 and 20×50×100 by default).

    **Returns:** `{method: {seed: {"losses", "final_loss", "first_below_1e-6",
    "seconds"}}}`, with `losses` the loss before each step (a NumPy array),
    `first_below_1e-6` the first step with loss < 1e-6 (`None` if never) and `seconds` the
    wall time of the run (compiled beforehand, once per method, but the first seed's time
    still includes some of XLA's first-execution work).
    """
    results = {}
    for method in methods:
        results[method] = {}
        t0 = time.perf_counter()
        trainer(method, steps, rank, tuple(shape))  # compile once for all seeds
        if progress:
            print(f"{method}: compiled in {time.perf_counter() - t0:.1f} s", flush=True)
        for seed in seeds:
            t0 = time.perf_counter()
            losses = run(method, seed, steps, rank, shape)
            seconds = time.perf_counter() - t0
            hits = np.flatnonzero(losses < TARGET)
            results[method][seed] = {
                "losses": losses,
                "final_loss": float(losses[-1]),
                "first_below_1e-6": int(hits[0]) if hits.size else None,
                "seconds": seconds,
            }
            if progress:
                print(f"{method} seed {seed}: {losses[-1]:.3g} ({seconds:.1f} s)", flush=True)

    print(f"{'method':>18}  {'seed':>4}  {'final loss':>10}  {'first < 1e-6':>12}  {'time (s)':>8}")
    for method, per_seed in results.items():
        for seed, r in per_seed.items():
            hit = r["first_below_1e-6"]
            print(
                f"{LABELS[method]:>18}  {seed:>4}  {r['final_loss']:>10.3g}  "
                f"{'never' if hit is None else hit:>12}  {r['seconds']:>8.1f}"
            )
    if out is not None:
        plot(results, out, rank, tuple(shape))
        print(f"loss curves saved to {out}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="iterations per run (2000)")
    parser.add_argument("--out", default="tensor_decomposition.png", help="where to save the PNG")
    args = parser.parse_args()
    main(steps=args.steps, out=args.out)
