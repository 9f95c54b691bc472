"""Time the Pallas kernels of `psgd_eqx_kernels` against their jnp references under jit.

Each configuration runs `iters` applications of the op inside one jitted `fori_loop` (the
output of one is the input of the next, so nothing is hoisted and no host dispatch is
timed), `--reps` times after a warm-up; the table shows the median time per application.
That includes one trip of the loop itself: on GPU an XLA while loop costs ~10-30 µs per
trip, shown as "loop µs" (the same loop around a trivial body), so at small sizes both
columns sit on that floor; `--subtract-loop` subtracts it.

    python benchmarks/kernels.py                  # GPU: every op, n 128..4096, stacks 1, 8, 32
    python benchmarks/kernels.py --ops eq --n 512,1024 --batch 8
    python benchmarks/kernels.py --interpret      # CPU smoke test (interpreted kernels)
    python benchmarks/kernels.py --step 512,1024 --step-geometry EQ   # whole kron steps

Ops: `eq` (eq_factor_update), `eq_fused` (the same with `fuse_difference=True`: one launch),
`pro` (pro_factor_update), `kron` (kron_apply, two dense
factors), `kron_tri` (two triangular factors, the EQ case), `kron_cached` (cached P),
`kron_diag` (two diagonal factors: pure bandwidth). For the `kron*` ops the table also gives
the bytes that must move through HBM (G and the factors read once, P·G written once) over the
time, against `--peak-bw` (H100 SXM: 3.35 TB/s), and the achieved TFLOP/s.
"""

import argparse
import functools as ft
import json
import math
import os
import statistics
import sys
import time
import warnings


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "kernels"))

import jax
import jax.numpy as jnp
import psgd_eqx_kernels as K


warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")

OPS = ("eq", "eq_fused", "pro", "kron", "kron_tri", "kron_cached", "kron_diag")


def _inputs(op, n, batch, dtype, key):
    ks = jax.random.split(key, 4)
    shape = (batch, n, n)
    eye = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), shape)
    if op.startswith("eq"):
        q = jnp.triu(jax.random.normal(ks[0], shape)) / n + eye
        a = jax.random.normal(ks[1], shape)
        b = jax.random.normal(ks[2], shape)
        t1 = (a @ jnp.swapaxes(a, -1, -2)) / n
        t2 = (b @ jnp.swapaxes(b, -1, -2)) / n
        return dict(q=q.astype(dtype), t1=t1.astype(dtype), t2=t2.astype(dtype),
                    eta=jnp.full((batch,), 0.05, jnp.float32))
    if op == "pro":
        q = jax.random.normal(ks[0], shape) / (4 * n) + eye
        a = jax.random.normal(ks[1], shape)
        t = (a @ jnp.swapaxes(a, -1, -2)) / n
        return dict(q=q.astype(dtype), t=t.astype(dtype), c=jnp.ones((batch,), jnp.float32),
                    eta=jnp.full((batch,), 0.05, jnp.float32))
    g = jax.random.normal(ks[0], shape).astype(dtype)
    if op == "kron_diag":
        ql = 1.0 + 0.01 * jax.random.normal(ks[1], (batch, n))
        qr = 1.0 + 0.01 * jax.random.normal(ks[2], (batch, n))
    else:
        ql = jax.random.normal(ks[1], shape) / (4 * n) + eye
        qr = jax.random.normal(ks[2], shape) / (4 * n) + eye
        if op == "kron_tri":
            ql, qr = jnp.triu(ql), jnp.triu(qr)
        if op == "kron_cached":
            ql = jnp.swapaxes(ql, -1, -2) @ ql
            qr = jnp.swapaxes(qr, -1, -2) @ qr
    return dict(g=g, ql=ql.astype(dtype), qr=qr.astype(dtype))


def _step_fns(op, kw):
    """(kernel_step, reference_step): carry -> carry, one application of the op each."""
    if op.startswith("eq"):

        def make(fn):
            def step(c):  # swap T1/T2 each step so T1 − T2 is not loop-invariant
                return dict(q=fn(c["q"], c["t1"], c["t2"], c["eta"]), t1=c["t2"], t2=c["t1"],
                            eta=c["eta"])

            return step

        reference = make(lambda *a: K.eq_factor_update_reference(*a, precision=kw["precision"]))
        fuse = op == "eq_fused"
        return make(lambda *a: K.eq_factor_update(*a, fuse_difference=fuse, **kw)), reference
    if op == "pro":

        def make(fn):
            return lambda c: dict(c, q=fn(c["q"], c["t"], c["c"], c["eta"]))

        return (make(lambda *a: K.pro_factor_update(*a, **kw)),
                make(lambda *a: K.pro_factor_update_reference(*a, precision=kw["precision"])))
    opts = dict(triangular=op == "kron_tri", cached=op == "kron_cached")

    def make(fn):
        return lambda c: dict(c, g=fn(c["g"], c["ql"], c["qr"]))

    return (make(lambda *a: K.kron_apply(*a, **opts, **kw)),
            make(lambda *a: K.kron_apply_reference(*a, **opts, precision=kw["precision"])))


UNROLL = 1  # applications of the op per loop trip (`--unroll`)


def _looped(step):
    def body(_, c):
        for _ in range(UNROLL):  # straight-line copies: no loop trip between them
            c = step(c)
        return c

    @jax.jit
    def run(carry, iters):
        return jax.lax.fori_loop(0, iters, body, carry)

    return run


def _time(run, carry, iters, reps):
    """Median seconds per application of the op (`iters` trips of `UNROLL` each)."""
    out = run(carry, iters)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = run(carry, iters)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / (iters * UNROLL))
    return statistics.median(times)


def _overhead(carry, iters, reps):
    """Per-trip cost of the timing loop itself (a body that touches one scalar)."""

    return _time(_looped(_touch), carry, iters, reps)


def _touch(c):
    k = min(c, key=lambda name: c[name].size)  # the smallest leaf
    return dict(c, **{k: c[k] * jnp.asarray(1.0, c[k].dtype)})


def _calibrate(run, carry, target_s, max_iters):
    t = _time(run, carry, 1, 1)  # compiles, then one timed application
    return max(1, min(max_iters, int(target_s / max(t, 1e-7)))), t


def _traffic(op, n, batch, itemsize):
    """(bytes that must move, flops) of one kron apply of an n×n G."""
    g = batch * n * n * itemsize
    if op == "kron_diag":
        return 2 * g + 2 * batch * n * itemsize, 2 * batch * n * n
    factors = 2 * batch * n * n * itemsize
    products = {"kron": 4, "kron_tri": 2, "kron_cached": 2}[op]  # n³-products (tri: halves)
    return 2 * g + factors, products * 2 * batch * n**3


def _scale_experiment(args, ns, batches, dtype):
    from psgd_eqx_kernels import _matmul

    for n in ns:
        for batch in batches:
            x = jax.random.normal(jax.random.key(0), (batch, n, n)).astype(dtype)
            rs = jnp.ones((batch, n, 1), jnp.float32)
            cs = jnp.ones((batch, 1, n), jnp.float32)
            nbytes = 2 * x.size * x.dtype.itemsize
            for spec in args.scale_tiles.split(","):
                bm, bn, warps = (int(v) for v in spec.split("x"))

                def step(c, bm=bm, bn=bn, warps=warps):
                    return dict(c, x=_matmul.scale(c["x"], c["rs"], c["cs"], backend=args.backend,
                                                   interpret=args.interpret, num_warps=warps,
                                                   tile=(bm, bn)))

                carry = dict(x=x, rs=rs, cs=cs)
                t = _time(_looped(step), carry, 20, args.reps)
                print(f"scale n={n} stack={batch} tile={bm}x{bn} warps={warps}: "
                      f"{t * 1e6:,.1f} µs, {nbytes / t / 1e9:,.0f} GB/s", flush=True)


def _layer_stack(layers: int, d: int, vocab: int = 512):
    """A scanned transformer-shaped tree: (layers, …) stacks of attention/MLP/norm weights."""
    ks = jax.random.split(jax.random.key(0), 8)
    w = lambda k, *shape: 0.02 * jax.random.normal(k, shape)  # noqa: E731
    return {
        "embed": w(ks[0], vocab, d),
        "blocks": {
            "wq": w(ks[1], layers, d, d), "wk": w(ks[2], layers, d, d),
            "wv": w(ks[3], layers, d, d), "wo": w(ks[4], layers, d, d),
            "up": w(ks[5], layers, d, 4 * d), "down": w(ks[6], layers, 4 * d, d),
            "ln": jnp.ones((layers, d)),
        },
        "unembed": w(ks[7], d, vocab),
    }


def _step_experiment(args, ds):
    """Whole `kron` update steps (refit probability 1) with and without kernels.

    Times `opt.update` + `apply_updates` under one jit, state and params donated, blocked
    on every step (median of `--reps` × 10 steps); `optax.adam` on the same tree for scale.
    `kron` dispatches only the fused `EQ` factor update, so `use_kernels` changes nothing
    for any other `--step-geometry`, and under `"auto"` only factors with n ≥ 2048 (from
    `d_model` 512, the 4·d axis of the MLP weights) get the kernel.
    """
    import optax

    import psgd_eqx

    geometries = args.step_geometry.split(",")
    names = {"False": False, "auto": "auto", "True": True}
    settings = [(names[v], v) for v in args.step_kernels.split(",")]
    columns = " | ".join(f"use_kernels={n} ms" for _, n in settings)
    print(f"| d_model | layers | geometry | {columns} | adam ms | first / last |")
    print("|---|---|---|" + "---|" * len(settings) + "---|---|")
    for d in ds:
        params = _layer_stack(args.step_layers, d)
        grads = jax.tree.map(lambda p: 0.01 * jnp.sin(7.0 * p + 1.0), params)
        scanned = {"embed": False, "unembed": False,
                   "blocks": jax.tree.map(lambda _: True, params["blocks"])}

        def timed(opt):
            state = opt.init(params)

            @ft.partial(jax.jit, donate_argnums=(1, 2))
            def step(g, s, p):
                u, s = opt.update(g, s, p)
                return optax.apply_updates(p, u), s

            p, s = step(grads, state, jax.tree.map(jnp.copy, params))
            jax.block_until_ready((p, s))
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(10):
                    p, s = step(grads, s, p)
                jax.block_until_ready((p, s))
                times.append((time.perf_counter() - t0) / 10)
            return 1e3 * statistics.median(times)

        t_adam = timed(optax.adam(1e-3))
        for geometry in geometries:
            ts = [timed(psgd_eqx.kron(1e-3, geometry=geometry, use_kernels=u,
                                      scanned_layers=scanned,
                                      preconditioner_update_probability=1.0))
                  for u, _ in settings]
            print(f"| {d} | {args.step_layers} | {geometry} | "
                  + " | ".join(f"{t:.2f}" for t in ts)
                  + f" | {t_adam:.2f} | {ts[0] / ts[-1]:.2f}× |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--n", default=None, help="comma list (default 128..4096; 16,40 interpret)")
    p.add_argument("--batch", default=None, help="comma list (default 1,8,32; 2 interpret)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    p.add_argument("--precision", default="default", choices=["default", "highest"])
    p.add_argument("--backend", default="gpu", choices=["gpu", "tpu"])
    p.add_argument("--interpret", action="store_true", help="interpreted kernels (CPU smoke)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--target-ms", type=float, default=30.0, help="time per timed repetition")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--max-gib", type=float, default=24.0,
                   help="skip configurations whose inputs exceed this many GiB")
    p.add_argument("--block", default=None,
                   help="block_m,block_n,block_k[,num_warps,num_stages] (default: heuristic)")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="HBM bytes/s of the roofline")
    p.add_argument("--json", default=None, help="write the raw rows here")
    p.add_argument("--subtract-loop", action="store_true",
                   help="subtract the timing loop's own per-trip cost from both times")
    p.add_argument("--scale-tiles", default=None,
                   help="experiment: time the diagonal-scaling kernel on (stack, n, n) with "
                   "these 'bm x bn x warps' tiles, e.g. 8x1024x8,32x256x4 (uses --n/--batch)")
    p.add_argument("--unroll", type=int, default=1,
                   help="applications of the op per loop trip (amortises the loop's cost)")
    p.add_argument("--step", default=None,
                   help="whole optimizer steps instead of ops: comma list of d_model values")
    p.add_argument("--step-layers", type=int, default=8)
    p.add_argument("--step-geometry", default="EQ,PRO")
    p.add_argument("--step-kernels", default="False,auto,True",
                   help="use_kernels settings to time (first / last is the ratio column)")
    args = p.parse_args(argv)
    global UNROLL
    UNROLL = args.unroll

    ops = [o for o in args.ops.split(",") if o]
    for o in ops:
        if o not in OPS:
            p.error(f"unknown op {o!r}; choose from {OPS}")
    ns = [int(x) for x in (args.n or ("16,40" if args.interpret else
                                      "128,256,512,1024,2048,4096")).split(",")]
    batches = [int(x) for x in (args.batch or ("2" if args.interpret else "1,8,32")).split(",")]
    dtype = jnp.float32 if args.dtype == "f32" else jnp.bfloat16
    precision = None if args.precision == "default" else jax.lax.Precision.HIGHEST
    blocks = None
    if args.block:
        vals = [int(x) for x in args.block.split(",")]
        blocks = K.BlockSizes(*vals)
    kw = dict(backend=args.backend, interpret=args.interpret, precision=precision,
              block_sizes=blocks)
    dev = jax.devices()[0]
    print(f"# device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {args.dtype}, precision {args.precision}, interpret {args.interpret}, "
          f"blocks {blocks or 'default'}", flush=True)
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    if args.scale_tiles:
        _scale_experiment(args, ns, batches, dtype)
        return
    if args.step:
        _step_experiment(args, [int(x) for x in args.step.split(",")])
        return
    header = ("| op | n | stack | kernel µs | reference µs | loop µs | speed-up | GB/s (kernel) | "
              "% HBM roofline | TFLOP/s (kernel) |")
    print(header + "\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for op in ops:
        for n in ns:
            for batch in batches:
                n_in = {"pro": 2}.get(op, 3)
                gib = n_in * batch * n * n * itemsize / 2**30
                if gib > args.max_gib:
                    continue
                carry = _inputs(op, n, batch, dtype, jax.random.key(n * 131 + batch))
                k_step, r_step = _step_fns(op, kw)
                row = dict(op=op, n=n, batch=batch, dtype=args.dtype)
                try:
                    k_run, r_run = _looped(k_step), _looped(r_step)
                    iters, _ = _calibrate(r_run, carry, args.target_ms / 1e3, args.max_iters)
                    t_ref = _time(r_run, carry, iters, args.reps)
                    t_ker = _time(k_run, carry, iters, args.reps)
                    t_loop = _overhead(carry, iters, args.reps)
                    row.update(raw_kernel_s=t_ker, raw_reference_s=t_ref, loop_s=t_loop)
                    if args.subtract_loop:
                        t_ref = max(t_ref - t_loop, 1e-9)
                        t_ker = max(t_ker - t_loop, 1e-9)
                except Exception as e:  # report and go on (e.g. out of memory)
                    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    print(f"| {op} | {n} | {batch} | failed: {msg} |", flush=True)
                    row["error"] = msg
                    rows.append(row)
                    continue
                row.update(kernel_s=t_ker, reference_s=t_ref, speedup=t_ref / t_ker,
                           iters=iters)
                bw = pct = tflops = ""
                if op.startswith("kron"):
                    nbytes, flops = _traffic(op, n, batch, itemsize)
                    row.update(bytes=nbytes, flops=flops, bw=nbytes / t_ker,
                               tflops=flops / t_ker / 1e12)
                    bw = f"{nbytes / t_ker / 1e9:,.0f}"
                    pct = f"{100 * nbytes / t_ker / args.peak_bw:.0f}%"
                    tflops = f"{flops / t_ker / 1e12:.1f}"
                elif op.startswith("eq"):
                    tflops = f"{batch * 2 * n**3 / 6 / t_ker / 1e12:.1f}"
                elif op == "pro":
                    tflops = f"{batch * 3 * 2 * n**3 / t_ker / 1e12:.1f}"
                rows.append(row)
                print(f"| {op} | {n} | {batch} | {t_ker * 1e6:,.1f} | {t_ref * 1e6:,.1f} | "
                      f"{t_loop * 1e6:,.1f} | {t_ref / t_ker:.2f}× | {bw} | {pct} | {tflops} |",
                      flush=True)
                del carry
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=rows), f, indent=1)
    ok = [r for r in rows if "speedup" in r]
    if ok:
        gmean = math.exp(sum(math.log(r["speedup"]) for r in ok) / len(ok))
        print(f"# geometric-mean speed-up over {len(ok)} configurations: {gmean:.2f}×")


if __name__ == "__main__":
    main()
