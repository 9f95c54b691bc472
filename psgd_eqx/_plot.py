"""`psgd_eqx.plot_diagnostics`: the health figures of a run, drawn from snapshots."""

from collections.abc import Sequence

import jax
import numpy as np

from ._diagnostics import LeafDiagnostics


_PANELS = (
    ("lipschitz", "Lipschitz estimate L (max over factors)", True),
    ("conditioning", "conditioning of Q (max over factors)", True),
    ("update_rms", "RMS of P·m before clipping", True),
    ("fit_residual", "fit residual ρ (0 = fitted)", False),
)


def _series(snapshots, path: str, field: str) -> np.ndarray:
    """One number per snapshot: the worst factor (max), and over the layers of a scanned
    stack the max (the mean for ρ, whose sign matters)."""
    out = []
    for snap in snapshots:
        value = getattr(snap[path], field) if path in snap else None
        if value is None:
            out.append(np.nan)
            continue
        arrays = value if isinstance(value, tuple) else (value,)
        vals = [np.asarray(a, np.float32).reshape(-1) for a in arrays]
        if not vals or all(v.size == 0 for v in vals):
            out.append(np.nan)
            continue
        flat = np.concatenate(vals)
        out.append(float(np.mean(flat)) if field == "fit_residual" else float(np.nanmax(flat)))
    return np.asarray(out)


def plot_diagnostics(
    snapshots: Sequence[dict[str, LeafDiagnostics]],
    steps: Sequence[int] | None = None,
    out: str | None = None,
    *,
    max_paths: int = 8,
    title: str | None = None,
):
    """Draw the health figures of a run (matplotlib, an optional dependency:
    `pip install "psgd_eqx[plot]"`).

    One panel per figure (L, conditioning and, when tracked, the update RMS and the fit
    residual ρ) against the step, one line per parameter path.

    **Arguments:**

    - `snapshots`: the outputs of [`psgd_eqx.diagnostics`][] taken during a run (device
        or host arrays; they are read with `jax.device_get`).
    - `steps`: the step of each snapshot (default 0, 1, 2, ...).
    - `out`: a file to save the figure to (e.g. `"diagnostics.png"`); `None` = don't save.
    - `max_paths`: the number of paths drawn in colour with a legend entry (those with
        the largest final conditioning); the others are drawn thin and grey.
    - `title`: the figure's title.

    **Returns:** the `matplotlib.figure.Figure`.
    """
    try:
        import matplotlib

        if out is not None and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg"):
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("`plot_diagnostics` needs matplotlib: "
                          "pip install \"psgd_eqx[plot]\" (or matplotlib).") from None
    if not snapshots:
        raise ValueError("`plot_diagnostics` needs at least one snapshot; got none.")
    snapshots = jax.device_get(list(snapshots))
    x = np.arange(len(snapshots)) if steps is None else np.asarray(steps)
    if len(x) != len(snapshots):
        raise ValueError(f"`steps` has {len(x)} entries for {len(snapshots)} snapshots.")
    paths = sorted({p for snap in snapshots for p in snap})
    final = {p: _series(snapshots[-1:], p, "conditioning")[0] for p in paths}
    shown = sorted(paths, key=lambda p: -np.nan_to_num(final[p], nan=-1.0))[:max_paths]
    panels = [(f, label, log) for f, label, log in _PANELS
              if any(np.isfinite(_series(snapshots, p, f)).any() for p in paths)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4),
                             squeeze=False)
    for ax, (field, label, log) in zip(axes[0], panels):
        series = {p: _series(snapshots, p, field) for p in paths}
        if log:  # an L of 0 (a factor not fitted yet) has no place on a log axis
            series = {p: np.where(y > 0, y, np.nan) for p, y in series.items()}
            log = any(np.isfinite(y).any() for y in series.values())
        for p in paths:
            y = series[p]
            if p in shown:
                ax.plot(x, y, label=p, linewidth=1.2)
            else:
                ax.plot(x, y, color="0.75", linewidth=0.6)
        if log:
            ax.set_yscale("log")
        if field == "fit_residual":
            ax.axhline(0.0, color="0.4", linestyle=":", linewidth=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig
