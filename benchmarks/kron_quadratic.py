"""An ill-conditioned quadratic with Kronecker-structured curvature: psgd_eqx, psgdax, Adam.

W ∈ R^{64×32}, b ∈ R^{32}; loss = 0.5·mean((A(W − W*)B)²) + 0.5·mean((b − 1)²) with A, B
random SPD, cond(AᵀA) = cond(BBᵀ) = 1e3 (a Kronecker-structured Hessian of cond ≈ 1e6 on W);
stochastic gradient = exact gradient + 10% of its std as Gaussian noise; 1,500 steps in one
`lax.scan` (keys = split(PRNGKey(1), 1500)); lr grid {3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1};
reported: the best lr by final loss (mean exact loss over the last 100 steps), the exact
loss after 500 steps, and µs/step of the best-lr run (median of interleaved repetitions of
the compiled 1,500-step scan, noisy-gradient computation included).

Optimizers: optax.adam; psgdax.kron (Q0.5EQ1.5, EQ, QUAD; prob 1.0; its defaults, i.e.
max_skew_triangular=1.0, so the 64-axis of W gets a *diagonal* factor, and again with
max_skew_triangular=∞); psgd_eqx.kron for every geometry at prob 1.0 with (i) its defaults
(max_skew_triangular=∞: both W axes dense) and (ii) psgdax's structure rule
(max_skew_triangular=1.0). Same structure rule ⇒ directly comparable rows. With `--ablate`
(on by default in the full run) also psgd_eqx rows with psgdax's remaining defaults switched
on one at a time and all together (momentum warm-up, RMS clip 1.0 without element clip,
Bernoulli refit draws), to attribute any gap.

Usage:

    python benchmarks/kron_quadratic.py            # full grid (several minutes on 2 cores)
    python benchmarks/kron_quadratic.py --quick    # lrs {1e-3, 3e-3, 3e-2}, no ablations
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import lib_commit

import psgd_eqx


try:
    import psgdax
except ImportError:  # pragma: no cover
    psgdax = None


M, N = 64, 32
STEPS = 1500
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_QUICK = (1e-3, 3e-3, 3e-2)
GEOMETRIES = ("EQ", "QEQ", "QEP", "PRO", "QUAD")


# --------------------------------------------------------------------------- problem


def ill(k, d, cond):
    """Random SPD M with cond(M @ M.T) = `cond`."""
    u, _ = jnp.linalg.qr(jax.random.normal(k, (d, d)))
    s = jnp.logspace(0, jnp.log10(cond), d) ** 0.5
    return (u * s) @ u.T


k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
A, B, WSTAR = ill(k1, M, 1e3), ill(k2, N, 1e3), jax.random.normal(k3, (M, N))
PARAMS0 = {"W": jnp.zeros((M, N)), "b": jnp.zeros((N,))}
KEYS = jax.random.split(jax.random.PRNGKey(1), STEPS)


def loss_fn(p):
    r = A @ (p["W"] - WSTAR) @ B
    return 0.5 * jnp.mean(r**2) + 0.5 * jnp.mean((p["b"] - 1.0) ** 2)


def noisy_grad(p, k):
    """Exact gradient + 10% Gaussian noise (relative to its std)."""
    g = jax.grad(loss_fn)(p)
    ka, kb = jax.random.split(k)
    return {
        "W": g["W"] + 0.1 * jnp.std(g["W"]) * jax.random.normal(ka, g["W"].shape),
        "b": g["b"] + 0.1 * jnp.std(g["b"]) * jax.random.normal(kb, g["b"].shape),
    }


# ------------------------------------------------------------------------ optimizers


@dataclasses.dataclass(frozen=True)
class Opt:
    name: str
    structure: str
    make: Callable  # lr -> optax.GradientTransformation (lr may be a tracer)


def optimizers(ablate: bool) -> list[Opt]:
    out = [Opt("optax.adam", "—", lambda lr: optax.adam(lr))]
    if psgdax is not None:
        for skew, label in (
            (1.0, "skew 1.0 (psgdax default: 64-axis diag)"),
            (float("inf"), "skew ∞ (both dense)"),
        ):
            for mode in ("Q0.5EQ1.5", "EQ", "QUAD"):
                out.append(
                    Opt(
                        f"psgdax.kron {mode}",
                        label,
                        lambda lr, mode=mode, skew=skew: psgdax.kron(
                            learning_rate=lr,
                            preconditioner_update_probability=1.0,
                            preconditioner_mode=mode,
                            max_skew_triangular=skew,
                        ),
                    )
                )
    for skew, label in (
        (float("inf"), "skew ∞ (psgd_eqx default: both dense)"),
        (1.0, "skew 1.0 (64-axis diag)"),
    ):
        for geom in GEOMETRIES:
            out.append(
                Opt(
                    f"psgd_eqx.kron {geom}",
                    label,
                    lambda lr, geom=geom, skew=skew: psgd_eqx.kron(
                        learning_rate=lr,
                        preconditioner_update_probability=1.0,
                        geometry=geom,
                        max_skew_triangular=skew,
                    ),
                )
            )
    if ablate:
        # psgdax's remaining defaults, switched on one at a time and all together
        variants = {
            "+warmup": dict(momentum_warmup=True),
            "+clip1.0": dict(grad_clip_max_amp=1.0, grad_clip_max_element=None),
            "+warmup+clip1.0+bernoulli (= psgdax defaults)": dict(
                momentum_warmup=True,
                grad_clip_max_amp=1.0,
                grad_clip_max_element=None,
                bernoulli_refit=True,
            ),
        }
        for geom in ("PRO", "EQ", "QUAD"):
            for tag, kw in variants.items():
                out.append(
                    Opt(
                        f"psgd_eqx.kron {geom} {tag}",
                        "skew 1.0 (64-axis diag)",
                        lambda lr, geom=geom, kw=kw: psgd_eqx.kron(
                            learning_rate=lr,
                            preconditioner_update_probability=1.0,
                            geometry=geom,
                            max_skew_triangular=1.0,
                            **kw,
                        ),
                    )
                )
    return out


def make_run(opt: Opt):
    """jit(lr -> exact losses after every step), compiled once per optimizer."""

    def run(lr):
        with contextlib.redirect_stdout(io.StringIO()):  # psgdax prints its sizes at init
            tx = opt.make(lr)
            state = tx.init(PARAMS0)

        def body(carry, k):
            p, s = carry
            g = noisy_grad(p, k)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
            return (p, s), loss_fn(p)

        _, losses = jax.lax.scan(body, (PARAMS0, state), KEYS)
        return losses

    return jax.jit(run)


# ------------------------------------------------------------------------------ main


def _fmt(x: float) -> str:
    if x != x:
        return "nan"
    if x == float("inf"):
        return "inf"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.2e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="lrs {1e-3, 3e-3, 3e-2}, no ablations")
    ap.add_argument(
        "--ablate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="psgd_eqx rows with psgdax's defaults (default: on unless --quick)",
    )
    ap.add_argument("--time-reps", type=int, default=5, help="interleaved timing repetitions")
    ap.add_argument("--only", type=str, default=None, help="substring filter on optimizer names")
    args = ap.parse_args(argv)
    lrs = LR_QUICK if args.quick else LR_GRID
    ablate = (not args.quick) if args.ablate is None else args.ablate

    print("# kron_quadratic.py (ill-conditioned Kronecker-structured quadratic)")
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"psgd_eqx {psgd_eqx.__version__} (commit {lib_commit()}), "
        f"psgdax {'0.1.1' if psgdax else 'missing'}; backend {jax.default_backend()} "
        f"({dev.device_kind}); {os.cpu_count()} CPU cores visible"
    )
    print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    print(f"loss at init: {float(loss_fn(PARAMS0)):.4g}; lr grid {lrs}; {STEPS} steps\n")

    opts = optimizers(ablate)
    if args.only:
        opts = [o for o in opts if args.only in o.name]
    results = {}
    runs = {}
    for o in opts:
        t0 = time.perf_counter()
        run = make_run(o)
        per_lr = {}
        for lr in lrs:
            losses = np.asarray(jax.block_until_ready(run(jnp.float32(lr))))
            final = float(np.mean(losses[-100:]))
            final = final if np.isfinite(final) else float("inf")
            per_lr[lr] = (final, float(losses[499]))
        best = min(lrs, key=lambda lr: per_lr[lr][0])
        key = (o.name, o.structure)
        results[key] = dict(best=best, per_lr=per_lr)
        runs[key] = run
        print(
            f"  {o.name:<52} {o.structure:<28} best lr {best:g}: final "
            f"{_fmt(per_lr[best][0])}  ({time.perf_counter() - t0:5.1f} s)",
            flush=True,
        )

    # interleaved timing of the best-lr runs
    times = {k: [] for k in results}
    for r in range(args.time_reps):
        keys = list(results)
        keys = keys[r % len(keys) :] + keys[: r % len(keys)]
        for k in keys:
            lr = jnp.float32(results[k]["best"])
            t0 = time.perf_counter()
            jax.block_until_ready(runs[k](lr))
            times[k].append(1e6 * (time.perf_counter() - t0) / STEPS)

    print(
        "\n| optimizer (prob 1.0, defaults unless noted) | structure rule | best lr | "
        "loss @ step 500 | final loss (mean of last 100) | µs/step |"
    )
    print("|---|---|---|---|---|---|")
    for k, r in results.items():
        name, structure = k
        best = r["best"]
        fin, l500 = r["per_lr"][best]
        print(
            f"| {name} | {structure} | {best:g} | {_fmt(l500)} | {_fmt(fin)} | "
            f"{statistics.median(times[k]):,.0f} |"
        )

    print("\nFinal loss (mean of last 100 steps) over the whole lr grid:\n")
    print("| optimizer | structure rule | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---|---|" + "---|" * len(lrs))
    for k, r in results.items():
        name, structure = k
        print(
            f"| {name} | {structure} | " + " | ".join(_fmt(r["per_lr"][lr][0]) for lr in lrs) + " |"
        )
    adam_t = times.get(("optax.adam", "—"))
    if adam_t:
        print(
            f"\n(µs/step: median of {args.time_reps} interleaved repetitions of the compiled "
            "1,500-step scan; the machine was shared, compare ratios to adam "
            f"({statistics.median(adam_t):,.0f} µs/step) rather than absolute numbers.)"
        )
    return results


if __name__ == "__main__":
    main()
