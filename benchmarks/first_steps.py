"""How long a user waits: first steps, compiles and small-model steps, each as a ratio to Adam.

Every number is printed next to `optax.adam`'s (and psgdax's where it applies), measured in
the same run and interleaved: each repetition runs every configuration once, in a rotated
order, values are medians over repetitions and ratios are medians of the per-repetition
paired ratios. Timings are given as "wall / CPU": wall-clock seconds and
`time.process_time()` of the process (all its threads), which is much less sensitive to
other load on a shared machine.

Parts (`--only SUBSTRING` runs the parts whose name contains it):

1. `eager_readme`: psgd_jax's README examples as written, an eager Python loop without
   `jax.jit`, loss `sum((params - x)**2)`, params [1, 2, 3], x = 0: (a) whitening with
   `xmat(learning_rate=1.0, b1=0.0, preconditioner_update_probability=1.0)` and
   `jax.value_and_grad`; (b) Newton with `hessian_helper` + `xmat(1.0, b1=0.0)`; (c)
   `kron(1e-2)` on two tiny leaves {"w": (4, 3), "b": (3,)}, also psgdax.kron eager (skipped
   when its first step takes over `--psgdax-eager-cap` s). Reference: the same loop with
   `optax.adam(1e-2)` (value_and_grad). Each loop runs in a fresh Python process (so the
   first step is as cold as a user's); reported: `opt.init`, first step, median of steps
   2..N, and for (b) the growth of ru_maxrss between step 10 and step 1,000.
2. `compile_tree`: 16 (and 64) layers of tiny matrices, per layer {"w_in": (16, 32),
   "w_out": (32, 16), "b": (32,)} (3 distinct shapes): trace (`lower`) and XLA compile of
   `jax.jit(opt.update)` for `psgd_eqx.kron(1e-3, preconditioner_update_probability=1.0)`,
   psgdax.kron (refit probability 1.0), `optax.adam`, and Adam's whole train step (residual
   MLP x -> x + tanh(x @ w_in + b) @ w_out on an (8, 16) batch: value_and_grad + update +
   apply_updates). Also StableHLO op counts of the lowered update and the number of
   top-level fusions in the compiled update's ENTRY computation. Each measurement runs in a
   fresh process (cold caches).
3. `compile_quickstart`: the first call (trace + compile + run) of the train step of
   `examples/quickstart.py` (digits MLP, `eqx.filter_jit`, `eqx.partition`) with
   `psgd_eqx.kron(1e-3)` and `optax.adam(3e-3)`, each in a fresh process.
4. `step_tree`: per-step time of the 16-layer tree's optimizer update alone (jitted, state
   donated, K steps dispatched back to back), psgd_eqx and psgdax kron at refit probability
   1.0 and 0.03 (constant), against Adam.
5. `lm_step`: the full LM train step of `step_time.py` part (b) (4 layers, d = 256, ctx
   128, batch 32 = 4,096 tokens) with vocab 256; `psgd_eqx.kron(lr)` with its default
   options at refit probability 1.0 and 0.03 against Adam; `--lm-kron-kwargs` adds other
   psgd_eqx options (e.g. 'max_skew_triangular=1.0') timed in the same run.

Usage:

    python benchmarks/first_steps.py                # full run (≈ 25 min wall on 2 busy cores)
    python benchmarks/first_steps.py --quick        # smoke run (small sizes, 1 rep, p=1 only;
                                                    # ≈ 2 min CPU, 3.5 min wall at load 6)
    python benchmarks/first_steps.py --only compile --reps 2 --json out/first.json

psgd_eqx is imported normally, so `PYTHONPATH=/path/to/other/checkout python
benchmarks/first_steps.py` measures another checkout (the child processes inherit the
environment). The persistent compilation cache is disabled.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


_HERE = os.path.dirname(os.path.abspath(__file__))
_EXAMPLES = os.path.join(os.path.dirname(_HERE), "examples")
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
if _EXAMPLES not in sys.path:
    sys.path.append(_EXAMPLES)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402


jax.config.update("jax_enable_compilation_cache", False)

import psgd_eqx  # noqa: E402


try:
    import psgdax
except ImportError:  # pragma: no cover - optional comparison dependency
    psgdax = None

PARTS = ("eager_readme", "compile_tree", "compile_quickstart", "step_tree", "lm_step")
P_LATE = 0.03


# ---------------------------------------------------------------------------- helpers


class Clock:
    """Wall-clock and process CPU time of a block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0

    @property
    def pair(self):
        return [self.wall, self.cpu]


def _med(xs):
    xs = [x for x in xs if x is not None and x == x]
    return statistics.median(xs) if xs else float("nan")


def _is_pair(v):
    return isinstance(v, (list, tuple))


def med_value(vals):
    """Median over repetitions; a (wall, cpu) pair elementwise."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    if _is_pair(vals[0]):
        return [_med([v[i] for v in vals]) for i in range(len(vals[0]))]
    return _med(vals)


def paired_ratio(num, den):
    """Median of per-repetition ratios num[r] / den[r] (elementwise for pairs)."""
    pairs = [(a, b) for a, b in zip(num or [], den or []) if a is not None and b is not None]
    if not pairs:
        return None
    if _is_pair(pairs[0][0]):
        return [
            _med([a[i] / b[i] if b[i] else float("nan") for a, b in pairs])
            for i in range(len(pairs[0][0]))
        ]
    return _med([a / b if b else float("nan") for a, b in pairs])


def fmt(v, spec="{:.2f}"):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if _is_pair(v):
        return " / ".join(fmt(x, spec) for x in v)
    if v != v:
        return "n/a"
    if spec == "g3":  # 3 significant digits, no exponent
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return spec.format(v)


def fmt_ratio(v):
    if v is None:
        return "—"
    if _is_pair(v):
        return " / ".join(fmt_ratio(x) for x in v)
    if v != v:
        return "n/a"
    return f"{v:.3g}×" if v < 100 else f"{v:,.0f}×"


class Table:
    """Rows of per-repetition values; printed as medians and paired ratios."""

    def __init__(self):
        self.rows = []

    def add(self, part, quantity, eqx, adam=None, psgdax_=None, goal="", spec="{:.2f}",
            adam_ratio=True):
        """`eqx`, `adam`, `psgdax_`: per-repetition lists (of numbers or wall/CPU pairs), or
        a string for a cell without numbers (e.g. "skipped ...")."""
        row = dict(part=part, quantity=quantity, goal=goal)
        row["eqx"] = eqx if isinstance(eqx, str) else med_value(eqx)
        row["adam"] = adam if isinstance(adam, str) else med_value(adam) if adam else None
        row["psgdax"] = (
            psgdax_ if isinstance(psgdax_, str) else med_value(psgdax_) if psgdax_ else None
        )
        numeric = not isinstance(eqx, str)
        row["eqx_over_adam"] = (
            paired_ratio(eqx, adam)
            if adam_ratio and numeric and adam and not isinstance(adam, str)
            else None
        )
        row["eqx_over_psgdax"] = (
            paired_ratio(eqx, psgdax_)
            if numeric and psgdax_ and not isinstance(psgdax_, str)
            else None
        )
        row["spec"] = spec
        self.rows.append(row)

    def print(self):
        print(
            "| part | quantity | psgd_eqx | adam | psgd_eqx / adam | psgdax "
            "| psgd_eqx / psgdax | goal |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            s = r["spec"]
            print(
                f"| {r['part']} | {r['quantity']} | {fmt(r['eqx'], s)} | {fmt(r['adam'], s)} "
                f"| {fmt_ratio(r['eqx_over_adam'])} | {fmt(r['psgdax'], s)} "
                f"| {fmt_ratio(r['eqx_over_psgdax'])} | {r['goal']} |"
            )

    def as_json(self):
        return [{k: v for k, v in r.items() if k != "spec"} for r in self.rows]


def rotated(items, r):
    k = r % len(items)
    return items[k:] + items[:k]


def run_child(spec: dict, timeout: float):
    """Runs this script in a fresh process on one measurement; returns its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"rc {proc.returncode}: " + " | ".join(tail)}


def _quiet(fn):
    """Runs fn with stdout sent to stderr (psgdax prints its preconditioner sizes)."""
    old = sys.stdout
    sys.stdout = sys.stderr
    try:
        return fn()
    finally:
        sys.stdout = old


def fresh_buffers(tree):
    """Copies every leaf into its own buffer so a state can be donated."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------- models / trees


def tiny_tree(layers: int):
    key = jax.random.PRNGKey(0)
    out = []
    for i in range(layers):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        out.append({
            "w_in": jax.random.normal(k1, (16, 32)) / 4.0,
            "w_out": jax.random.normal(k2, (32, 16)) / math.sqrt(32.0) * 0.1,
            "b": jnp.zeros((32,)),
        })
    return out


def tiny_mlp_loss(params, x):
    for lp in params:
        x = x + jnp.tanh(x @ lp["w_in"] + lp["b"]) @ lp["w_out"]
    return jnp.mean(jnp.square(x))


def tiny_grads(params):
    return jax.tree.map(lambda p: 0.01 * jnp.sin(7.0 * p + 1.0), params)


def stablehlo_ops(text: str) -> int:
    from bucketing import stablehlo_ops as count

    return count(text)


def entry_fusions(hlo_text: str) -> int:
    """Lines of the ENTRY computation of an optimized HLO module that call a fusion."""
    n, inside = 0, False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY"):
            inside = True
            continue
        if inside:
            if line.startswith("}"):
                break
            if " fusion(" in line:
                n += 1
    return n


def make_opt(lib: str, lr: float, prob=None, **kwargs):
    if lib == "adam":
        return optax.adam(lr)
    if lib == "psgd_eqx":
        if prob is not None:
            kwargs["preconditioner_update_probability"] = prob
        return psgd_eqx.kron(lr, **kwargs)
    if lib == "psgdax":
        if psgdax is None:
            raise RuntimeError("psgdax is not importable")
        if prob is not None:
            kwargs["preconditioner_update_probability"] = prob
        return psgdax.kron(lr, **kwargs)
    raise ValueError(lib)


# ------------------------------------------------------------------- child processes


def _readme_loss(params, x):
    return jnp.sum((params - x) ** 2)


def child_eager(spec):
    case, lib, n = spec["case"], spec["lib"], spec["steps"]
    mem_steps = spec.get("mem_steps", 0)
    cap = spec.get("cap_s")  # skip the loop when the first step takes longer than this
    max_total = spec.get("max_total_s")  # stop timing steps after this much time (>= 3 steps)
    if case in ("whiten", "newton"):
        params, x = jnp.array([1.0, 2.0, 3.0]), jnp.array([0.0, 0.0, 0.0])
        if lib == "adam":
            opt = optax.adam(1e-2)
        elif case == "whiten":
            opt = psgd_eqx.xmat(learning_rate=1.0, b1=0.0, preconditioner_update_probability=1.0)
        else:
            opt = psgd_eqx.xmat(learning_rate=1.0, b1=0.0)
        loss_fn, extra = _readme_loss, (x,)
    else:  # kron_tiny
        kx, ky, kw = jax.random.split(jax.random.PRNGKey(0), 3)
        xd, yd = jax.random.normal(kx, (8, 4)), jax.random.normal(ky, (8, 3))
        params = {"w": 0.1 * jax.random.normal(kw, (4, 3)), "b": jnp.zeros((3,))}

        def loss_fn(p, xd, yd):
            return jnp.mean((xd @ p["w"] + p["b"] - yd) ** 2)

        extra = (xd, yd)
        opt = _quiet(lambda: make_opt(lib, 1e-2))
    with Clock() as c_init:
        opt_state = _quiet(lambda: opt.init(params))
        jax.block_until_ready(opt_state)
    newton = case == "newton" and lib == "psgd_eqx"
    key = jax.random.PRNGKey(0)

    def step(params, opt_state, key):
        if newton:  # psgd_jax's README Newton loop, as written
            key, subkey = jax.random.split(key)
            loss_val, grad, hvp, vector, update_precond = psgd_eqx.hessian_helper(
                subkey, loss_fn, params, loss_fn_extra_args=extra, has_aux=False,
                preconditioner_update_probability=1.0,
            )
            updates, opt_state = opt.update(
                grad, opt_state, Hvp=hvp, vector=vector, update_preconditioner=update_precond
            )
        else:
            loss_val, grad = jax.value_and_grad(loss_fn)(params, *extra)
            if case == "kron_tiny":
                updates, opt_state = opt.update(grad, opt_state, params)
            else:
                updates, opt_state = opt.update(grad, opt_state)
        params = optax.apply_updates(params, updates)
        return params, opt_state, key, loss_val

    times, rss10, first, spent = [], None, None, 0.0
    total = max(n, mem_steps)
    for i in range(total):
        if max_total is not None and spent > max_total and i >= 3:
            break
        if i < n:
            with Clock() as c:
                params, opt_state, key, loss_val = step(params, opt_state, key)
                jax.block_until_ready((params, loss_val))
            times.append(c.pair)
            spent += c.wall
            if i == 0:
                first = c.pair
                if cap is not None and c.wall > cap:
                    return {"skipped": True, "first": first, "init": c_init.pair}
        else:
            params, opt_state, key, loss_val = step(params, opt_state, key)
            jax.block_until_ready(params)
        if i + 1 == 10:
            rss10 = maxrss_kb()
    rest = times[1:]
    out = {
        "init": c_init.pair,
        "first": first,
        "median": [_med([t[0] for t in rest]), _med([t[1] for t in rest])],
        "loss": float(loss_val),
        "steps_timed": len(times),
    }
    if mem_steps:
        out["rss_growth_kb"] = maxrss_kb() - rss10
    return out


def child_compile_tree(spec):
    lib, mode, layers = spec["lib"], spec["mode"], spec["layers"]
    params = tiny_tree(layers)
    grads = tiny_grads(params)
    xb = jax.random.normal(jax.random.PRNGKey(1), (8, 16))
    jax.jit(lambda a: a + 1.0).lower(1.0).compile()  # backend start-up, outside the timing
    opt = _quiet(lambda: make_opt(lib, 1e-3, 1.0 if lib != "adam" else None))
    with Clock() as c_init:
        state = _quiet(lambda: opt.init(params))
        jax.block_until_ready(state)
    if mode == "update":
        fn, args = jax.jit(opt.update), (grads, state, params)
    else:

        def train_step(params, state, xb):
            loss, g = jax.value_and_grad(tiny_mlp_loss)(params, xb)
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, loss

        fn, args = jax.jit(train_step), (params, state, xb)
    with Clock() as c_lower:
        lowered = fn.lower(*args)
    with Clock() as c_compile:
        compiled = lowered.compile()
    return {
        "init": c_init.pair,
        "lower": c_lower.pair,
        "compile": c_compile.pair,
        "total": [c_lower.wall + c_compile.wall, c_lower.cpu + c_compile.cpu],
        "stablehlo_ops": stablehlo_ops(lowered.as_text()),
        "entry_fusions": entry_fusions(compiled.as_text()),
    }


def child_quickstart(spec):
    import equinox as eqx
    from quickstart import load_data, loss_fn, make_model

    lib = spec["lib"]
    x_train, y_train, _, _ = load_data()
    model = make_model(jax.random.PRNGKey(0))
    xb, yb = x_train[:64], y_train[:64]
    xb2, yb2 = x_train[64:128], y_train[64:128]
    jax.block_until_ready((xb, yb, xb2, yb2))
    optimizer = psgd_eqx.kron(1e-3) if lib == "psgd_eqx" else optax.adam(3e-3)
    params, static = eqx.partition(model, eqx.is_array)
    with Clock() as c_init:
        opt_state = optimizer.init(params)
        jax.block_until_ready(opt_state)

    @eqx.filter_jit
    def step(params, opt_state, xb, yb):
        def batch_loss(p):
            return loss_fn(eqx.combine(p, static), xb, yb)

        loss, grads = jax.value_and_grad(batch_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss

    with Clock() as c_first:
        params, opt_state, loss = step(params, opt_state, xb, yb)
        jax.block_until_ready((params, loss))
    with Clock() as c_second:
        params, opt_state, loss = step(params, opt_state, xb2, yb2)
        jax.block_until_ready((params, loss))
    return {
        "init": c_init.pair,
        "first": c_first.pair,
        "second": c_second.pair,
        "init_plus_first": [c_init.wall + c_first.wall, c_init.cpu + c_first.cpu],
    }


CHILDREN = {"eager": child_eager, "compile_tree": child_compile_tree,
            "quickstart": child_quickstart}


# ---------------------------------------------------------------------- parent parts


def collect(specs: dict, reps: int, timeout: float, label: str, skip_after=None):
    """Runs every spec once per repetition (rotated order) in fresh processes.

    `skip_after(name, result)` -> True stops re-running `name` in later repetitions.
    Returns {name: [result per rep]}.
    """
    names = list(specs)
    res = {k: [] for k in names}
    stopped = set()
    for r in range(reps):
        for name in rotated(names, r):
            if name in stopped:
                continue
            out = run_child(specs[name], timeout)
            res[name].append(out)
            if "error" in out:
                print(f"    {label} {name}: ERROR {out['error']}", flush=True)
            if skip_after and skip_after(name, out):
                stopped.add(name)
        print(f"  {label}: rep {r + 1}/{reps} done", flush=True)
    return res


def _field(results, key, idx=None):
    """Per-rep values of one field (None where the child failed or lacks it)."""
    vals = []
    for out in results or []:
        v = out.get(key) if "error" not in out and not out.get("skipped") else None
        if v is not None and idx is not None:
            v = v[idx]
        vals.append(v)
    return vals


def part_eager(args, table: Table, raw: dict):
    print("\n## eager_readme (fresh process per loop; no jax.jit around the loop)\n", flush=True)
    n, mem = args.eager_steps, args.mem_steps
    specs = {}
    for case in ("whiten", "newton", "kron_tiny"):
        libs = ["psgd_eqx", "adam"] + (["psgdax"] if case == "kron_tiny" and psgdax else [])
        for lib in libs:
            spec = {"kind": "eager", "case": case, "lib": lib, "steps": n}
            if case == "newton":
                spec["mem_steps"] = mem
            if lib == "psgdax":
                spec["cap_s"] = args.psgdax_eager_cap
                spec["max_total_s"] = args.psgdax_eager_total
            specs[f"{case}/{lib}"] = spec

    def skip_after(name, out):  # psgdax's eager loop is slow: first repetition only
        return name.endswith("/psgdax")

    res = collect(specs, args.reps_sub, args.child_timeout, "eager", skip_after)
    raw["eager_readme"] = res
    labels = {"whiten": "(a) whitening xmat", "newton": "(b) Newton xmat + hessian_helper",
              "kron_tiny": "(c) kron, leaves (4,3),(3,)"}
    for case, label in labels.items():
        e, a = res[f"{case}/psgd_eqx"], res[f"{case}/adam"]
        x = res.get(f"{case}/psgdax")
        xs = None
        if x is not None:
            if any(o.get("skipped") for o in x):
                o = next(o for o in x if o.get("skipped"))
                xs = f"skipped (first step {o['first'][0]:.0f} s)"
            elif any("error" in o for o in x):
                xs = "error: " + next(o["error"] for o in x if "error" in o)[:60]
            else:
                print(f"  {case}/psgdax: 1 rep, {x[0]['steps_timed']} steps timed "
                      f"(--psgdax-eager-total {args.psgdax_eager_total:g} s)")
        for field, q in (("init", "opt.init, s"), ("first", f"first step (N={n}), s"),
                         ("median", "median step 2..N, ms")):
            scale = 1e3 if field == "median" else 1.0
            conv = (lambda vs, s=scale: [None if v is None else [s * t for t in v] for v in vs])
            px = xs if xs is not None else (conv(_field(x, field)) if x is not None else None)
            table.add(
                f"eager_readme {label}", q + " (wall / CPU)", conv(_field(e, field)),
                conv(_field(a, field)), px, spec="g3",
            )
        if case == "newton":
            eg, ag = _field(e, "rss_growth_kb"), _field(a, "rss_growth_kb")
            table.add(
                f"eager_readme {label}",
                f"ru_maxrss growth step 10 → {mem}, KiB (adam: value_and_grad loop)",
                eg, ag, None, spec="{:,.0f}", adam_ratio=False,
                goal="≈ 0",
            )


def part_compile_tree(args, table: Table, raw: dict):
    sizes = args.layers
    print(
        f"\n## compile_tree: {sizes} layers of {{w_in (16,32), w_out (32,16), b (32,)}} "
        "(fresh process per compile)\n",
        flush=True,
    )
    specs = {}
    for layers in sizes:
        specs[f"{layers}/psgd_eqx/update"] = dict(kind="compile_tree", lib="psgd_eqx",
                                                  mode="update", layers=layers)
        specs[f"{layers}/adam/update"] = dict(kind="compile_tree", lib="adam", mode="update",
                                              layers=layers)
        specs[f"{layers}/adam/train"] = dict(kind="compile_tree", lib="adam", mode="train",
                                             layers=layers)
        if args.eqx_train_compile:
            specs[f"{layers}/psgd_eqx/train"] = dict(kind="compile_tree", lib="psgd_eqx",
                                                     mode="train", layers=layers)
        big = layers == max(sizes) and len(sizes) > 1
        if psgdax is not None and not (big and args.skip_psgdax_big):
            specs[f"{layers}/psgdax/update"] = dict(kind="compile_tree", lib="psgdax",
                                                    mode="update", layers=layers)
    res = collect(specs, args.reps_sub, args.child_timeout, "compile_tree")
    raw["compile_tree"] = res

    for layers in sizes:
        tag = f"compile_tree {layers}L ({3 * layers} leaves)"
        e, a, at = (res[f"{layers}/psgd_eqx/update"], res[f"{layers}/adam/update"],
                    res[f"{layers}/adam/train"])
        x = res.get(f"{layers}/psgdax/update")
        xs = x if x is not None else "skipped (--psgdax-big to run)"

        def fx(key, x=x, xs=xs):
            return _field(x, key) if x is not None else xs

        table.add(tag, "opt.init (eager), s (wall / CPU)", _field(e, "init"),
                  _field(a, "init"), fx("init"))
        table.add(tag, "update: lower (trace), s", _field(e, "lower"), _field(a, "lower"),
                  fx("lower"))
        table.add(tag, "update: XLA compile, s", _field(e, "compile"), _field(a, "compile"),
                  fx("compile"))
        table.add(tag, "update: lower + compile, s", _field(e, "total"), _field(a, "total"),
                  fx("total"), goal="vs psgdax ≤ 0.1")
        table.add(tag, "update lower + compile vs **adam train step** lower + compile, s",
                  _field(e, "total"), _field(at, "total"), None, goal="≤ 4")
        if args.eqx_train_compile:
            table.add(tag, "psgd_eqx train step vs adam train step, lower + compile, s",
                      _field(res[f"{layers}/psgd_eqx/train"], "total"), _field(at, "total"))
        table.add(tag, "StableHLO ops, lowered update", _field(e, "stablehlo_ops"),
                  _field(a, "stablehlo_ops"), fx("stablehlo_ops"), spec="{:,.0f}")
        table.add(tag, "top-level fusions (ENTRY) of compiled update",
                  _field(e, "entry_fusions"), _field(a, "entry_fusions"),
                  fx("entry_fusions"), spec="{:,.0f}")
    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)

        def growth(lib, mode="update", key="total"):
            h, lw = res.get(f"{hi}/{lib}/{mode}"), res.get(f"{lo}/{lib}/{mode}")
            if not h or not lw:
                return None
            return [None if u is None or v is None else [u[i] / v[i] for i in range(2)]
                    for u, v in zip(_field(h, key), _field(lw, key))]

        table.add(f"compile_tree {hi}L / {lo}L", "update lower + compile, ratio of times",
                  growth("psgd_eqx"), growth("adam"), growth("psgdax"), spec="{:.2f}",
                  adam_ratio=False, goal="psgd_eqx ≤ 2")


def part_compile_quickstart(args, table: Table, raw: dict):
    print("\n## compile_quickstart: examples/quickstart.py's train step, first call "
          "(fresh process each)\n", flush=True)
    specs = {lib: dict(kind="quickstart", lib=lib) for lib in ("psgd_eqx", "adam")}
    res = collect(specs, args.reps_sub, args.child_timeout, "compile_quickstart")
    raw["compile_quickstart"] = res
    e, a = res["psgd_eqx"], res["adam"]
    tag = "compile_quickstart (digits MLP)"
    table.add(tag, "opt.init, s (wall / CPU)", _field(e, "init"), _field(a, "init"))
    table.add(tag, "first step call (trace + compile + run), s", _field(e, "first"),
              _field(a, "first"), goal="≤ 3")
    table.add(tag, "init + first step, s", _field(e, "init_plus_first"),
              _field(a, "init_plus_first"))
    table.add(tag, "second step call, ms",
              [None if v is None else [1e3 * t for t in v] for v in _field(e, "second")],
              [None if v is None else [1e3 * t for t in v] for v in _field(a, "second")],
              spec="g3")


def _time_interleaved(runners: dict, reps: int, label: str):
    """runners: name -> (callable returning a blocking measurement of one block, steps)."""
    names = list(runners)
    times = {k: [] for k in names}
    for r in range(reps):
        for name in rotated(names, r):
            fn, steps = runners[name]
            with Clock() as c:
                fn()
            times[name].append([c.wall / steps, c.cpu / steps])
        print(f"  {label}: rep {r + 1}/{reps} done", flush=True)
    return times


def part_step_tree(args, table: Table, raw: dict):
    layers, k = args.step_layers, args.tree_steps
    print(f"\n## step_tree: {layers} layers tiny tree, update only, jitted, state donated, "
          f"{k} steps per measurement\n", flush=True)
    params = tiny_tree(layers)
    grads = tiny_grads(params)
    cfgs = {"adam": ("adam", None)}
    for p in args.probs:
        cfgs[f"psgd_eqx p={p:g}"] = ("psgd_eqx", p)
        if psgdax is not None:
            cfgs[f"psgdax p={p:g}"] = ("psgdax", p)
    runners, compile_s = {}, {}
    for name, (lib, p) in cfgs.items():
        opt = _quiet(lambda lib=lib, p=p: make_opt(lib, 1e-3, p))
        state = fresh_buffers(_quiet(lambda opt=opt: opt.init(params)))
        upd = jax.jit(lambda g, s, p_, opt=opt: opt.update(g, s, p_), donate_argnums=(1,))
        box = {"s": state}
        with Clock() as c:
            u, box["s"] = upd(grads, box["s"], params)
            jax.block_until_ready((u, box["s"]))
        compile_s[name] = c.pair

        def block(upd=upd, box=box):
            s = box["s"]
            for _ in range(k):
                u, s = upd(grads, s, params)
            jax.block_until_ready((u, s))
            box["s"] = s

        block()  # warm-up window (refit schedules past their first steps)
        runners[name] = (block, k)
        print(f"  compiled {name:<16} first call {c.wall:6.1f} s", flush=True)
    times = _time_interleaved(runners, args.reps_step, "step_tree")
    raw["step_tree"] = {"times_s_per_step": times, "first_call": compile_s}
    us = {n: [[1e6 * t for t in v] for v in vs] for n, vs in times.items()}
    tag = f"step_tree {layers}L update"
    for p, goal in ((1.0, "≤ 3× adam, < psgdax"), (P_LATE, "≤ 1.5× adam, < psgdax")):
        if p not in args.probs:
            continue
        table.add(tag, f"refit p={p:g}, µs/step (wall / CPU)", us[f"psgd_eqx p={p:g}"],
                  us["adam"], us.get(f"psgdax p={p:g}"), spec="{:,.0f}", goal=goal)


def _parse_kwargs(s: str) -> dict:
    s = s.strip()
    if s.startswith("{"):
        return json.loads(s)
    out = {}
    for item in filter(None, (x.strip() for x in s.split(","))):
        key, val = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val.strip()
    return out


def part_lm_step(args, table: Table, raw: dict):
    from step_time import init_params, lm_loss

    layers, d, ctx, batch, vocab = args.lm_shape
    print(f"\n## lm_step: {layers} layers, d={d}, ctx {ctx}, batch {batch} "
          f"({batch * ctx} tokens), vocab {vocab}; full train step, jitted, donated\n",
          flush=True)
    params0 = init_params(jax.random.PRNGKey(0), vocab=vocab, d=d, layers=layers, ctx=ctx)
    batches = jax.random.randint(jax.random.PRNGKey(2), (4, batch, ctx + 1), 0, vocab)
    lr = 3e-4
    cfgs = {"adam": ("adam", None, {})}
    variants = [("", {})] + [(json.dumps(kw, sort_keys=True), kw) for kw in args.lm_kron_kwargs]
    for tag, kw in variants:
        for p in args.probs:
            name = f"psgd_eqx{(' ' + tag) if tag else ''} p={p:g}"
            cfgs[name] = ("psgd_eqx", p, kw)

    def make_step(opt):
        def step(params, state, tokens):
            loss, grads = jax.value_and_grad(lm_loss)(params, tokens)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    runners, first = {}, {}
    for name, (lib, p, kw) in cfgs.items():
        opt = make_opt(lib, lr, p, **kw)
        box = {"p": jax.tree.map(jnp.copy, params0)}
        box["s"] = fresh_buffers(opt.init(box["p"]))
        st = make_step(opt)
        with Clock() as c:
            box["p"], box["s"], loss = st(box["p"], box["s"], batches[0])
            jax.block_until_ready((box["p"], loss))
        first[name] = c.pair
        steps = args.lm_block_sparse if p == P_LATE else args.lm_block

        def block(st=st, box=box, steps=steps):
            p_, s_ = box["p"], box["s"]
            for i in range(steps):
                p_, s_, loss = st(p_, s_, batches[i % 4])
            jax.block_until_ready((p_, s_, loss))
            box["p"], box["s"], box["loss"] = p_, s_, loss

        runners[name] = (block, steps)
        print(f"  compiled {name:<40} first call {c.wall:6.1f} s (loss {float(loss):.3f})",
              flush=True)
    times = _time_interleaved(runners, args.reps_lm, "lm_step")
    raw["lm_step"] = {"times_s_per_step": times, "first_call": first,
                      "blocks": {"dense": args.lm_block, "sparse": args.lm_block_sparse}}
    ms = {n: [[1e3 * t for t in v] for v in vs] for n, vs in times.items()}
    tag = f"lm_step (L{layers} d{d} ctx{ctx} b{batch} V{vocab})"
    for vtag, _ in variants:
        for p in args.probs:
            name = f"psgd_eqx{(' ' + vtag) if vtag else ''} p={p:g}"
            label = f"kron{(' ' + vtag) if vtag else ' defaults'}, refit p={p:g}"
            table.add(tag, f"{label}, ms/step (wall / CPU)", ms[name], ms["adam"],
                      spec="{:.1f}")
    table.add(tag, "first call (trace + compile + run, in process, once), s",
              [first["psgd_eqx p=1"]], [first["adam"]], spec="{:.1f}")


# ------------------------------------------------------------------------------- main


def env_lines():
    from _common import lib_commit

    dev = jax.devices()[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(psgd_eqx.__file__)))
    try:
        top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        top = ""
    note = "" if os.path.realpath(top or "/nonexistent") == os.path.realpath(root) else (
        "; NOT a git checkout root: the commit is that of the enclosing repository, if any")
    return [
        f"psgd_eqx {getattr(psgd_eqx, '__version__', '?')} commit {lib_commit()} "
        f"({os.path.dirname(os.path.abspath(psgd_eqx.__file__))}{note})",
        f"jax {jax.__version__}, optax {optax.__version__}, psgdax "
        f"{getattr(psgdax, '__version__', '0.1.1') if psgdax else 'missing'}, "
        f"python {platform.python_version()}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"backend {jax.default_backend()} ({dev.device_kind}), "
        f"load average at start {os.getloadavg()[0]:.2f}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 rep")
    ap.add_argument("--only", default=None, help="run the parts whose name contains this")
    ap.add_argument("--json", default=None, help="write the table and raw timings here")
    ap.add_argument("--reps", type=int, default=None,
                    help="repetitions of every part (default: 3 for the fresh-process parts, "
                    "7 for step_tree, 4 for lm_step)")
    ap.add_argument("--eager-steps", type=int, default=None, help="N (50; quick 10)")
    ap.add_argument("--mem-steps", type=int, default=None, help="(b) loop length (1000; quick 200)")
    ap.add_argument("--psgdax-eager-cap", type=float, default=60.0,
                    help="skip psgdax's eager loop when its first step takes longer (s)")
    ap.add_argument("--psgdax-eager-total", type=float, default=None,
                    help="stop timing psgdax's eager steps after this many s (60; quick 10)")
    ap.add_argument("--layers", default=None, help="compile_tree sizes (16,64; quick 4,16)")
    ap.add_argument("--psgdax-big", dest="skip_psgdax_big", action="store_false",
                    help="also compile psgdax at the largest compile_tree size (minutes)")
    ap.add_argument("--skip-psgdax-64", dest="skip_psgdax_big", action="store_true",
                    help="(default) skip psgdax at the largest compile_tree size")
    ap.set_defaults(skip_psgdax_big=True)
    ap.add_argument("--eqx-train-compile", action="store_true",
                    help="compile_tree: also compile psgd_eqx's whole train step")
    ap.add_argument("--step-layers", type=int, default=None, help="step_tree layers (16; quick 4)")
    ap.add_argument("--tree-steps", type=int, default=None, help="step_tree K (200; quick 20)")
    ap.add_argument("--lm-block", type=int, default=None,
                    help="lm_step steps per measurement at p=1 and for adam (10; quick 2)")
    ap.add_argument("--lm-block-sparse", type=int, default=None,
                    help="lm_step steps per measurement at p=0.03 (34: one refit; quick 34)")
    ap.add_argument("--lm-kron-kwargs", action="append", default=[],
                    help="extra psgd_eqx.kron options to time in lm_step, JSON or k=v,k=v "
                    "(repeatable)")
    ap.add_argument("--child-timeout", type=float, default=1200.0)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child is not None:
        spec = json.loads(args._child)
        out = CHILDREN[spec["kind"]](spec)
        print("RESULT " + json.dumps(out), flush=True)
        return out

    q = args.quick
    args.reps_sub = args.reps or (1 if q else 3)
    args.reps_step = args.reps or (1 if q else 7)
    args.reps_lm = args.reps or (1 if q else 4)
    args.eager_steps = args.eager_steps or (10 if q else 50)
    args.mem_steps = args.mem_steps or (200 if q else 1000)
    args.psgdax_eager_total = args.psgdax_eager_total or (10.0 if q else 60.0)
    args.layers = [int(x) for x in (args.layers or ("2,4" if q else "16,64")).split(",")]
    args.probs = (1.0,) if q else (1.0, P_LATE)
    args.step_layers = args.step_layers or (4 if q else 16)
    args.tree_steps = args.tree_steps or (20 if q else 200)
    args.lm_block = args.lm_block or (2 if q else 10)
    args.lm_block_sparse = args.lm_block_sparse or 34
    args.lm_shape = (1, 64, 32, 4, 256) if q else (4, 256, 128, 32, 256)
    args.lm_kron_kwargs = [_parse_kwargs(s) for s in args.lm_kron_kwargs]

    print("# first_steps.py: how long a user waits, as ratios to optax.adam")
    for line in env_lines():
        print(line)
    print("command: " + " ".join(["python"] + sys.argv))
    print(f"reps: fresh-process parts {args.reps_sub}, step_tree {args.reps_step}, "
          f"lm_step {args.reps_lm}")
    if psgdax is None:
        print("psgdax not importable: its columns are empty")
    table, raw = Table(), {}
    funcs = {"eager_readme": part_eager, "compile_tree": part_compile_tree,
             "compile_quickstart": part_compile_quickstart, "step_tree": part_step_tree,
             "lm_step": part_lm_step}
    t0, c0 = time.perf_counter(), time.process_time()
    for name in PARTS:
        if args.only and args.only not in name:
            continue
        funcs[name](args, table, raw)
    print("\n## results (medians over reps; ratios are medians of per-rep paired ratios; "
          "times are wall / CPU)\n")
    print(
        "psgdax kron: its defaults (max_skew_triangular=1.0: (16,32)'s 32 side is diagonal), "
        "psgd_eqx kron: its defaults (max_skew_triangular=∞: all sides triangular).\n"
    )
    table.print()
    print(f"\ntotal: {time.perf_counter() - t0:.0f} s wall, parent CPU "
          f"{time.process_time() - c0:.0f} s (children not included)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": env_lines(), "argv": sys.argv, "table": table.as_json(),
                       "raw": raw}, f, indent=1, default=float)
    return table


if __name__ == "__main__":
    main()
