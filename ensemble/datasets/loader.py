"""The seeded, shardable batch loader over in-memory uint8 images, with batched crop + flip augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import SuperweightsError


def derived_seed(*parts: int) -> int:
    # SeedSequence mixes (seed, epoch, stream) so neighbouring seeds/epochs give unrelated streams.
    return int(np.random.SeedSequence([p % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


PERM_STREAM, AUG_STREAM, SUBSET_STREAM = 1, 2, 3


def crop_padding(h: int, w: int) -> int:
    """Random-crop padding: 1/8 of the shorter side, rounded half up, at least 1 (4 px at 32, 2 at 16)."""
    return max(1, (min(h, w) + 4) // 8)


class Loader:
    """Iterable over `(x float32 (B,C,H,W) in [0,1], y int64 (B,))`.

    Order and augmentation are a pure function of (seed, epoch): iterating twice without `set_epoch` repeats
    the same epoch. A shard sees the same global batches as the unsharded loader and yields its contiguous
    slice of each, so data-parallel replicas together see exactly the single-process batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        scale: float,
        shuffle: bool,
        augment: bool,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise SuperweightsError(f"batch size must be >= 1, got {batch_size}")
        self._x, self._y = x, y
        self._batch_size = batch_size
        self._scale = scale
        self._shuffle, self._augment, self._seed = shuffle, augment, seed
        self._rank, self._world = rank, world
        self._epoch = 0
        self.num_examples = sum(hi - lo for lo, hi in self._slices())

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def __len__(self) -> int:
        return -(-len(self._y) // self._batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def shard(self, rank: int, world: int) -> Loader:
        if self._world != 1:
            raise SuperweightsError(
                "cannot shard a loader that is already a shard: shard the unsharded loader"
            )
        if world < 1 or not 0 <= rank < world:
            raise SuperweightsError(
                f"shard rank must be in [0, world) with world >= 1, got rank={rank}, world={world}"
            )
        if self._batch_size % world:
            raise SuperweightsError(
                f"batch size {self._batch_size} is not divisible by the {world} data-parallel workers: "
                f"choose a batch size that is a multiple of {world}"
            )
        view = Loader(
            self._x,
            self._y,
            self._batch_size,
            scale=self._scale,
            shuffle=self._shuffle,
            augment=self._augment,
            seed=self._seed,
            rank=rank,
            world=world,
        )
        view._epoch = self._epoch
        return view

    def _slices(self) -> Iterator[tuple[int, int]]:
        """(start, end) epoch positions of this rank's slice, one per global batch."""
        n, b = len(self._y), self._batch_size
        for start in range(0, n, b):
            m = min(b, n - start)
            # A short last batch is split as evenly as it goes (sizes differ by <= 1, possibly 0) so every
            # rank still yields the same number of batches and collectives stay in lockstep.
            q, r = divmod(m, self._world)
            lo = start + self._rank * q + min(self._rank, r)
            yield lo, lo + q + (1 if self._rank < r else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, epoch = len(self._y), self._epoch
        if self._shuffle:
            g = torch.Generator().manual_seed(derived_seed(self._seed, epoch, PERM_STREAM))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        aug = None
        if self._augment and n:
            pad = crop_padding(*self._x.shape[-2:])
            g = torch.Generator().manual_seed(derived_seed(self._seed, epoch, AUG_STREAM))
            # Drawn for the whole epoch up front, indexed by position, so a shard's slice gets exactly the
            # augmentation the same examples get in the unsharded batch.
            offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
            flips = torch.rand(n, generator=g) < 0.5
            aug = (pad, offsets, flips)
        for lo, hi in self._slices():
            idx = order[lo:hi]
            x = self._x[idx]
            if aug is not None:
                pad, offsets, flips = aug
                x = crop_flip(x, pad, offsets[lo:hi], flips[lo:hi])
            yield x.to(torch.float32).div_(self._scale), self._y[idx]


def crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Batched random crop of a zero-padded batch at per-image `offsets` (B, 2), then flips (B,) mirrored."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, :1] + torch.arange(h)  # (B, H)
    cols = offsets[:, 1:] + torch.arange(w)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)  # a flip is a reversed column index
    return padded[
        torch.arange(b)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
