"""Preconditioner structures side by side: memory, step time and quality (CPU).

Every structure of psgd_eqx through its optimizer alias, with its defaults unless stated:
`kron` (Kronecker factors per leaf), `affine` (two factors on psgd_jax's matrix view, per
leaf), `diag` (element-wise, per leaf), `xmat` (one global X-matrix), `lra` (one global
rank-10 (I + UVᵀ)diag(d)) and `dense` (one global n×n Q: only built where the parameter
count is at most `--dense-max`, 10,000 by default), next to `optax.adam`.

(a) state bytes, from `jax.eval_shape(opt.init, params)` (nothing is allocated, so even
    the dense Q of a large tree is reported, marked "not built"), on a small MLP
    64-256-256-10 (85,002 parameters) and a transformer-block-shaped tree (d = 256,
    MLP 1024, 789,760 parameters);
(b) jitted optimizer-only step time (`opt.update` + `optax.apply_updates` on a fixed
    gradient rescaled every step, in one `lax.fori_loop`, params and state donated),
    refitting every step and apply-only (`update_preconditioner=False`: the refit
    `lax.cond` is compiled in but not taken), as a ratio to `optax.adam` measured in the
    same run. All configurations are interleaved in a rotated order per repetition and
    every ratio is the median of the per-repetition paired ratios;
(c) quality with whitening: sklearn's bundled `digits` (1,797 8×8 images, no download),
    multinomial logistic regression (650 parameters) and an MLP 64-64-10 (4,810), mini-
    batches of 64, a fixed number of steps, learning rate chosen per optimizer from a grid
    (all learning rates run at once under `jax.vmap`); final full-training-set loss and
    test accuracy (360 held-out images);
(d) quality with Newton fitting: a random quadratic f(x) = ½ (x − x*)ᵀ H (x − x*) on a
    (10, 20) parameter (200 elements), H with log-spaced eigenvalues (condition number
    1e4) in a random basis, f(x₀) = 1; `psgd_eqx.hessian_helper` supplies (v, Hv) every
    step; reported: the first step with f < 1e-6, best over a learning-rate grid (Adam,
    without curvature, for scale).

Usage:

    python benchmarks/structures.py              # everything (≈ 2–3 min on 2 CPU cores)
    python benchmarks/structures.py --quick      # smoke run
    python benchmarks/structures.py --part b --reps 9 --json benchmarks/out/s.json

Nothing is written outside `benchmarks/out/` (and only with `--json`).
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
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


# ------------------------------------------------------------------------ helpers


def make_opt(name: str, lr, **kw) -> optax.GradientTransformation:
    """The optimizer of one structure through its alias (defaults unless overridden)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "lra":
        return psgd_eqx.lra(lr, rank=10, **kw)
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


TREES = {
    "MLP 64-256-256-10": mlp_shapes((64, 256, 256, 10)),
    "transformer block d=256": block_shapes(),
    "logreg 64→10": mlp_shapes((64, 10)),
}


def spec_tree(shapes: dict):
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


# ------------------------------------------------------------------ (a) state bytes


def part_a(args) -> dict:
    print("\n## (a) optimizer state (from `jax.eval_shape(opt.init, params)`, f32)\n")
    trees = ["MLP 64-256-256-10", "transformer block d=256"]
    res = {}
    header = "| structure | " + " | ".join(
        f"{t} ({n_params(spec_tree(TREES[t])):,} params): preconditioner | × params"
        for t in trees
    )
    print(header + " |")
    print("|---|" + "---|---|" * len(trees))
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
            note = " (not built)" if name == "dense" and n > args.dense_max else ""
            row += [_fmt_bytes(b) + note, f"{b / (4 * n):.2f}"]
        print("| " + " | ".join(row) + " |")
    print(
        "\nadam: its two moment buffers (2n floats). PSGD rows: the preconditioner only; "
        "the momentum buffer (n floats at b1 > 0) comes on top."
    )
    return {f"{k[0]} | {k[1]}": v for k, v in res.items()}


# ------------------------------------------------------------------ (b) step time


def part_b(args) -> dict:
    print("\n## (b) optimizer-only step time, ratio to optax.adam (same run, interleaved)\n")
    trees = args.time_trees
    results = {}
    for t in trees:
        params0 = _normal_tree(jax.random.PRNGKey(0), TREES[t], 0.05)
        grads = _normal_tree(jax.random.PRNGKey(1), TREES[t], 1e-3)
        n = n_params(params0)
        cfgs = [("adam", None)]
        for s in STRUCTS:
            if s == "dense" and n > args.dense_max:
                continue
            cfgs += [(s, "refit"), (s, "apply")]

        def make_runner(opt, mode):
            flag = None if mode is None else (mode == "refit")

            def run(params, state, g0, k):
                def body(i, carry):
                    p, s = carry
                    scale = 1.0 + 1e-6 * i.astype(jnp.float32)
                    g = jax.tree.map(lambda x: x * scale, g0)
                    if flag is None:
                        u, s = opt.update(g, s, p)
                    else:
                        u, s = opt.update(g, s, p, update_preconditioner=jnp.asarray(flag))
                    return optax.apply_updates(p, u), s

                return jax.lax.fori_loop(0, k, body, (params, state))

            return jax.jit(run, donate_argnums=(0, 1))

        runners, carries, ks = {}, {}, {}
        for name, mode in cfgs:
            key = f"{name} {mode or ''}".strip()
            opt = make_opt(name, 1e-4)
            p = jax.tree.map(jnp.copy, params0)
            s = jax.tree.map(lambda x: jnp.array(x, copy=True), opt.init(p))
            run = make_runner(opt, mode)
            p, s = jax.block_until_ready(run(p, s, grads, 1))  # compile (+1 step)
            t0 = time.perf_counter()
            p, s = jax.block_until_ready(run(p, s, grads, 2))
            per = (time.perf_counter() - t0) / 2
            ks[key] = max(1, min(args.max_steps, int(args.window / max(per, 1e-7))))
            runners[key], carries[key] = run, (p, s)
        keys = list(runners)
        times = {k: [] for k in keys}
        for r in range(args.reps):
            order = keys[r % len(keys):] + keys[: r % len(keys)]
            for k in order:
                p, s = carries[k]
                t0 = time.perf_counter()
                p, s = jax.block_until_ready(runners[k](p, s, grads, ks[k]))
                times[k].append((time.perf_counter() - t0) / ks[k])
                carries[k] = (p, s)
        bad = [k for k in keys if not all(bool(jnp.all(jnp.isfinite(x)))
                                          for x in jax.tree.leaves(carries[k][0]))]
        if bad:
            print(f"WARNING: non-finite params after timing: {bad}")

        def ratio(k):
            return _med([a / b for a, b in zip(times[k], times["adam"])])

        print(f"**{t}** ({n:,} params; adam {1e6 * _med(times['adam']):,.0f} µs/step)\n")
        print("| structure | refit every step: µs/step | × adam | apply only: µs/step | × adam |")
        print("|---|---|---|---|---|")
        for s in STRUCTS:
            if f"{s} refit" not in times:
                print(f"| {s} | — | — | — | — |")
                continue
            tr, ta = _med(times[f"{s} refit"]), _med(times[f"{s} apply"])
            print(f"| {s} | {1e6 * tr:,.0f} | {ratio(f'{s} refit'):.2f} | "
                  f"{1e6 * ta:,.0f} | {ratio(f'{s} apply'):.2f} |")
            results[f"{t} | {s}"] = {
                "refit_us": 1e6 * tr, "refit_x_adam": ratio(f"{s} refit"),
                "apply_us": 1e6 * ta, "apply_x_adam": ratio(f"{s} apply"),
            }
        results[f"{t} | adam"] = {"us": 1e6 * _med(times["adam"])}
        print()
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


def part_c(args) -> dict:
    print(f"\n## (c) whitening: sklearn digits, {args.digits_steps} steps of batch 64\n")
    xtr, ytr, xte, yte = load_digits_split()
    idx = jax.random.randint(jax.random.PRNGKey(3), (args.digits_steps, 64), 0, xtr.shape[0])
    problems = {"logreg 64→10": (64, 10), "MLP 64-64-10": (64, 64, 10)}
    lrs = jnp.asarray(args.digits_lrs, jnp.float32)
    res = {}
    for pname, sizes in problems.items():
        p0 = mlp_init(jax.random.PRNGKey(2), sizes)
        n = n_params(p0)
        rows = []
        for name in ("adam",) + STRUCTS:
            if name == "dense" and n > args.dense_max:
                rows.append((name, None))
                continue

            def train(lr, name=name):
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
            loss, acc = jax.block_until_ready(jax.jit(jax.vmap(train))(lrs))
            loss = np.where(np.isfinite(loss), np.asarray(loss), np.inf)
            best = int(np.argmin(loss))
            rows.append((name, (float(loss[best]), float(acc[best]),
                                float(lrs[best]), time.perf_counter() - t0)))
        print(f"**{pname}** ({n:,} params)\n")
        print("| optimizer | final train loss | test accuracy | best lr |")
        print("|---|---|---|---|")
        for name, r in rows:
            if r is None:
                print(f"| {name} | — | — | — |")
                continue
            print(f"| {name} | {r[0]:.2e} | {100 * r[1]:.1f} % | {r[2]:g} |")
            res[f"{pname} | {name}"] = {"loss": r[0], "test_acc": r[1], "lr": r[2]}
        print()
    print(f"lr grid {list(args.digits_lrs)}; each alias's other defaults.")
    return res


# ------------------------------------------------------------------ (d) Newton quadratic


def quadratic(n=200, cond=1e4, seed=0):
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.logspace(0.0, np.log10(cond), n)
    h = (basis * eig) @ basis.T
    xs = rng.standard_normal(n)
    xs /= np.sqrt(0.5 * xs @ h @ xs)  # f(0) = 1
    return jnp.asarray(h, jnp.float32), jnp.asarray(xs, jnp.float32)


def part_d(args) -> dict:
    print(f"\n## (d) Newton fitting: ill-conditioned quadratic, 200 params, ≤ "
          f"{args.newton_steps} steps\n")
    h, xs = quadratic()
    shape = (10, 20)

    def f(params):
        d = params["x"].reshape(-1) - xs
        return 0.5 * d @ (h @ d)

    p0 = {"x": jnp.zeros(shape, jnp.float32)}
    res = {}
    rows = []
    for name in ("adam",) + STRUCTS:
        newton = name != "adam"
        lrs = jnp.asarray(args.newton_lrs if newton else args.adam_lrs, jnp.float32)
        kw = {}
        if newton:
            kw = dict(preconditioner_lr=args.newton_plr, grad_clip_max_amp=None,
                      grad_clip_max_element=None)

        def train(lr, name=name, newton=newton, kw=kw):
            opt = make_opt(name, lr, **kw)
            state = opt.init(p0)
            keys = jax.random.split(jax.random.PRNGKey(4), args.newton_steps)

            def body(carry, k):
                p, s = carry
                if newton:
                    loss, g, hvp, v, refit = psgd_eqx.hessian_helper(k, f, p)
                    u, s = opt.update(g, s, p, Hvp=hvp, vector=v, update_preconditioner=refit)
                else:
                    loss, g = jax.value_and_grad(f)(p)
                    u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            (p, _), losses = jax.lax.scan(body, (p0, state), keys)
            return jnp.concatenate([losses[1:], f(p)[None]])  # loss after step t = 1..T

        losses = np.asarray(jax.jit(jax.vmap(train))(lrs))
        hit = losses < args.newton_tol
        steps = np.where(hit.any(-1), hit.argmax(-1) + 1, np.iinfo(np.int32).max)
        best = int(np.argmin(np.where(steps < np.iinfo(np.int32).max, steps, 10**9)
                             + np.nan_to_num(losses[:, -1], nan=1e30, posinf=1e30) * 1e-12))
        if steps[best] == np.iinfo(np.int32).max:
            best = int(np.nanargmin(np.where(np.isfinite(losses[:, -1]), losses[:, -1], np.inf)))
        reached = steps[best] < np.iinfo(np.int32).max
        rows.append((name, int(steps[best]) if reached else None, float(losses[best, -1]),
                     float(lrs[best])))
    print(f"| optimizer | steps to f < {args.newton_tol:g} (f₀ = 1) | f after "
          f"{args.newton_steps} steps | best lr |")
    print("|---|---|---|---|")
    for name, st, fin, lr in rows:
        st_s = f"{st:,}" if st is not None else f"> {args.newton_steps:,}"
        print(f"| {name}{'' if name == 'adam' else ' (Newton)'} | {st_s} | {fin:.1e} | {lr:g} |")
        res[name] = {"steps": st, "final": fin, "lr": lr}
    print(f"\nNewton lr grid {list(args.newton_lrs)}, preconditioner_lr {args.newton_plr}, "
          f"update clipping off; adam lr grid {list(args.adam_lrs)}.")
    return res


# ------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="abcd", help="any of a, b, c, d (default: all)")
    ap.add_argument("--reps", type=int, default=5, help="(b) interleaved repetitions")
    ap.add_argument("--window", type=float, default=0.15,
                    help="(b) seconds per measurement (steps are calibrated)")
    ap.add_argument("--max-steps", type=int, default=2000, help="(b) cap on steps/measurement")
    ap.add_argument("--time-trees", type=str, default="MLP 64-256-256-10,transformer block "
                    "d=256,logreg 64→10", help="(b) comma list of trees to time")
    ap.add_argument("--dense-max", type=int, default=10_000,
                    help="build DenseQ only for at most this many parameters")
    ap.add_argument("--digits-steps", type=int, default=500)
    ap.add_argument("--digits-lrs", type=str, default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--newton-steps", type=int, default=500)
    ap.add_argument("--newton-lrs", type=str, default="0.1,0.3,1.0")
    ap.add_argument("--newton-plr", type=float, default=0.5)
    ap.add_argument("--newton-tol", type=float, default=1e-6)
    ap.add_argument("--adam-lrs", type=str, default="1e-3,1e-2,1e-1")
    ap.add_argument("--quick", action="store_true", help="smoke run")
    ap.add_argument("--json", type=str, default=None,
                    help="write the numbers here (must be under benchmarks/out/)")
    args = ap.parse_args(argv)
    for name in ("digits_lrs", "newton_lrs", "adam_lrs"):
        setattr(args, name, tuple(float(x) for x in getattr(args, name).split(",")))
    args.time_trees = [t.strip() for t in args.time_trees.split(",") if t.strip()]
    if args.quick:
        args.reps, args.window, args.digits_steps, args.newton_steps = 2, 0.02, 50, 50
        args.time_trees = ["logreg 64→10"]
    if args.json:
        path = os.path.abspath(args.json)
        if os.path.commonpath([path, OUT_DIR]) != OUT_DIR:
            ap.error(f"--json must be under {OUT_DIR}")
        os.makedirs(OUT_DIR, exist_ok=True)
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
