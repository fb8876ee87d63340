"""Step costs (DESIGN.md step 10): FLOPs per image of every step, of a member's own forward, and cumulative
FLOPs along a schedule. Counted by `torch.utils.flop_counter.FlopCounterMode` (FLOPs = 2 x MACs) on meta
members (`ensemble.planning.meta_members`): shapes are all it needs, and weight generation is not an
inference cost (inference uses materialised weights).
"""

from __future__ import annotations

from torch import Tensor, nn

from core.flops import count_flops
from ensemble.exits import ExitMember, as_steps

Step = tuple[int, int]  # (member index, exit index): advance that member to that exit


def step_flops(members: list[nn.Module], example: Tensor) -> list[list[int]]:
    """FLOPs (per `example`) of every step of every member: `[m][k]` = member m from exit k-1 to exit k."""
    out = []
    for m in members:
        m.eval()  # a batch of one: BatchNorm refuses it in training mode at 1x1 maps
        steps = as_steps(m)
        h, row = example, []
        for k in range(steps.num_exits):
            holder: dict = {}

            def run(h=h, k=k, holder=holder, steps=steps):
                holder["h"] = steps.advance(h, k)[0]

            row.append(count_flops(run))
            h = holder["h"]
        out.append(row)
    return out


def direct_flops(members: list[nn.Module], example: Tensor) -> list[int]:
    """FLOPs of each member's own forward (its classifier only, exit heads skipped): the cost of a whole member
    in the member-subset protocol."""
    return [count_flops(m.eval().last if isinstance(m, ExitMember) else m.eval(), example) for m in members]


def cumulative_flops(flops: list[list[int]], steps: list[Step]) -> list[int]:
    """Per-image FLOPs spent after each prefix of `steps` (`flops` as `step_flops`)."""
    out, total = [], 0
    for m, k in steps:
        total += flops[m][k]
        out.append(total)
    return out
