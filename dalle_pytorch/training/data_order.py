"""A data order that a resumed run reproduces exactly.

Every epoch's order is a permutation drawn from (seed, epoch), and every sample gets its own seed, with
which torch's RNG is seeded while the dataset reads it: random crops and caption choices then depend only
on (seed, epoch, position), not on DataLoader workers, the number of processes or an interruption. A run
resumed at "epoch e, s samples consumed" reads exactly what the uninterrupted run would have read next.

With several processes the order is split like `DistributedSampler` does: rank r reads positions
r, r + world_size, ...; the order is padded by repeating its start so every rank gets as many batches
(DDP needs every rank to take the same number of steps).

Streaming datasets (WebDataset) have no indices: `StreamingBatches` resumes by skipping the batches already
consumed in the epoch, which reproduces the order but not every random crop.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dalle_pytorch.training.distributed import DistributedContext


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed that is a pure function of `keys` (strings and ints), stable across processes."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ResumableSampler(Sampler):
    """Yields `(dataset index, sample seed)` pairs for this rank, starting `start_sample` global samples
    into `epoch` (set both with `set_epoch`)."""

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.shuffle = shuffle
        self.epoch, self.start_sample = 0, 0

    @property
    def samples_per_rank(self) -> int:
        return -(-self.num_samples // self.world_size)  # ceil

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Read `epoch`, skipping its first `start_sample` samples (counted over all ranks)."""
        if epoch < 0 or start_sample < 0:
            raise ValueError(f"epoch and start_sample must be >= 0, got {epoch}, {start_sample}")
        self.epoch, self.start_sample = epoch, start_sample

    def epoch_order(self, epoch: int) -> tuple[list[int], list[int]]:
        """All ranks' (indices, seeds) of `epoch`, padded to a multiple of world_size."""
        generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
        if self.shuffle:
            indices = torch.randperm(self.num_samples, generator=generator)
        else:
            indices = torch.arange(self.num_samples)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=generator)
        padding = self.samples_per_rank * self.world_size - self.num_samples
        if padding:
            repeat = -(-padding // self.num_samples)
            indices = torch.cat([indices] * (repeat + 1))[: self.num_samples + padding]
            seeds = torch.cat([seeds] * (repeat + 1))[: self.num_samples + padding]
        return indices.tolist(), seeds.tolist()

    def _mine(self) -> list[tuple[int, int]]:
        indices, seeds = self.epoch_order(self.epoch)
        start = self.start_sample // self.world_size
        pairs = list(zip(indices[self.rank :: self.world_size], seeds[self.rank :: self.world_size]))
        return pairs[start:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._mine())

    def __len__(self) -> int:
        return max(0, self.samples_per_rank - self.start_sample // self.world_size)


class SeededDataset(Dataset):
    """`dataset[(index, seed)]` -> `(index, dataset[index])` read with torch's RNG seeded by `seed` (the
    caller's RNG state is left untouched)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: fork_rng restores no other device's RNG, and torch.manual_seed would
            # also queue lazy seeding of every accelerator type, which costs a stack trace (~1 ms) per call
            torch.default_generator.manual_seed(seed)
            return index, self.dataset[index]


class IndexedBatches:
    """Batches of a map-style dataset in the resumable order: `iterate(epoch, start_sample)` yields
    `(sample indices (b,) long, collated batch)`."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        seed: int,
        ctx: DistributedContext,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = ResumableSampler(
            len(dataset), seed=seed, rank=ctx.rank, world_size=ctx.world_size, shuffle=shuffle
        )
        self.batch_size = batch_size
        self.loader = DataLoader(
            SeededDataset(dataset), batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            # a private generator: creating an iterator must not draw from (and shift) the global RNG
            generator=torch.Generator().manual_seed(seed), pin_memory=ctx.device.type == "cuda",
        )  # fmt: skip

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.sampler.samples_per_rank // self.batch_size)

    def iterate(self, epoch: int, start_sample: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        self.sampler.set_epoch(epoch, start_sample)
        yield from self.loader


class StreamingBatches:
    """Batches of an iterable DataLoader (e.g. `webdataset_loader`); yields `(None, batch)`. Resuming
    skips the batches this rank already consumed in the epoch."""

    batches_per_epoch = None

    def __init__(self, loader: DataLoader, *, ctx: DistributedContext):
        self.loader, self.ctx = loader, ctx

    def iterate(self, epoch: int, start_sample: int = 0) -> Iterator[tuple[None, Any]]:
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)
        to_skip = start_sample // self.ctx.world_size
        skipped = 0
        for batch in self.loader:
            if skipped < to_skip:
                skipped += len(batch[0])
                continue
            yield None, batch
