"""Which defaults for `psgd_eqx.kron`: structure rule × refit schedule, by quality per second.

Candidates: the structure rule `max_skew_triangular` ∈ {∞ (today's default: every axis up to
`max_size_triangular` = 8192 dense), 1.0 (psgdax's: axis i diagonal when nᵢ² > N)}, plus
`memory_save_mode="smart_one_diag"` where it gives a different structure from skew 1.0 on
the problem (checked with `kron_plan`; on the problems below it does not); the refit
schedule `preconditioner_update_probability` ∈ {1.0 (today's default), psgd_jax's anneal
`precond_update_prob_schedule()` (1.0 for 500 steps, then exp(−0.001·(t − 500)) down to
0.03), constant 0.1, constant 0.03 (the anneal's floor: where a long run spends most of
its steps)}. Geometry: the default (PRO). `optax.adam` is the reference.

Problems (each: lr grid × seeds per setting, one compile per setting, the training of all
(lr, seed) pairs `vmap`ped in one `lax.scan`):

- `digits`: the quickstart MLP (examples/quickstart.py: 64-128-128-10, batch 64), test
  accuracy and full-training-set loss;
- `quadratic`: benchmarks/kron_quadratic.py's W 64×32 with Kronecker curvature of
  cond ≈ 1e6 and noisy gradients; mean exact loss over the last 100 steps;
- `charlm`: a character-level pre-LN transformer LM (benchmarks/step_time.py's model: 2
  layers, d 128, 4 heads, MLP 512, ctx 64, batch 8) on the concatenated source of a few
  stdlib modules (read with `inspect.getsource`; nothing is downloaded), 90/10 split;
  validation loss on 32 fixed windows. Refit 1.0 and 0.1 only: the anneal is flat at 1.0
  for its first 500 steps, so over these 400 steps it is p = 1.

Per problem, first the step time: one jitted, donated training step (data sampling,
forward, backward, update) per configuration, compiled, then `--reps` repetitions that each
time a block of steps of every configuration in a rotated order (medians over repetitions;
ratios to Adam are medians of per-repetition paired ratios). Every structure is timed at
refit probability 1 and "never" (1e-9: the refit `lax.cond` compiled in, not taken); a
schedule p(t) costs t_never + p(t)·(t_always − t_never) per step (the refit accumulator is
deterministic), so the mean step time of the anneal over n steps is derived from the two.

Then quality: every setting trains for N steps (`--steps-*`) and for its *equal-wall-clock*
horizon, the number of steps it can do in the time the slowest PSGD setting needs for N
steps (its own step times; capped at `--max-stretch`·N for PSGD and `--adam-stretch`·N for
Adam). The best lr per setting is chosen by the mean over seeds at N steps (and again at the
equal-wall-clock horizon). Finally `lmstep`: the full LM training step of step_time.py part
(b) (4 layers, d 256, 4 heads, ctx 128, batch 32, here vocab 256) for every structure at
refit 1 and never, as × Adam in the same run, with the late anneal (p = 0.03) and p = 0.1
derived.

Usage:

    python benchmarks/defaults.py --quick        # smoke run (< 1 min): the quadratic, tiny grid
    python benchmarks/defaults.py --quick --only digits,charlm,lmstep   # the others, small
    python benchmarks/defaults.py                # full run (≈ 75 min wall on 2 busy cores)
    python benchmarks/defaults.py --only digits,quadratic
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable


_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "examples"))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import step_time  # noqa: E402
from _common import lib_commit  # noqa: E402

import psgd_eqx  # noqa: E402


P_NEVER = 1e-9
INF = float("inf")
STRUCTURES = {
    "skew ∞": dict(max_skew_triangular=INF),
    "skew 1": dict(max_skew_triangular=1.0),
    "smart_one_diag": dict(memory_save_mode="smart_one_diag"),
}
ANNEAL = psgd_eqx.precond_update_prob_schedule()
REFITS = {
    "p=1": 1.0,
    "anneal": ANNEAL,
    "p=0.1": 0.1,
    "p=0.03": 0.03,
}


_CUM: dict[str, np.ndarray] = {}


def refits_in(name: str, n: int) -> float:
    """Expected number of refits in the first n steps (the accumulator refits at rate p(t))."""
    if name not in _CUM:
        r = REFITS[name]
        t = np.arange(200_000)
        p = np.asarray(jax.vmap(r)(jnp.asarray(t))) if callable(r) else np.full(t.shape, r)
        _CUM[name] = np.concatenate([[0.0], np.cumsum(p, dtype=np.float64)])
    cum = _CUM[name]
    return float(cum[min(n, len(cum) - 1)])


# ------------------------------------------------------------------------------ problems


@dataclasses.dataclass
class Problem:
    name: str
    title: str
    data: dict  # arrays passed to the jitted functions (not closed over)
    init: Callable  # (key) -> params
    loss_grad: Callable  # (params, key, data) -> (loss, grads)
    evaluate: Callable  # (params, data) -> f32[m]
    eval_names: tuple[str, ...]
    primary: str  # name of the metric used to pick the lr
    higher_better: bool
    steps: int
    eval_every: int
    lrs: tuple[float, ...]
    adam_lrs: tuple[float, ...]
    seeds: int
    time_block: int  # steps per timed block
    window: int = 0  # primary = mean per-step loss over the last `window` steps
    refits: tuple[str, ...] = tuple(REFITS)
    notes: str = ""


def digits_problem(q: bool) -> Problem:
    import quickstart as qs

    x_train, y_train, x_test, y_test = qs.load_data()
    static = eqx.partition(qs.make_model(jax.random.PRNGKey(0)), eqx.is_array)[1]

    def init(key):
        return eqx.partition(qs.make_model(key), eqx.is_array)[0]

    def loss_grad(params, key, data):
        idx = jax.random.randint(key, (qs.BATCH_SIZE,), 0, data["x_train"].shape[0])
        xb, yb = data["x_train"][idx], data["y_train"][idx]
        return jax.value_and_grad(lambda p: qs.loss_fn(eqx.combine(p, static), xb, yb))(params)

    def evaluate(params, data):
        model = eqx.combine(params, static)
        logits = jax.vmap(model)(data["x_test"])
        acc = jnp.mean((jnp.argmax(logits, -1) == data["y_test"]).astype(jnp.float32))
        train_loss = qs.loss_fn(model, data["x_train"], data["y_train"])
        return jnp.stack([acc, train_loss])

    return Problem(
        name="digits",
        title="quickstart digits MLP (64-128-128-10, batch 64)",
        data=dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test),
        init=init,
        loss_grad=loss_grad,
        evaluate=evaluate,
        eval_names=("test acc", "train loss"),
        primary="test acc",
        higher_better=True,
        steps=100 if q else 1000,
        eval_every=25,
        lrs=(5e-4, 1e-3) if q else (5e-4, 1e-3, 2e-3),
        adam_lrs=(3e-3,) if q else (1.5e-3, 3e-3, 6e-3),
        seeds=2,
        time_block=10 if q else 50,
    )


def quadratic_problem(q: bool) -> Problem:
    import kron_quadratic as kq

    def init(key):
        del key
        return jax.tree.map(jnp.copy, kq.PARAMS0)

    def loss_grad(params, key, data):
        del data
        return kq.loss_fn(params), kq.noisy_grad(params, key)

    def evaluate(params, data):
        del data
        return jnp.stack([kq.loss_fn(params)])

    return Problem(
        name="quadratic",
        title="Kronecker quadratic (kron_quadratic.py: W 64×32, Hessian cond ≈ 1e6, "
        "noisy gradients)",
        data={},
        init=init,
        loss_grad=loss_grad,
        evaluate=evaluate,
        eval_names=("loss",),
        primary="loss (mean of last 100 steps)",
        higher_better=False,
        steps=200 if q else 1500,
        eval_every=50,
        lrs=(3e-3,) if q else (1.5e-3, 3e-3, 6e-3, 1.2e-2),
        adam_lrs=(1e-1,) if q else (2.5e-2, 5e-2, 1e-1, 2e-1),
        seeds=2 if q else 3,
        time_block=10 if q else 50,
        window=100,
        notes="seeds change the gradient noise; init is W = 0, b = 0",
    )


CHARLM_MODULES = (
    "inspect", "argparse", "dataclasses", "functools", "typing", "pathlib",
    "subprocess", "collections", "enum", "json.decoder", "textwrap", "shutil",
)  # fmt: skip


def charlm_text() -> str:
    import importlib

    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CHARLM_MODULES)


def charlm_problem(q: bool) -> Problem:
    d, layers, heads, ctx, batch = (64, 1, 4, 32, 8) if q else (128, 2, 4, 64, 8)
    text = charlm_text()
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], np.int32)
    cut = int(0.9 * len(ids))
    train, val = ids[:cut], ids[cut:]
    n_val = 32
    starts = np.linspace(0, len(val) - ctx - 2, n_val).astype(np.int64)
    val_windows = np.stack([val[s : s + ctx + 1] for s in starts])
    vocab = len(chars)

    def init(key):
        return step_time.init_params(key, vocab=vocab, d=d, layers=layers, ctx=ctx)

    def loss_grad(params, key, data):
        tr = data["train"]
        s = jax.random.randint(key, (batch,), 0, tr.shape[0] - ctx - 1)
        tokens = tr[s[:, None] + jnp.arange(ctx + 1)]
        return jax.value_and_grad(step_time.lm_loss)(params, tokens, heads)

    def evaluate(params, data):
        return jnp.stack([step_time.lm_loss(params, data["val"], heads)])

    return Problem(
        name="charlm",
        title=f"char-level LM ({layers} layers, d {d}, {heads} heads, MLP {4 * d}, ctx {ctx}, "
        f"batch {batch}, vocab {vocab}; {len(ids):,} characters of stdlib source)",
        data=dict(train=jnp.asarray(train), val=jnp.asarray(val_windows)),
        init=init,
        loss_grad=loss_grad,
        evaluate=evaluate,
        eval_names=("val loss",),
        primary="val loss",
        higher_better=False,
        steps=60 if q else 400,
        eval_every=20 if q else 25,
        lrs=(1e-3,) if q else (7.5e-4, 1.5e-3, 3e-3),
        adam_lrs=(3e-3,) if q else (1.5e-3, 3e-3, 6e-3),
        seeds=1 if q else 2,
        time_block=3 if q else 6,
        # the anneal is flat at 1.0 for 500 steps: over 400 steps it *is* p=1
        refits=("p=1", "p=0.1"),
        notes=f"modules: {', '.join(CHARLM_MODULES)}",
    )


PROBLEMS = {"digits": digits_problem, "quadratic": quadratic_problem, "charlm": charlm_problem}


# ---------------------------------------------------------------------------- optimizers


def make_opt(structure: str | None, refit, lr):
    """Adam (structure None) or kron; `refit` a number or a callable of the step count."""
    if structure is None:
        return optax.adam(lr)
    return psgd_eqx.kron(
        learning_rate=lr, preconditioner_update_probability=refit, **STRUCTURES[structure]
    )


def refit_by_index(sel):
    """The refit schedule `list(REFITS)[sel]`, `sel` traced (one compile for all of them)."""

    def p(count):
        vals = [r(count) if callable(r) else r for r in REFITS.values()]
        return jnp.stack([jnp.asarray(v, jnp.float32) for v in vals])[sel]

    return p


def structures_for(params) -> tuple[list[str], dict[str, str]]:
    """skew ∞ and skew 1, plus smart_one_diag when its structure differs from skew 1's."""
    tables = {
        s: psgd_eqx.plan_table(psgd_eqx.kron_plan(params, **kw)) for s, kw in STRUCTURES.items()
    }
    out = ["skew ∞", "skew 1"]
    if tables["smart_one_diag"] != tables["skew 1"]:
        out.append("smart_one_diag")
    return out, tables


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------- timing


def time_steps(
    structs: list[str],
    loss_grad: Callable,
    init: Callable,
    reps: int,
    block: int,
    warmup: int,
    arg_for: Callable,
) -> dict[str, list[float]]:
    """µs/step of one jitted, donated training step per configuration per repetition.

    Configurations: "adam", and "<structure> p=1" / "<structure> never" for every structure;
    the two of a structure share one compiled step (the refit probability is an argument,
    read by the refit `lax.cond`). Every repetition times a block of `block` steps of each
    configuration, in an order rotated by one per repetition.
    """

    def make_step(structure):
        def step(params, state, arg, prob):
            loss, g = loss_grad(params, arg)
            opt = make_opt(structure, lambda count: prob, 1e-3)
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    runners = {"adam": (None, 1.0)}
    for s in structs:
        runners[f"{s} p=1"] = (s, 1.0)
        runners[f"{s} never"] = (s, P_NEVER)
    compiled, carries = {}, {}
    for name, (structure, prob) in runners.items():
        p = init()
        s = step_time.fresh_buffers(make_opt(structure, 1.0, 1e-3).init(p))
        if structure not in compiled:
            compiled[structure] = make_step(structure)
        t0 = time.perf_counter()
        for i in range(warmup):
            p, s, loss = compiled[structure](p, s, arg_for(i), jnp.float32(prob))
        jax.block_until_ready((p, s))
        print(
            f"    warm {name:<24} {time.perf_counter() - t0:6.1f} s (loss {float(loss):.4g})",
            flush=True,
        )
        carries[name] = (p, s)
    names = list(runners)
    out = {n: [] for n in names}
    it = warmup
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            structure, prob = runners[n]
            f, prob = compiled[structure], jnp.float32(prob)
            p, s = carries[n]
            jax.block_until_ready((p, s))
            t0 = time.perf_counter()
            for _ in range(block):
                p, s, loss = f(p, s, arg_for(it), prob)
                it += 1
            jax.block_until_ready((p, s, loss))
            out[n].append(1e6 * (time.perf_counter() - t0) / block)
            carries[n] = (p, s)
    return out


def problem_timing(pb: Problem, structs: list[str], reps: int) -> dict:
    base = jax.random.PRNGKey(123)
    return time_steps(
        structs,
        lambda params, t: pb.loss_grad(params, jax.random.fold_in(base, t), pb.data),
        lambda: pb.init(jax.random.PRNGKey(0)),
        reps,
        pb.time_block,
        2,
        lambda i: jnp.int32(i),
    )


def step_cost(times: dict, setting: str, n: int) -> float:
    """Mean µs/step over the first n steps of a setting ("adam" or "<structure> <refit>")."""
    if setting == "adam":
        return _med(times["adam"])
    s, r = setting.rsplit(" ", 1)
    t1, tn = _med(times[f"{s} p=1"]), _med(times[f"{s} never"])
    return tn + (t1 - tn) * refits_in(r, n) / n


def step_ratio(times: dict, setting: str, n: int) -> float:
    """Median over repetitions of (derived step time / Adam's), paired per repetition."""
    if setting == "adam":
        return 1.0
    s, r = setting.rsplit(" ", 1)
    frac = refits_in(r, n) / n
    return _med(
        [
            (b + (a - b) * frac) / c
            for a, b, c in zip(times[f"{s} p=1"], times[f"{s} never"], times["adam"])
        ]
    )


def horizon(times: dict, setting: str, budget_us: float, cap: int, every: int) -> int:
    """Most steps (a multiple of `every`, ≤ cap) the setting can do within the budget."""
    n = every
    while n + every <= cap and (n + every) * step_cost(times, setting, n + every) <= budget_us:
        n += every
    return n


# ---------------------------------------------------------------------------------- training


def train_runs(pb: Problem, structure: str | None, refits: list[str], lrs, steps: int):
    """Train every (refit, lr, seed) triple for `steps` steps in one vmapped scan (one
    compile; under `vmap` the refit `lax.cond` computes both branches, which changes the
    time, not the result).

    Returns per-step training losses (runs, steps), evaluations (runs, steps/every, m) and
    the grid (refit name, lr, seed) per run.
    """
    E = pb.eval_every
    grid = [(r, lr, sd) for r in refits for lr in lrs for sd in range(pb.seeds)]
    names = list(REFITS)
    g_sel = jnp.asarray([names.index(r) if r else 0 for r, _, _ in grid], jnp.int32)
    g_lr = jnp.asarray([lr for _, lr, _ in grid], jnp.float32)
    g_seed = jnp.asarray([sd for _, _, sd in grid], jnp.int32)

    def train(sel, lr, seed, data):
        k_init, k_data = jax.random.split(jax.random.PRNGKey(1000 + seed))
        params = pb.init(k_init)
        opt = make_opt(structure, refit_by_index(sel), lr)
        state = opt.init(params)

        def step(carry, t):
            params, state = carry
            loss, g = pb.loss_grad(params, jax.random.fold_in(k_data, t), data)
            u, state = opt.update(g, state, params)
            return (optax.apply_updates(params, u), state), loss

        def chunk(carry, c):
            carry, losses = jax.lax.scan(step, carry, c * E + jnp.arange(E))
            return carry, (losses, pb.evaluate(carry[0], data))

        _, (losses, evals) = jax.lax.scan(chunk, (params, state), jnp.arange(steps // E))
        return losses.reshape(-1), evals

    f = jax.jit(jax.vmap(train, in_axes=(0, 0, 0, None)))
    t0 = time.perf_counter()
    losses, evals = f(g_sel, g_lr, g_seed, pb.data)
    losses, evals = np.asarray(losses), np.asarray(evals)
    return losses, evals, grid, time.perf_counter() - t0


def metrics_at(pb: Problem, losses, evals, n: int) -> dict[str, np.ndarray]:
    """Per-run metrics after n steps (n a multiple of eval_every)."""
    out = {}
    for j, name in enumerate(pb.eval_names):
        out[name] = evals[:, n // pb.eval_every - 1, j]
    if pb.window:
        out[pb.primary] = losses[:, n - pb.window : n].mean(axis=1)
    return out


def best_lr(pb: Problem, m: dict, lrs: np.ndarray):
    """(lr, {metric: (mean, half-range)}, all) of the lr with the best mean primary metric;
    `m` holds the runs of one setting, `lrs` their lrs."""
    stats = {}
    for lr in sorted(set(lrs.tolist())):
        sel = lrs == lr
        stats[lr] = {
            k: (float(np.mean(v[sel])), float(np.max(v[sel]) - np.min(v[sel])) / 2)
            for k, v in m.items()
        }

    def key(lr):
        v = stats[lr][pb.primary][0]
        v = v if np.isfinite(v) else (-np.inf if pb.higher_better else np.inf)
        tie = stats[lr].get("train loss", (0.0, 0.0))[0]
        return (-v if pb.higher_better else v, tie if np.isfinite(tie) else np.inf)

    b = min(stats, key=key)
    return b, stats[b], stats


# ------------------------------------------------------------------------------------ report


def fmt(x: float) -> str:
    if not np.isfinite(x):
        return "nan"
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-2 <= a < 1e3:
        return f"{x:.4f}" if a < 1 else f"{x:.3f}" if a < 10 else f"{x:.1f}"
    return f"{x:.3g}"


def fmt_pm(mean: float, half: float, pct: bool = False) -> str:
    if pct:
        return f"{100 * mean:.2f} ± {100 * half:.2f} %"
    return f"{fmt(mean)} ± {fmt(half)}"


def run_problem(pb: Problem, args) -> dict:
    print(f"\n## {pb.name}: {pb.title}\n", flush=True)
    params0 = pb.init(jax.random.PRNGKey(0))
    structs, tables = structures_for(params0)
    print(tables["skew ∞"] + "\n\nskew 1:\n\n" + tables["skew 1"] + "\n")
    if "smart_one_diag" not in structs:
        print("smart_one_diag: same structure as skew 1 on every leaf (not run)\n")
    refits = [r for r in pb.refits if r in args.refits]
    settings = [f"{s} {r}" for s in structs for r in refits]

    print(f"  timing ({args.reps} reps × {pb.time_block} steps) ...", flush=True)
    times = problem_timing(pb, structs, args.reps)
    N = pb.steps
    budget = max(N * step_cost(times, s, N) for s in settings)
    slowest = max(settings, key=lambda s: step_cost(times, s, N))
    hz = {s: horizon(times, s, budget, int(args.max_stretch * N), pb.eval_every) for s in settings}
    hz["adam"] = horizon(times, "adam", budget, int(args.adam_stretch * N), pb.eval_every)
    print(
        f"  adam {_med(times['adam']):,.0f} µs/step; budget = {budget / 1e6:.2f} s "
        f"= {N} steps of {slowest}",
        flush=True,
    )

    rows = []
    families = [("adam", None, [None], pb.adam_lrs)] + [(st, st, refits, pb.lrs) for st in structs]
    for family, structure, fam_refits, lrs in families:
        fam_settings = (
            ["adam"]
            if structure is None
            else [f"{st} {r}" for r in fam_refits for st in [structure]]
        )
        steps = max([N] + [hz[x] for x in fam_settings])
        steps = -(-steps // pb.eval_every) * pb.eval_every
        losses, evals, grid, secs = train_runs(pb, structure, fam_refits, lrs, steps)
        print(
            f"  {family}: {steps} steps × {len(grid)} runs (refit × lr × seed) in {secs:,.1f} s",
            flush=True,
        )
        for setting, r in zip(fam_settings, fam_refits):
            idx = np.array([i for i, g in enumerate(grid) if g[0] == r])
            run_lrs = np.array([grid[i][1] for i in idx])
            m_n = {k: v[idx] for k, v in metrics_at(pb, losses, evals, N).items()}
            m_h = {k: v[idx] for k, v in metrics_at(pb, losses, evals, hz[setting]).items()}
            lr_n, st_n, all_n = best_lr(pb, m_n, run_lrs)
            lr_h, st_h, _ = best_lr(pb, m_h, run_lrs)
            rows.append(
                dict(
                    setting=setting,
                    lr=lr_n,
                    at_n=st_n,
                    lr_wall=lr_h,
                    at_wall=st_h,
                    steps_wall=hz[setting],
                    ratio=step_ratio(times, setting, N),
                    us=step_cost(times, setting, N),
                    all_lrs={f"{k:g}": v for k, v in all_n.items()},
                )
            )
            edge = " (at the grid's edge)" if len(lrs) > 1 and lr_n in (min(lrs), max(lrs)) else ""
            print(
                f"    {setting:<20} best lr {lr_n:g}{edge}: {pb.primary} "
                f"{fmt_pm(*st_n[pb.primary])}; by lr: "
                + ", ".join(f"{k:g}: {fmt(v[pb.primary][0])}" for k, v in all_n.items()),
                flush=True,
            )

    pct = pb.primary == "test acc"
    extra = [k for k in pb.eval_names if k != pb.primary and not pb.window]
    print(
        f"\n### {pb.name}: {N} steps, {pb.seeds} seeds, lr grid PSGD "
        f"{{{', '.join(f'{x:g}' for x in pb.lrs)}}}, Adam "
        f"{{{', '.join(f'{x:g}' for x in pb.adam_lrs)}}}; equal wall-clock budget = "
        f"{N} steps of the slowest PSGD setting ({slowest}), "
        f"{budget / 1e6:.2f} s at the measured step times\n"
    )
    head = (
        f"| setting | best lr | {pb.primary} @ {N} steps (mean ± half-range) | "
        + "".join(f"{k} @ {N} | " for k in extra)
        + "time/step × adam | steps in budget | "
        f"{pb.primary} @ equal wall-clock (lr) |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        print(
            f"| {row['setting']} | {row['lr']:g} | "
            f"{fmt_pm(*row['at_n'][pb.primary], pct=pct)} | "
            + "".join(f"{fmt_pm(*row['at_n'][k])} | " for k in extra)
            + f"{row['ratio']:.2f} | {row['steps_wall']} | "
            f"{fmt_pm(*row['at_wall'][pb.primary], pct=pct)} ({row['lr_wall']:g}) |"
        )
    print(
        f"\nµs/step (median of {args.reps} reps): "
        + ", ".join(f"{k} {_med(v):,.0f}" for k, v in times.items())
    )
    return dict(
        title=pb.title,
        steps=N,
        seeds=pb.seeds,
        lrs=pb.lrs,
        adam_lrs=pb.adam_lrs,
        budget_s=budget / 1e6,
        slowest=slowest,
        rows=rows,
        times_us=times,
        structures=structs,
        notes=pb.notes,
    )


# ------------------------------------------------------------------------- LM train step


def lm_step(args) -> dict:
    vocab = args.lm_vocab
    if args.quick:  # a small stand-in: the real model's compiles alone take minutes on CPU
        d, layers, ctx, batch = 64, 1, 32, 8
    else:
        d, layers, ctx, batch = step_time.D, step_time.LAYERS, step_time.CTX, step_time.BATCH
    heads = step_time.HEADS
    print(
        f"\n## lmstep: full LM training step ({layers} layers, d {d}, {heads} heads, "
        f"ctx {ctx}, batch {batch}, vocab {vocab})\n",
        flush=True,
    )
    params0 = step_time.init_params(jax.random.PRNGKey(0), vocab=vocab, d=d, layers=layers, ctx=ctx)
    print(f"params: {step_time.n_params(params0):,}")
    structs, tables = structures_for(params0)
    for s in structs:
        print(f"\n{s}:\n\n{tables[s]}")
    if "smart_one_diag" not in structs:
        print("\nsmart_one_diag: same structure as skew 1 on every leaf (not run)")
    batches = jax.random.randint(jax.random.PRNGKey(2), (4, batch, ctx + 1), 0, vocab)
    times = time_steps(
        structs,
        lambda params, tokens: jax.value_and_grad(step_time.lm_loss)(params, tokens, heads),
        lambda: jax.tree.map(jnp.copy, params0),
        args.lm_reps,
        args.lm_block,
        2,
        lambda i: batches[i % 4],
    )
    print(
        f"\n### lmstep: train step / Adam (Adam {_med(times['adam']) / 1e3:,.0f} ms/step; "
        f"{args.lm_reps} reps × {args.lm_block} steps; medians of paired ratios)\n"
    )
    print(
        "| structure | p = 1.0 | p = 0.1 (derived) | anneal late, p = 0.03 (derived) | "
        "never (apply only) | ms/step p = 1 |"
    )
    print("|---|---|---|---|---|---|")
    summary = {}
    for s in structs:
        a, n, ad = times[f"{s} p=1"], times[f"{s} never"], times["adam"]

        def r(p, a=a, n=n, ad=ad):
            return _med([(y + p * (x - y)) / z for x, y, z in zip(a, n, ad)])

        summary[s] = {"1": r(1.0), "0.1": r(0.1), "0.03": r(0.03), "never": r(0.0)}
        print(
            f"| {s} | {r(1.0):.3f} | {r(0.1):.3f} | {r(0.03):.3f} | {r(0.0):.3f} | "
            f"{_med(a) / 1e3:,.0f} |"
        )
    return dict(times_us=times, summary=summary, structures=structs)


# ----------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (tiny grids and steps)")
    ap.add_argument(
        "--only",
        default=None,
        help="comma list of parts: digits, quadratic, charlm, lmstep (default: all; "
        "with --quick: quadratic)",
    )
    ap.add_argument(
        "--refits",
        default=",".join(REFITS),
        help=f"comma list of refit schedules ({', '.join(REFITS)})",
    )
    ap.add_argument("--reps", type=int, default=7, help="timing repetitions per problem")
    ap.add_argument(
        "--max-stretch",
        type=float,
        default=2.5,
        help="PSGD equal-wall-clock horizon cap, × the problem's steps",
    )
    ap.add_argument(
        "--adam-stretch",
        type=float,
        default=2.5,
        help="Adam equal-wall-clock horizon cap, × the problem's steps",
    )
    ap.add_argument("--lm-vocab", type=int, default=256, help="lmstep vocabulary")
    ap.add_argument("--lm-reps", type=int, default=7, help="lmstep repetitions")
    ap.add_argument("--lm-block", type=int, default=4, help="lmstep steps per block")
    ap.add_argument("--json", default=os.path.join(_HERE, "out", "defaults.json"))
    ap.add_argument(
        "--compile-cache",
        default=os.path.join(_HERE, "out", "jax_cache"),
        help="JAX persistent compilation cache ('' disables)",
    )
    args = ap.parse_args(argv)
    args.refits = tuple(args.refits.split(","))
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if args.quick:
        args.reps, args.lm_reps, args.lm_block = 2, 2, 1
    parts = (args.only or ("quadratic" if args.quick else "digits,quadratic,charlm,lmstep")).split(
        ","
    )
    print("# defaults.py")
    print(step_time.env_line())
    print(f"date {datetime.datetime.now().isoformat(timespec='minutes')}; commit {lib_commit()}")
    print("command: " + " ".join(["python"] + sys.argv))
    out = {"env": step_time.env_line(), "commit": lib_commit(), "args": vars(args)}
    t0 = time.perf_counter()
    for name in parts:
        if name == "lmstep":
            out["lmstep"] = lm_step(args)
        else:
            out[name] = run_problem(PROBLEMS[name](args.quick), args)
        print(f"\n[{name} done, {time.perf_counter() - t0:,.0f} s elapsed]", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
