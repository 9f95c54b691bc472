"""Time the fused kernels (one launch per stack) against the optimizer's XLA path.

Two ops, each through `psgd_eqx`'s own dispatch (`use_kernels=True` vs `False`), vmapped
over a stack of same-shape factors exactly as a bucket of leaves runs them:

- `refit`: the whole refit of a dense factor (`psgd_eqx._geometry.fit_factor`): T₁ = y yᵀ
    from the preconditioned probe y (n × m, m = `--m-ratio`·n), the norm bound, the
    Lipschitz update, the geometry step (`--geometries`, PRO first) and PRO's Procrustes
    step. The XLA side is the same function with `use_kernels=False`.
- `apply`: P·G for a matrix `KronQ` (`KronQ.apply`), dense×dense and dense×diagonal factors.

Each configuration runs `iters` applications inside one jitted `fori_loop` (see
`benchmarks/kernels.py`, whose timing helpers this reuses); the table gives the median µs
per application and XLA / kernel (> 1: the kernel is faster). Goals (issue 16, H100/H200):
fused PRO refit ≥ 1.5× XLA for stacks {8, 32} × n {128, …, 1024}.

    python benchmarks/fused_kernels.py                 # GPU: stacks 8,32 × n 32..1024
    python benchmarks/fused_kernels.py --force         # launch even where it may not fit
    python benchmarks/fused_kernels.py --interpret     # CPU smoke (interpreted kernels)

Without `--force` the dispatch launches a kernel only where `fused_refit_fits` /
`fused_apply_fits` say one program's working set fits on chip (on a GPU: refit n ≤ 64,
apply n ≤ 64 for two dense sides); elsewhere both columns time the XLA path and the row
says "(no fit)". `--force` launches it anyway (registers spill to local memory; the
compiler may refuse), which is how to learn where the estimate is too cautious.

The whole `kron` step with and without kernels is `benchmarks/kernels.py --step ...`
(`use_kernels=True` now also runs these two fused kernels).
"""

import argparse
import functools as ft
import json
import os
import sys
import warnings


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp

import kernels as timing  # benchmarks/kernels.py: the fori_loop timing helpers
import psgd_eqx
from psgd_eqx._geometry import fit_factor
from psgd_eqx._norms import Normaliser


warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


def _refit_case(n, batch, m, geometry, key):
    ks = jax.random.split(key, 4)
    eye = jnp.broadcast_to(jnp.eye(n), (batch, n, n))
    q = eye + jax.random.normal(ks[0], (batch, n, n)) / (4 * n)
    if geometry == "EQ":
        q = jnp.triu(q)
    y = jax.random.normal(ks[1], (batch, n, m)) / jnp.sqrt(1.0 * m)
    b = jax.random.normal(ks[2], (batch, n, m)) / jnp.sqrt(1.0 * m)
    t2 = b @ jnp.swapaxes(b, -1, -2) if geometry == "EQ" else jnp.ones((batch,))
    keys = jax.random.split(ks[3], batch)
    return dict(q=q, L=jnp.zeros((batch,)), y=y, t2=t2,
                key=jax.vmap(jax.random.key_data)(keys).astype(jnp.uint32))


def _refit_step(use_kernels, geometry, normaliser):
    from psgd_eqx._fused import Gram

    def one(q, old_l, y, t2, key):
        # the Gram form is what KronQ hands the fused path; the XLA path forms y yᵀ
        t1 = Gram(y) if use_kernels is not False else y @ y.T
        return fit_factor(geometry, q, t1, t2, old_l, 0.1, key, normaliser, dense=True,
                          use_kernels=use_kernels)

    def step(c):
        q, big_l = jax.vmap(one)(c["q"], c["L"], c["y"], c["t2"], c["key"])
        return dict(c, q=q, L=big_l)

    return step


def _apply_case(n, batch, kind, key):
    ks = jax.random.split(key, 3)
    g = jax.random.normal(ks[0], (batch, n, n))
    left = jnp.eye(n) + jax.random.normal(ks[1], (batch, n, n)) / (4 * n)
    right = (jnp.eye(n) + jax.random.normal(ks[2], (batch, n, n)) / (4 * n) if kind == "dense"
             else 1.0 + 0.01 * jax.random.normal(ks[2], (batch, n)))
    return dict(g=g, factors=(left, right))


def _apply_step(use_kernels):
    def one(factors, g):
        q = psgd_eqx.KronQ(factors, jnp.zeros((2,)), None, g.shape,
                           (True, factors[1].ndim == 2), "PRO", None, use_kernels)
        return q.apply(g)

    return lambda c: dict(c, g=jax.vmap(one)(c["factors"], c["g"]))


def _row(args, label, make_case, make_step, kernels_mode, fits=True):
    label = label if fits or args.force else label + " (no fit)"
    carry = make_case()
    run_k = timing._looped(make_step(kernels_mode))
    run_x = timing._looped(make_step(False))
    iters, _ = timing._calibrate(run_x, carry, args.target_ms / 1e3, args.max_iters)
    tk = timing._time(run_k, carry, iters, args.reps)
    tx = timing._time(run_x, carry, iters, args.reps)
    print(f"| {label} | {1e6 * tx:.1f} | {1e6 * tk:.1f} | {tx / tk:.2f}× |", flush=True)
    return dict(label=label, xla_s=tx, kernel_s=tk, iters=iters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="refit,apply")
    p.add_argument("--n", default=None, help="comma list (default 128,256,512,1024; 8,20 "
                                             "interpret)")
    p.add_argument("--batch", default=None, help="comma list (default 8,32; 2 interpret)")
    p.add_argument("--geometries", default="PRO,EQ,QUAD")
    p.add_argument("--m-ratio", type=int, default=1, help="probe columns m = ratio·n")
    p.add_argument("--interpret", action="store_true", help="interpreted kernels (CPU smoke)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target-ms", type=float, default=30.0)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--force", action="store_true",
                   help="launch the kernels even where the fit estimate says no")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import psgd_eqx_kernels as kernels

    if args.force:  # the dispatch reads these through the package
        kernels.fused_refit_fits = lambda *a, **k: True
        kernels.fused_apply_fits = lambda *a, **k: True
    ns = [int(x) for x in (args.n or ("8,20" if args.interpret else "32,64,128,256,512,1024"))
          .split(",")]
    batches = [int(x) for x in (args.batch or ("2" if args.interpret else "8,32")).split(",")]
    mode = "interpret" if args.interpret else True
    if args.interpret:
        args.reps, args.max_iters = 1, 1
    print(f"backend {jax.default_backend()}, devices {jax.devices()}, jax {jax.__version__}")
    print("| case | XLA µs | fused kernel µs | XLA / kernel |")
    print("|---|---|---|---|")
    rows = []
    key = jax.random.key(0)
    normaliser = Normaliser()
    for op in args.ops.split(","):
        for n in ns:
            for b in batches:
                if op == "refit":
                    m = args.m_ratio * n
                    fits = kernels.fused_refit_fits(n, m, min(normaliser.k, n), "gpu",
                                                    jnp.float32)
                    for geo in args.geometries.split(","):
                        rows.append(_row(
                            args, f"refit {geo} n={n} stack={b} m={m}",
                            ft.partial(_refit_case, n, b, m, geo, key),
                            lambda u, geo=geo: _refit_step(u, geo, normaliser), mode,
                            fits or args.interpret))
                elif op == "apply":
                    for kind in ("dense", "diag"):
                        fits = kernels.fused_apply_fits(n, n, "dense", kind, "gpu",
                                                        jnp.float32)
                        rows.append(_row(
                            args, f"apply dense×{kind} n={n} stack={b}",
                            ft.partial(_apply_case, n, b, kind, key), _apply_step, mode,
                            fits or args.interpret))
                else:
                    raise ValueError(f"unknown op {op!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
