"""Poisson sampling for map-style datasets: variable batches, empty ones included."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optree
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import default_collate as _default_collate

from .._errors import FuncaccumError
from .._privacy import Accounting, check_accounting
from .._validate import check_int, check_real, describe

__all__ = ["PoissonSampler"]


class PoissonSampler(Sampler[list[int]]):
    """Poisson sampling: each index is in a step's batch with probability ``q``, independently.

    A batch sampler for map-style datasets
    (``DataLoader(dataset, batch_sampler=sampler)``, or :meth:`loader`, which
    also collates an empty batch): each step it yields the list of indices
    drawn, so batches vary in size and may be empty, which the accountant's
    subsampling analysis assumes. A noised :func:`~funcaccum.clipped_mean`
    takes every batch, the empty one as a noise-only step, and divides by the
    fixed :attr:`expected_batch_size`.

    With ``max_batch_size``, a draw larger than the cap keeps a uniformly
    random subset of that size (so a step's memory is bounded), and the
    accounting is that of truncated Poisson sampling
    (:meth:`accounting` carries the cap; :func:`~funcaccum.privacy.epsilon`
    accounts it with PLD). A cap a few standard deviations above the mean
    costs little epsilon; a cap at the mean costs a lot (docs/privacy.md).

    Under :class:`~funcaccum.distributed.DataParallel`, give every rank the
    same seed and its ``rank`` and ``world_size``: each rank draws the same
    global batch and yields its share (every ``world_size``-th index), so the
    union over ranks is one Poisson sample.

    Args:
        dataset_size: the number of examples (units) to draw from.
        sample_rate: ``q``, in (0, 1].
        steps: batches per pass (``len(sampler)``); default ``int(1 / q)``, one
            expected pass over the data, as Opacus.
        generator: draws the batches; default a fresh one seeded from torch's
            global generator when iteration starts.
        max_batch_size: the cap, or None.
        rank: this process's rank, for sharding the global batch.
        world_size: the number of processes sharing each batch.

    Example:
        >>> import torch
        >>> from funcaccum import privacy
        >>> sampler = privacy.PoissonSampler(1000, sample_rate=0.01,
        ...                                  generator=torch.Generator().manual_seed(0))
        >>> sizes = [len(batch) for batch in sampler]
        >>> len(sizes), sampler.expected_batch_size, min(sizes) < 10 < max(sizes)
        (100, 10.0, True)
        >>> sampler.accounting(delta=1e-5)
        Accounting(dataset_size=1000, sample_rate=0.01, delta=1e-05, max_batch_size=None)

    References:
        Abadi et al., `Deep Learning with Differential Privacy
        <https://arxiv.org/abs/1607.00133>`_, 2016;
        Ponomareva et al., `How to DP-fy ML <https://arxiv.org/abs/2303.00654>`_, 2023
    """

    def __init__(
        self,
        dataset_size: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        max_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dataset_size = check_int("dataset_size", dataset_size, low=1)
        check_real("sample_rate", sample_rate, low=0, high=1, low_inclusive=False)
        self.sample_rate = float(sample_rate)
        self.steps = (
            int(1 / self.sample_rate) if steps is None else check_int("steps", steps, low=1)
        )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise FuncaccumError(
                f"generator must be a torch.Generator or None, got {describe(generator)}"
            )
        self.generator = generator
        self.max_batch_size = (
            None
            if max_batch_size is None
            else check_int("max_batch_size", max_batch_size, low=1, high=self.dataset_size)
        )
        self.world_size = check_int("world_size", world_size, low=1)
        self.rank = check_int("rank", rank, low=0, high=self.world_size - 1)

    @property
    def expected_batch_size(self) -> float:
        """``q * dataset_size``: the fixed denominator of the noised mean (all ranks together)."""
        return self.sample_rate * self.dataset_size

    def accounting(self, delta: float) -> Accounting:
        """What accounting needs of this sampling, and the delta to report epsilon at."""
        return check_accounting(
            Accounting(self.dataset_size, self.sample_rate, delta, self.max_batch_size)
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        generator = self.generator
        if generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator().manual_seed(seed)
        for _ in range(self.steps):
            drawn = torch.nonzero(
                torch.rand(self.dataset_size, generator=generator) < self.sample_rate
            ).flatten()
            cap = self.max_batch_size
            if cap is not None and drawn.numel() > cap:
                keep = torch.randperm(drawn.numel(), generator=generator)[:cap]
                drawn = drawn[keep.sort().values]
            yield drawn[self.rank :: self.world_size].tolist()

    def loader(
        self, dataset: Any, *, collate_fn: Callable[[list[Any]], Any] | None = None, **options: Any
    ) -> DataLoader:
        """A ``DataLoader`` over ``dataset`` with this batch sampler, empty batches collated.

        An empty batch comes out as the collated first example's structure
        with 0 examples (leaves shaped ``(0, ...)``), which a noised step takes
        as a noise-only step; torch's own collate cannot make one from no
        examples. ``options`` go to ``DataLoader`` (``num_workers``, ...).
        """
        if not isinstance(dataset, Sequence) and not hasattr(dataset, "__getitem__"):
            raise FuncaccumError(
                f"dataset must be a map-style dataset (with __getitem__), got {describe(dataset)}"
            )
        return DataLoader(
            dataset,
            batch_sampler=self,
            collate_fn=_EmptyAwareCollate(collate_fn or _default_collate, dataset[0]),
            **options,
        )


class _EmptyAwareCollate:
    """``collate`` for a non-empty batch; for an empty one, the example's structure with 0 rows."""

    def __init__(self, collate: Callable[[list[Any]], Any], example: Any) -> None:
        self.collate, self.example = collate, example

    def __call__(self, batch: list[Any]) -> Any:
        if batch:
            return self.collate(batch)
        one = self.collate([self.example])
        return optree.tree_map(
            lambda leaf: leaf[:0] if isinstance(leaf, torch.Tensor) else leaf, one
        )
