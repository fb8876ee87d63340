"""The member protocol every family follows, as a base class: `stem -> stages -> head`.

A subclass builds `stem` (a module), `stages` (an `nn.ModuleList`), `head` (its classifier) and
`stage_channels` (channels/features of each stage's output); `StagedMember` adds the forward and the
anytime step protocol (`num_exits`, `advance`, `last`), so no family repeats them and no caller tests
`hasattr`. The attribute names are part of the checkpoint format: slot names are `stem...`,
`stages.<i>...` and `head...`. `ensemble.exits.ExitMember` adds exit heads after chosen stages.
"""

from __future__ import annotations

from torch import Tensor, nn


class StagedMember(nn.Module):
    """`forward(x) -> (B, C)` logits = `head(stages[-1](...stages[0](stem(x))))`."""

    stem: nn.Module
    stages: nn.ModuleList
    head: nn.Module
    stage_channels: list[int]

    num_exits = 1  # without exit heads the classifier is the only exit

    def run_stages(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """`stages[start:stop]` applied in order (the state one anytime step hands to the next)."""
        for s in range(start, len(self.stages) if stop is None else stop):
            h = self.stages[s](h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.run_stages(self.stem(x)))

    def advance(self, h: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Step k of the anytime protocol; a member without exit heads has one step, its whole forward."""
        if k != 0:
            raise IndexError(f"a member without exits has one step (0), not step {k}")
        h = self.run_stages(self.stem(h))
        return h, self.head(h)

    def last(self, x: Tensor) -> Tensor:
        """The classifier's logits (B, C): the member's own forward."""
        return self(x)
