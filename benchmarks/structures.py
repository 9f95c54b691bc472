"""Preconditioner structures side by side: memory, step time and quality (CPU).

Every structure of psgd_eqx through its optimizer alias, with the alias's defaults unless
stated: `kron` (Kronecker factors per leaf), `affine` (two factors on psgd_jax's matrix
view, per leaf), `diag` (element-wise, per leaf), `xmat` (one global X-matrix), `lra` (one
global rank-10 Q = (I + UVᵀ)diag(d)) and `dense` (one global n×n Q, default geometry PRO
whose Procrustes rotation makes a refit O(n³); built only up to `--dense-max` = 1,000
parameters), next to `optax.adam`. Timing and Newton also show `dense QUAD`: the same Q with
the O(n²) QUAD step.

(a) state bytes from `jax.eval_shape(opt.init, params)` (nothing is allocated, so even the
    dense Q of a large tree is reported, marked "not built"): an MLP 64-256-256-10 (85,002
    parameters), a transformer-block-shaped tree (d = 256, MLP 1024; 789,760) and two 3×3
    conv layers (55,424, where Kron and the affine matrix view differ);
(b) jitted optimizer-only step time (`opt.update` + `optax.apply_updates` on a fixed
    gradient rescaled every step, in one `lax.fori_loop`, params and state donated),
    refitting every step (`update_preconditioner=True`) and apply-only
    (`update_preconditioner=False`: the refit `lax.cond` is compiled in but not taken), as
    a ratio to `optax.adam` measured in the same run. All configurations are interleaved
    in a rotated order per repetition; each ratio is the median of the per-repetition
    paired ratios. Trees: the MLP and a 650-parameter logistic regression (for `dense`);
(c) quality with whitening: sklearn's bundled `digits` (1,797 8×8 images, no download;
    1,437 train / 360 test), an MLP 64-64-10 (`--digits mlp`, default) and/or multinomial
    logistic regression (`logreg`, 650 parameters, `dense` included), mini-batches of 64,
    a fixed number of steps, the learning rate picked per optimizer from a grid by final
    training loss; reported: final full-training-set loss and test accuracy;
(d) quality with Newton fitting: f(x) = ½ (x − x*)ᵀ H (x − x*) on a (10, 20) parameter
    (200 elements) from x = 0, H with log-spaced eigenvalues 1 … 1e4 in a random
    orthonormal basis, x* ~ N(0, I); `psgd_eqx.hessian_helper` gives an exact (v, Hv)
    pair every step; reported: the first step with f/f(0) < 1e-6, at most 4,000 steps
    (settings of the reference's DenseNewton demo: lr 1, preconditioner lr 0.5, momentum
    0.9; clipping off). Adam (gradient only, best of an lr grid) for scale.

Usage:

    python benchmarks/structures.py                  # everything, ≈ 2.5 min on 2 CPU cores
    python benchmarks/structures.py --quick          # smoke run
    python benchmarks/structures.py --part b --reps 9 --json benchmarks/out/structures.json
    python benchmarks/structures.py --part c --digits mlp,logreg

Writes only under `benchmarks/out/` (git-ignored): the JAX compilation cache
(`--compile-cache`, default `benchmarks/out/jax_cache`; compiles are most of a CPU run)
and, with `--json`, the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import lib_commit

import psgd_eqx


STRUCTS = ("kron", "affine", "diag", "xmat", "lra", "dense")
# Timing and Newton rows only: DenseQ with the O(n²) QUAD step instead of PRO's O(n³)
# Procrustes rotation (same memory as "dense").
WITH_QUAD = STRUCTS + ("dense QUAD",)
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


# ------------------------------------------------------------------------ helpers


def make_opt(name: str, lr, **kw) -> optax.GradientTransformation:
    """The optimizer of one structure through its alias (defaults unless overridden)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "lra":
        return psgd_eqx.lra(lr, rank=10, **kw)
    if name == "dense QUAD":
        return psgd_eqx.dense(lr, geometry="QUAD", **kw)
    return getattr(psgd_eqx, name)(lr, **kw)


def n_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _is_psgd_state(x) -> bool:
    return isinstance(x, psgd_eqx.PSGDState)


def precond_bytes(state) -> int:
    """Bytes of preconditioner state (per-leaf modules + the global one) in an opt state."""
    total = 0
    for s in jax.tree.leaves(state, is_leaf=_is_psgd_state):
        if _is_psgd_state(s):
            total += nbytes(s.precond) + nbytes(s.global_precond)
    return total


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _fmt_bytes(b: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= k:
            return f"{b / k:,.3g} {unit}"
    return f"{b:,.0f} B"


def env_line() -> str:
    dev = jax.devices()[0]
    return (
        f"jax {jax.__version__}, optax {optax.__version__}, "
        f"psgd_eqx {psgd_eqx.__version__} (commit {lib_commit()}); "
        f"backend {jax.default_backend()} ({dev.device_kind}); "
        f"{os.cpu_count()} CPU cores visible; {platform.processor() or platform.machine()}; "
        f"python {platform.python_version()}"
    )


def _normal_tree(key, shapes: dict, scale=1.0):
    keys = jax.random.split(key, len(shapes))
    return {
        name: scale * jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items())
    }


# ------------------------------------------------------------------ parameter trees


def mlp_shapes(sizes) -> dict:
    out = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out[f"w{i}"] = (a, b)
        out[f"b{i}"] = (b,)
    return out


def block_shapes(d=256, hidden=1024) -> dict:
    """One pre-LN transformer block (no embeddings)."""
    return {
        "ln1_scale": (d,),
        "ln1_bias": (d,),
        "qkv_w": (d, 3 * d),
        "qkv_b": (3 * d,),
        "out_w": (d, d),
        "out_b": (d,),
        "ln2_scale": (d,),
        "ln2_bias": (d,),
        "mlp_in_w": (d, hidden),
        "mlp_in_b": (hidden,),
        "mlp_out_w": (hidden, d),
        "mlp_out_b": (d,),
    }


def conv_shapes() -> dict:
    """Two 3×3 conv layers (HWIO kernels), where Kron and the affine matrix view differ."""
    return {"c0_w": (3, 3, 32, 64), "c0_b": (64,), "c1_w": (3, 3, 64, 64), "c1_b": (64,)}


TREES = {
    "MLP 64-256-256-10": mlp_shapes((64, 256, 256, 10)),
    "transformer block d=256": block_shapes(),
    "conv 3×3 32-64-64": conv_shapes(),
    "logreg 64→10": mlp_shapes((64, 10)),
}


def spec_tree(shapes: dict):
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


# ------------------------------------------------------------------ (a) state bytes


def part_a(args) -> dict:
    print("\n## (a) optimizer state (from `jax.eval_shape(opt.init, params)`, f32)\n")
    trees = ["MLP 64-256-256-10", "transformer block d=256", "conv 3×3 32-64-64"]
    res = {}
    print("| structure | " + " | ".join(trees) + " |")
    print("|---|" + "---|" * len(trees))
    print("| parameters | " + " | ".join(
        f"{n_params(spec_tree(TREES[t])):,} ({_fmt_bytes(4 * n_params(spec_tree(TREES[t])))})"
        for t in trees) + " |")
    for name in ("adam",) + STRUCTS:
        row = [name]
        for t in trees:
            params = spec_tree(TREES[t])
            n = n_params(params)
            state = jax.eval_shape(make_opt(name, 1e-3).init, params)
            if name == "adam":
                b = nbytes(state)  # mu and nu
            else:
                b = precond_bytes(state)
            res[(name, t)] = b
            note = ", not built" if name == "dense" and n > args.dense_max else ""
            row.append(f"{_fmt_bytes(b)} ({b / (4 * n):,.2f}×{note})")
        print("| " + " | ".join(row) + " |")
    print(
        "\nBytes (and × the parameters' bytes). adam: its two moment buffers. PSGD rows: "
        "the preconditioner only; the momentum buffer (1×) comes on top at b1 > 0."
    )
    return {f"{k[0]} | {k[1]}": v for k, v in res.items()}


# ------------------------------------------------------------------ (b) step time


def part_b(args) -> dict:
    print("\n## (b) optimizer-only step time, ratio to optax.adam (same run, interleaved)\n")
    results = {}
    for t in args.time_trees:
        params0 = _normal_tree(jax.random.PRNGKey(0), TREES[t], 0.05)
        grads = _normal_tree(jax.random.PRNGKey(1), TREES[t], 1e-3)
        n = n_params(params0)
        names = ["adam"] + [s for s in WITH_QUAD
                            if not (s.startswith("dense") and n > args.dense_max)]

        def make_runner(opt, psgd):
            # `refit` is a traced bool: one compiled program measures both modes.
            def run(params, state, g0, k, refit):
                def body(i, carry):
                    p, s = carry
                    scale = 1.0 + 1e-6 * i.astype(jnp.float32)
                    g = jax.tree.map(lambda x: x * scale, g0)
                    if psgd:
                        u, s = opt.update(g, s, p, update_preconditioner=refit)
                    else:
                        u, s = opt.update(g, s, p)
                    return optax.apply_updates(p, u), s

                return jax.lax.fori_loop(0, k, body, (params, state))

            return jax.jit(run, donate_argnums=(0, 1))

        runners, carries, ks, cfgs = {}, {}, {}, []
        for name in names:
            opt = make_opt(name, 1e-4)
            p = jax.tree.map(jnp.copy, params0)
            s = jax.tree.map(lambda x: jnp.array(x, copy=True), opt.init(p))
            run = make_runner(opt, name != "adam")
            t0 = time.perf_counter()
            p, s = jax.block_until_ready(run(p, s, grads, 1, True))  # compile (+1 step)
            compile_s = time.perf_counter() - t0
            runners[name], carries[name] = run, (p, s)
            for mode in ((None,) if name == "adam" else ("refit", "apply")):
                key = name if mode is None else f"{name} {mode}"
                t0 = time.perf_counter()
                p, s = jax.block_until_ready(run(p, s, grads, 2, mode == "refit"))
                per = (time.perf_counter() - t0) / 2
                ks[key] = max(1, min(args.max_steps, int(args.window / max(per, 1e-7))))
                cfgs.append((key, name, mode == "refit"))
            carries[name] = (p, s)
            if args.verbose:
                print(f"  compiled {name:<7} {compile_s:5.1f} s", file=sys.stderr, flush=True)
        times = {k: [] for k, _, _ in cfgs}
        for r in range(args.reps):
            order = cfgs[r % len(cfgs):] + cfgs[: r % len(cfgs)]
            for key, name, refit in order:
                p, s = carries[name]
                t0 = time.perf_counter()
                p, s = jax.block_until_ready(runners[name](p, s, grads, ks[key], refit))
                times[key].append((time.perf_counter() - t0) / ks[key])
                carries[name] = (p, s)
        bad = [k for k in names if not all(bool(jnp.all(jnp.isfinite(x)))
                                           for x in jax.tree.leaves(carries[k][0]))]
        if bad:
            print(f"WARNING: non-finite params after timing: {bad}")

        def ratio(k):
            return _med([a / b for a, b in zip(times[k], times["adam"])])

        print(f"**{t}** ({n:,} params; adam {1e6 * _med(times['adam']):,.0f} µs/step)\n")
        print("| structure | refit every step: µs/step | × adam | apply only: µs/step | × adam |")
        print("|---|---|---|---|---|")
        for s in WITH_QUAD:
            if f"{s} refit" not in times:
                print(f"| {s} | — | — | — | — |")
                continue
            tr, ta = _med(times[f"{s} refit"]), _med(times[f"{s} apply"])
            print(f"| {s} | {1e6 * tr:,.0f} | {ratio(f'{s} refit'):,.1f} | "
                  f"{1e6 * ta:,.0f} | {ratio(f'{s} apply'):,.1f} |")
            results[f"{t} | {s}"] = {
                "refit_us": 1e6 * tr, "refit_x_adam": ratio(f"{s} refit"),
                "apply_us": 1e6 * ta, "apply_x_adam": ratio(f"{s} apply"),
            }
        results[f"{t} | adam"] = {"us": 1e6 * _med(times["adam"])}
        print()
    print(f"{args.reps} interleaved repetitions of ≈ {args.window:g} s per configuration; "
          "`dense` only up to --dense-max parameters.")
    return results


# ------------------------------------------------------------------ (c) digits


def load_digits_split():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    return (jnp.asarray(x[:1437]), jnp.asarray(y[:1437]),
            jnp.asarray(x[1437:]), jnp.asarray(y[1437:]))


def mlp_init(key, sizes):
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"w{i}"] = jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return params


def mlp_logits(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def xent(params, x, y):
    logits = mlp_logits(params, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


DIGITS = {"logreg": ("logreg 64→10", (64, 10)), "mlp": ("MLP 64-64-10", (64, 64, 10))}


def part_c(args) -> dict:
    print(f"\n## (c) whitening: sklearn digits, {args.digits_steps} steps of batch 64\n")
    xtr, ytr, xte, yte = load_digits_split()
    idx = jax.random.randint(jax.random.PRNGKey(3), (args.digits_steps, 64), 0, xtr.shape[0])
    res = {}
    for problem in args.digits:
        pname, sizes = DIGITS[problem]
        p0 = mlp_init(jax.random.PRNGKey(2), sizes)
        n = n_params(p0)
        print(f"**{pname}** ({n:,} params)\n")
        print("| optimizer | final train loss | test accuracy | best lr |")
        print("|---|---|---|---|")
        for name in ("adam",) + STRUCTS:
            if name == "dense" and n > args.dense_max:
                print(f"| {name} | not run ({n:,} > --dense-max) | — | — |")
                continue

            @jax.jit
            def train(lr, name=name):  # lr is traced: one compile per optimizer
                opt = make_opt(name, lr)
                state = opt.init(p0)

                def body(carry, ix):
                    p, s = carry
                    g = jax.grad(xent)(p, xtr[ix], ytr[ix])
                    u, s = opt.update(g, s, p)
                    return (optax.apply_updates(p, u), s), None

                (p, _), _ = jax.lax.scan(body, (p0, state), idx)
                acc = jnp.mean(jnp.argmax(mlp_logits(p, xte), -1) == yte)
                return xent(p, xtr, ytr), acc

            t0 = time.perf_counter()
            runs = [(lr,) + tuple(float(x) for x in train(jnp.float32(lr)))
                    for lr in args.digits_lrs]
            runs = [r if np.isfinite(r[1]) else (r[0], np.inf, r[2]) for r in runs]
            lr, loss, acc = min(runs, key=lambda r: r[1])
            if args.verbose:
                print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            print(f"| {name} | {loss:.2e} | {100 * acc:.1f} % | {lr:g} |")
            res[f"{pname} | {name}"] = {"loss": loss, "test_acc": acc, "lr": lr,
                                        "all": {str(r[0]): r[1] for r in runs}}
        print()
    print(f"best of lr ∈ {list(args.digits_lrs)} by final training loss; every alias with "
          "its defaults (whitening, b1 = 0.9, refit every step).")
    return res


# ------------------------------------------------------------------ (d) Newton quadratic


def quadratic(n=200, cond=1e4, seed=0):
    """H = B diag(λ) Bᵀ, λ log-spaced in [1, cond], B a random orthonormal basis; x* ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.logspace(0.0, np.log10(cond), n)
    h = (basis * eig) @ basis.T
    xs = rng.standard_normal(n)
    return jnp.asarray(h, jnp.float32), jnp.asarray(xs, jnp.float32)


def part_d(args) -> dict:
    print(f"\n## (d) Newton fitting: ill-conditioned quadratic (200 params, cond 1e4), "
          f"≤ {args.newton_steps:,} steps\n")
    h, xs = quadratic()
    cap = args.newton_steps

    def f(params):
        d = params["x"].reshape(-1) - xs
        return 0.5 * d @ (h @ d)

    p0 = {"x": jnp.zeros((10, 20), jnp.float32)}
    f0 = float(f(p0))
    tol = args.newton_tol * f0
    res = {}
    print(f"| optimizer | steps to f/f₀ < {args.newton_tol:g} | f/f₀ at the end | lr |")
    print("|---|---|---|---|")
    for name in ("adam",) + WITH_QUAD:
        newton = name != "adam"

        @jax.jit
        def solve(lr, name=name, newton=newton):
            kw = {}
            if newton:  # the reference's DenseNewton demo settings, clipping off
                kw = dict(preconditioner_lr=args.newton_plr, grad_clip_max_amp=None,
                          grad_clip_max_element=None)
            opt = make_opt(name, lr, **kw)

            def cond(c):
                t, _, _, _, loss = c
                return (t < cap) & ~(loss < tol) & jnp.isfinite(loss)

            def body(c):
                t, p, s, k, _ = c
                k, sub = jax.random.split(k)
                if newton:
                    _, g, hvp, v, refit = psgd_eqx.hessian_helper(sub, f, p)
                    u, s = opt.update(g, s, p, Hvp=hvp, vector=v, update_preconditioner=refit)
                else:
                    u, s = opt.update(jax.grad(f)(p), s, p)
                p = optax.apply_updates(p, u)
                return t + 1, p, s, k, f(p)

            init = (jnp.zeros((), jnp.int32), p0, opt.init(p0), jax.random.PRNGKey(4), f(p0))
            t, _, _, _, loss = jax.lax.while_loop(cond, body, init)
            return t, loss

        t0 = time.perf_counter()
        lrs = args.newton_lrs if newton else args.adam_lrs
        runs = []
        for lr in lrs:
            t, loss = solve(jnp.float32(lr))
            t, loss = int(t), float(loss)
            runs.append((t if loss < tol else None, loss if np.isfinite(loss) else np.inf, lr))
        st, loss, lr = min(runs, key=lambda r: (r[0] is None, r[0] or 0, r[1]))
        if args.verbose:
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        st_s = f"{st:,}" if st is not None else f"> {cap:,}"
        label = "adam (gradient only)" if not newton else f"{name} (Newton)"
        print(f"| {label} | {st_s} | {loss / f0:.1e} | {lr:g} |")
        res[name] = {"steps": st, "final_rel": loss / f0, "lr": lr}
    print(f"\nPSGD: each alias with lr {list(args.newton_lrs)}, preconditioner_lr "
          f"{args.newton_plr}, b1 = 0.9, update clipping off, exact Hv from "
          f"`hessian_helper` every step; adam: best of lr ∈ {list(args.adam_lrs)}. "
          f"f₀ = f(0) = {f0:,.0f}.")
    return res


# ------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="abcd", help="any of a, b, c, d (default: all)")
    ap.add_argument("--reps", type=int, default=5, help="(b) interleaved repetitions")
    ap.add_argument("--window", type=float, default=0.1,
                    help="(b) seconds per measurement (steps are calibrated)")
    ap.add_argument("--max-steps", type=int, default=2000, help="(b) cap on steps/measurement")
    ap.add_argument("--time-trees", type=str, default="MLP 64-256-256-10,logreg 64→10",
                    help="(b) comma list of trees to time: " + ", ".join(TREES))
    ap.add_argument("--dense-max", type=int, default=1_000,
                    help="build DenseQ (O(n³) refit with PRO) only up to this many parameters")
    ap.add_argument("--digits", type=str, default="mlp",
                    help="(c) comma list of problems: mlp, logreg")
    ap.add_argument("--digits-steps", type=int, default=300)
    ap.add_argument("--digits-lrs", type=str, default="3e-3,1e-2,3e-2,1e-1")
    ap.add_argument("--newton-steps", type=int, default=4000)
    ap.add_argument("--newton-lrs", type=str, default="1.0")
    ap.add_argument("--newton-plr", type=float, default=0.5)
    ap.add_argument("--newton-tol", type=float, default=1e-6, help="(d) relative: f/f₀")
    ap.add_argument("--adam-lrs", type=str, default="1e-3,1e-2,1e-1")
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--verbose", action="store_true", help="progress on stderr")
    ap.add_argument("--compile-cache", type=str, default=os.path.join(OUT_DIR, "jax_cache"),
                    help="JAX persistent compilation cache ('' disables); compiles dominate "
                    "the run time on CPU")
    ap.add_argument("--json", type=str, default=None,
                    help="write the numbers here (must be under benchmarks/out/)")
    args = ap.parse_args(argv)
    for name in ("digits_lrs", "newton_lrs", "adam_lrs"):
        setattr(args, name, tuple(float(x) for x in getattr(args, name).split(",")))
    args.time_trees = [t.strip() for t in args.time_trees.split(",") if t.strip()]
    args.digits = [d.strip() for d in args.digits.split(",") if d.strip()]
    if args.quick:
        args.reps, args.window, args.digits_steps, args.newton_steps = 2, 0.02, 20, 20
        args.time_trees, args.digits, args.digits_lrs = ["logreg 64→10"], ["logreg"], (1e-2,)
    if args.json:
        path = os.path.abspath(args.json)
        if os.path.commonpath([path, OUT_DIR]) != OUT_DIR:
            ap.error(f"--json must be under {OUT_DIR}")
        os.makedirs(OUT_DIR, exist_ok=True)
    if args.compile_cache:
        path = os.path.abspath(args.compile_cache)
        if os.path.commonpath([path, OUT_DIR]) != OUT_DIR:
            ap.error(f"--compile-cache must be under {OUT_DIR}")
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    t_start = time.perf_counter()
    print("# structures.py")
    print(env_line())
    print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv))
    out = {"env": env_line()}
    for part, fn in (("a", part_a), ("b", part_b), ("c", part_c), ("d", part_d)):
        if part in args.part:
            t0 = time.perf_counter()
            out[part] = fn(args)
            print(f"\n(part {part}: {time.perf_counter() - t0:.0f} s)")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
