"""Which device owns which member of each bucket, under owner-computes sharding.

Owner-computes sharding stores a bucket of `L` same-shape leaves as one stack sharded
along its first axis over `n` devices, so the stack is padded to `S = k·n` rows
(`k = ⌈L/n⌉`, the rows each device holds) and device `d` holds rows `d·k … d·k + k − 1`.
Which of those rows are real members and which are inert padding is a free choice, and it
decides the work: a device only refits and applies its real rows (`_owned.py` skips the
padding). Putting the padding at the end of every stack, as a uniform split would, gives
every bucket's real rows to the *same* first devices: four buckets of 4 leaves on 8
devices leave devices 4–7 idle and cost twice the even share on devices 0–3.

So the real rows are packed across buckets, longest-processing-time first: every member
(most expensive bucket first) goes to the least-loaded device that still has a free row
in its bucket. Four buckets of 4 on 8 devices then give devices 0–3 two buckets and
devices 4–7 the other two: ≈ 1.03× the even share instead of 2×. Only the *number* of
members per device and bucket comes from the packing; members then fill devices in order
(each device's real rows first, padding after), so a bucket whose size is a multiple of
`n` keeps the plain layout (member j in row j).

The cost of a member is an estimate from its preconditioner's shapes (`member_cost`):
only the balance depends on it, never a result.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax


def member_cost(q: Any) -> int:
    """A static estimate of one member's refit + apply work from its preconditioner's
    shapes: each square trailing matrix (a dense n×n factor, batched or not) costs a
    product with itself (its size times n) and a contraction with the parameter (the
    parameter's size times n); the parameter's size for the elementwise work."""
    numel = math.prod(getattr(q, "shape", ()) or (1,))
    cost = numel
    for x in jax.tree.leaves(q):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            cost += (math.prod(shape) + numel) * shape[-1]
    return max(int(cost), 1)


def pack(lengths: Sequence[int], costs: Sequence[int], n: int
         ) -> tuple[list[int], list[tuple[int, ...]]]:
    """Rows for every bucket's members on `n` owners.

    **Arguments:**

    - `lengths`: members per bucket; a bucket of one is not stacked (no padding, no row).
    - `costs`: one member's estimated work, per bucket.
    - `n`: the number of devices that share each stack.

    **Returns:** `(pads, slots)`: per bucket the number of padding rows, and the row of
    each member in the padded stack (`slots[b][j]`; `()` for a bucket of one).
    """
    rows = [math.ceil(m / n) if m > 1 else 0 for m in lengths]
    count = [[0] * n for _ in lengths]  # count[b][d]: members of bucket b on device d
    load = [0] * n
    # most expensive buckets first; within a bucket one member at a time, each to the
    # least-loaded device with a free row (ties: the lowest index, for a stable layout)
    order = sorted((b for b, m in enumerate(lengths) if m > 1),
                   key=lambda b: (-costs[b], b))
    for b in order:
        for _ in range(lengths[b]):
            free = [d for d in range(n) if count[b][d] < rows[b]]
            d = min(free, key=lambda d: (load[d], d))
            count[b][d] += 1
            load[d] += costs[b]
    pads, slots = [], []
    for b, m in enumerate(lengths):
        if m <= 1:
            pads.append(0)
            slots.append(())
            continue
        pads.append(rows[b] * n - m)
        slots.append(tuple(d * rows[b] + r for d in range(n) for r in range(count[b][d])))
    return pads, slots


def device_rows(size: int, slots: Sequence[int], n: int) -> list[int]:
    """Per device, how many real rows of a stack of `size` rows with members at `slots`
    it holds. The rows are always its first ones (see the module docstring): a layout
    that breaks this is rejected, since the owned step would compute the wrong rows."""
    k = size // n
    counts = [0] * n
    for s in slots:
        counts[s // k] += 1
    want = {d * k + r for d in range(n) for r in range(counts[d])}
    if set(slots) != want:
        raise ValueError(f"Owner-computes layout with members at rows {tuple(slots)} of "
                         f"{size}: each device's real rows must come first.")
    return counts
