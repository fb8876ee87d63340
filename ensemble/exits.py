"""Early exits (DESIGN.md step 10): exit heads, the `ExitMember` wrapper, per-step FLOPs and schedules.

A member follows the staged protocol: `stem`, `stages` (ModuleList), `head` (its classifier) and
`stage_channels`. `ExitMember(member, exit_stages, heads)` adds a head after each chosen stage; the
member's own `head` is always the last exit. Its `forward(x)` runs stem/stages once and returns every
exit `(B, E, C)`, so `core.slots.trace_slots` lists the exit linears as bank slots (kind "linear") like
any other weight. A *step* advances one member to its next exit; `advance(h, k)` runs exactly the ops of
step k, so per-step FLOPs sum to the full forward.

Schedules and costs live here (not in `anytime/`) because the training loop (`ensemble.loop.run`) writes
them into the final checkpoint (anytime.json) and `ensemble` must not import `anytime` (layering
core <- ensemble <- anytime).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from core.errors import SuperweightsError
from core.flops import count_flops

ANYTIME_FILE = "anytime.json"


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

    def __init__(self, member: nn.Module, exit_stages: tuple[int, ...], heads: list[nn.Module]):
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
        start = 0 if k == 0 else self.exit_stages[k - 1] + 1
        if k == 0:
            h = self.member.stem(h)
        for s in range(start, self.exit_stages[k] + 1):
            h = self.member.stages[s](h)
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
    """A member without exits seen as one step (its whole forward)."""

    num_exits = 1

    def __init__(self, member: nn.Module):
        self.member = member

    def advance(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return h, self.member(h)


def as_steps(member: nn.Module):
    """Anything with `num_exits` and `advance(h, k)`."""
    return member if isinstance(member, ExitMember) else PlainSteps(member)


def stage_shapes(meta_member: nn.Module, example: Tensor) -> list[tuple[int, ...]]:
    """Output shape (no batch) of every stage, traced on the meta device."""
    for attr in ("stem", "stages", "head"):
        if not hasattr(meta_member, attr):
            raise SuperweightsError(f"member {type(meta_member).__name__} has no `{attr}`: exits need stem/stages/head")
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


def wrap_with_exits(member: nn.Module, name: str, exits, example: Tensor, num_classes: int,
                    meta_member: nn.Module | None = None) -> ExitMember:
    """`member` wrapped with the configured exits; shapes come from a meta trace (`meta_member` or a copy)."""
    if not hasattr(member, "stages"):
        raise SuperweightsError(f"member {name} has no `stages`: exits need stem/stages/head")
    exit_stages = resolve_exit_stages(exits, len(member.stages), name)
    if meta_member is None:
        import copy

        meta_member = copy.deepcopy(member).to("meta")
    shapes = stage_shapes(meta_member, example.to("meta"))
    heads = [exit_head(shapes[s], num_classes) for s in exit_stages[:-1]]
    return ExitMember(member, exit_stages, heads)


# ----------------------------------------------------------------------------------------- costs


def step_flops(members: list[nn.Module], example: Tensor) -> list[list[int]]:
    """FLOPs (per `example`, 2 x MACs, FlopCounterMode) of every step of every member; trace on meta."""
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


# ------------------------------------------------------------------------------------- schedules


def member_major(num_exits: list[int]) -> list[tuple[int, int]]:
    return [(m, k) for m, e in enumerate(num_exits) for k in range(e)]


def explicit_schedule(order: list[int] | tuple[int, ...], num_exits: list[int]) -> list[tuple[int, int]]:
    """Member index per step; each member must appear exactly as many times as it has exits."""
    counts = [0] * len(num_exits)
    steps = []
    for m in order:
        if not 0 <= m < len(num_exits):
            raise SuperweightsError(f"anytime.order: member index {m} does not exist (members 0..{len(num_exits) - 1})")
        steps.append((m, counts[m]))
        counts[m] += 1
    if counts != list(num_exits):
        raise SuperweightsError(f"anytime.order must name each member once per exit (exits per member {list(num_exits)}), "
                                f"got counts {counts}")
    return steps


def prefix_probs(exit_probs: list[Tensor], steps: list[tuple[int, int]]) -> list[Tensor]:
    """Ensemble probabilities (N, C) after each prefix: mean over started members of their latest exit."""
    latest: dict[int, Tensor] = {}
    out = []
    for m, k in steps:
        latest[m] = exit_probs[m][:, k]
        out.append(torch.stack(list(latest.values()), 0).mean(0))
    return out


def greedy_schedule(exit_probs: list[Tensor], labels: Tensor, flops: list[list[int]]) -> list[tuple[int, int]]:
    """At each point take the step (advance one member) with the largest validation accuracy gain per FLOP.

    exit_probs[m]: (N, E_m, C) validation probabilities of every exit of member m. Ties: fewer FLOPs,
    then lower member index (deterministic).
    """
    next_exit = [0] * len(exit_probs)
    latest: dict[int, Tensor] = {}
    current = 0.0
    steps = []
    while any(next_exit[m] < p.shape[1] for m, p in enumerate(exit_probs)):
        best = None
        for m, p in enumerate(exit_probs):
            k = next_exit[m]
            if k >= p.shape[1]:
                continue
            trial = dict(latest)
            trial[m] = p[:, k]
            acc = float((torch.stack(list(trial.values()), 0).mean(0).argmax(-1) == labels).double().mean())
            key = ((acc - current) / max(flops[m][k], 1), -flops[m][k], -m)
            if best is None or key > best[0]:
                best = (key, m, k, acc)
        _, m, k, acc = best
        steps.append((m, k))
        latest[m] = exit_probs[m][:, k]
        next_exit[m] += 1
        current = acc
    return steps


def make_schedule(kind: str, order, exit_probs: list[Tensor] | None, labels: Tensor | None,
                  flops: list[list[int]]) -> list[tuple[int, int]]:
    num_exits = [len(f) for f in flops]
    if kind == "member":
        return member_major(num_exits)
    if kind == "explicit":
        return explicit_schedule(order, num_exits)
    if exit_probs is None:
        raise SuperweightsError("a greedy schedule needs validation data")
    return greedy_schedule(exit_probs, labels, flops)


@torch.no_grad()
def exit_probabilities(model, loader, device) -> tuple[list[Tensor], Tensor]:
    """Softmax of every exit of every member: list over members of (N, E_m, C), and labels (N,)."""
    model.eval()
    per_member: list[list[Tensor]] = [[] for _ in model.members]
    labels = []
    for x, y in loader:
        for m, out in enumerate(model.forward_exits_list(x.to(device))):
            per_member[m].append(out.float().softmax(-1).cpu())
        labels.append(y)
    return [torch.cat(p) for p in per_member], torch.cat(labels)


def anytime_record(model, config, info, val_loader=None, device="cpu") -> dict:
    """The anytime.json content: exits, per-step FLOPs (measured once per plan) and the schedule."""
    from .planning import example_input, meta_members

    metas = meta_members(config, info)
    flops = step_flops(metas, example_input(info))
    full = [sum(f) for f in flops]
    exit_probs = labels = None
    if config.anytime.schedule == "greedy" and val_loader is not None:
        exit_probs, labels = exit_probabilities(model, val_loader, device)
    steps = make_schedule(config.anytime.schedule, config.anytime.order, exit_probs, labels, flops)
    cumulative, total = [], 0
    for m, k in steps:
        total += flops[m][k]
        cumulative.append(total)
    return {
        "members": list(model.names),
        "input_shape": [info.in_channels, *info.image_size],
        "exit_stages": [list(getattr(m, "exit_stages", [len(getattr(m, "stages", [None])) - 1])) for m in metas],
        "num_exits": [len(f) for f in flops],
        "step_flops": flops,
        "member_flops": full,
        # the member's own forward (classifier only, exit heads skipped): the cost in the subset protocol
        "direct_flops": [count_flops(m.eval().last if isinstance(m, ExitMember) else m, example_input(info)) for m in metas],
        "schedule": {"kind": config.anytime.schedule, "steps": [list(s) for s in steps],
                     "cumulative_flops": cumulative},
    }


def write_anytime(out_dir, record: dict) -> Path:
    path = Path(out_dir) / ANYTIME_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
