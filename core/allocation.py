"""Exact integer apportionment of a parameter budget over blocks (DESIGN.md step 4).

Pure integer arithmetic: the result always sums to the budget exactly, whatever the sizes.
"""

from __future__ import annotations

from .errors import BudgetTooSmallError, SuperweightsError


def largest_remainder(total: int, weights: list[int], minimum: int = 1) -> list[int]:
    """Split `total` proportionally to `weights`, every share >= `minimum`, sum == total exactly."""
    n = len(weights)
    if total < minimum * n:
        raise SuperweightsError(f"cannot give {n} shares at least {minimum} each from {total}")
    wsum = sum(weights)
    floors = [total * w // wsum for w in weights]
    remainders = [total * w % wsum for w in weights]
    left = total - sum(floors)
    # Ties broken by position so the result is deterministic.
    for i in sorted(range(n), key=lambda i: (-remainders[i], i))[:left]:
        floors[i] += 1
    # Raise shares below the minimum, taking one at a time from the currently largest share.
    for i in range(n):
        while floors[i] < minimum:
            donor = max(range(n), key=lambda j: (floors[j], -j))
            floors[donor] -= 1
            floors[i] += 1
    return floors


def allocate_budget(budget: int, sizes: list[int], usage: list[int], max_templates: int) -> list[int]:
    """Parameters P_b of each block, summing exactly to `budget`.

    Up to one template per block: proportional to block size (largest remainder, at least one each).
    Beyond that: whole extra templates to the blocks used by the most slots, at most `max_templates`
    templates' worth each; the cap is lifted (one template at a time) only when every block is capped.
    """
    n = len(sizes)
    if budget < n:
        raise BudgetTooSmallError(f"bank.budget={budget} is too small: the minimum is {n} (one parameter per block)", n)
    total = sum(sizes)
    if budget <= total:
        return largest_remainder(budget, sizes)
    params = list(sizes)
    extra = budget - total
    order = sorted(range(n), key=lambda b: (-usage[b], b))
    cap = max_templates
    while extra > 0:
        for b in order:
            room = cap * sizes[b] - params[b]
            give = min(room, extra)
            if give > 0:
                params[b] += give
                extra -= give
            if extra == 0:
                break
        # Reached only when every block is at the cap: lift it by as many whole templates as fit.
        cap += max(1, extra // total)
    return params
