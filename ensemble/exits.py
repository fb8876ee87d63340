"""Early exits (DESIGN.md step 10): exit heads and the `ExitMember` wrapper (bank slots, part of the model).

A member is a `StagedMember` (`ensemble.members.staged`: `stem`, `stages`, `head`, `stage_channels`).
`ExitMember(member, exit_stages, heads)` adds a head after each chosen stage; the member's own `head` is
always the last exit. Its `forward(x)` runs stem/stages once and returns every exit `(B, E, C)`, so
`core.slots.trace_slots` lists the exit linears as bank slots (kind "linear") like any other weight. A
*step* advances one member to its next exit; `advance(h, k)` runs exactly the ops of step k, so per-step
FLOPs sum to the full forward. A staged member without exits is one step (`StagedMember.advance`).

Step costs, schedules, the combiner and the anytime record are `anytime`'s (`anytime.costs`,
`anytime.schedule`, `anytime.combine`, `anytime.record`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from core.errors import SuperweightsError

from .members.staged import StagedMember


def exit_head(feature_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Norm, ReLU, global pool, linear. `feature_shape` excludes the batch: (C, H, W) or (D,)."""
    c = feature_shape[0]
    if len(feature_shape) == 1:
        return nn.Sequential(nn.BatchNorm1d(c), nn.ReLU(inplace=True), nn.Linear(c, num_classes))
    norm = nn.BatchNorm2d(c) if len(feature_shape) == 3 else nn.BatchNorm1d(c)
    pool = nn.AdaptiveAvgPool2d(1) if len(feature_shape) == 3 else nn.AdaptiveAvgPool1d(1)
    return nn.Sequential(norm, nn.ReLU(inplace=True), pool, nn.Flatten(), nn.Linear(c, num_classes))


def resolve_exit_stages(exits, num_stages: int, name: str) -> tuple[int, ...]:
    """Config value -> sorted stage indices whose outputs have an exit (the last stage always does)."""
    if exits == "none":
        chosen: set[int] = set()
    elif exits == "all":
        chosen = set(range(num_stages))
    else:
        bad = [i for i in exits if not 0 <= i < num_stages]
        if bad:
            raise SuperweightsError(
                f"ensemble.exits: stage index {bad[0]} does not exist in {name} (stages 0..{num_stages - 1})"
            )
        chosen = set(exits)
    return tuple(sorted(chosen | {num_stages - 1}))


def exits_enabled(exits) -> bool:
    return exits != "none" and not (not isinstance(exits, str) and len(exits) == 0)


class ExitMember(nn.Module):
    """A member with exits after `exit_stages`: `forward(x) -> (B, E, C)`, exit E-1 = the member's head."""

    def __init__(self, member: StagedMember, exit_stages: tuple[int, ...], heads: list[nn.Module]):
        super().__init__()
        if len(heads) != len(exit_stages) - 1 or exit_stages[-1] != len(member.stages) - 1:
            raise SuperweightsError("ExitMember: one head per exit stage except the last (the member's own head)")
        self.member = member
        self.exit_stages = tuple(exit_stages)
        self.exits = nn.ModuleList(heads)

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def exit_module(self, k: int) -> nn.Module:
        return self.member.head if k == self.num_exits - 1 else self.exits[k]

    def advance(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Step k: from the state after exit k-1 (the normalised input when k == 0) to exit k's logits."""
        if k == 0:
            h = self.member.run_stages(self.member.stem(h), 0, self.exit_stages[0] + 1)
        else:
            h = self.member.run_stages(h, self.exit_stages[k - 1] + 1, self.exit_stages[k] + 1)
        return h, self.exit_module(k)(h)

    def forward(self, x: Tensor) -> Tensor:
        outs, h = [], x
        for k in range(self.num_exits):
            h, logits = self.advance(h, k)
            outs.append(logits)
        return torch.stack(outs, dim=1)

    def last(self, x: Tensor) -> Tensor:
        """The classifier's logits (B, C) only: the member's own forward, exit heads skipped."""
        return self.member(x)


class PlainSteps:
    """A registered member that is not a `StagedMember` (any `nn.Module`) seen as one step: its whole forward."""

    num_exits = 1

    def __init__(self, member: nn.Module):
        self.member = member

    def advance(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return h, self.member(h)


def as_steps(member: nn.Module) -> ExitMember | StagedMember | PlainSteps:
    """The member as something with `num_exits` and `advance(h, k)`: exit and staged members are that already."""
    return member if isinstance(member, ExitMember | StagedMember) else PlainSteps(member)


def _require_staged(member: nn.Module, name: str) -> None:
    if not isinstance(member, StagedMember):
        raise SuperweightsError(f"member {name} is not a StagedMember: exits need stem/stages/head")


def stage_shapes(meta_member: StagedMember, example: Tensor) -> list[tuple[int, ...]]:
    """Output shape (no batch) of every stage, traced on the meta device."""
    _require_staged(meta_member, type(meta_member).__name__)
    shapes, was_training = [], meta_member.training
    meta_member.eval()  # a batch of one: BatchNorm refuses it in training mode at 1x1 maps
    try:
        with torch.no_grad():
            h = meta_member.stem(example)
            for stage in meta_member.stages:
                h = stage(h)
                shapes.append(tuple(h.shape[1:]))
    finally:
        meta_member.train(was_training)
    return shapes


def wrap_with_exits(member: StagedMember, name: str, exits, example: Tensor, num_classes: int,
                    meta_member: StagedMember | None = None) -> ExitMember:
    """`member` wrapped with the configured exits; shapes come from a meta trace (`meta_member` or a copy)."""
    _require_staged(member, name)
    exit_stages = resolve_exit_stages(exits, len(member.stages), name)
    if meta_member is None:
        meta_member = copy.deepcopy(member).to("meta")
    shapes = stage_shapes(meta_member, example.to("meta"))
    heads = [exit_head(shapes[s], num_classes) for s in exit_stages[:-1]]
    return ExitMember(member, exit_stages, heads)
