"""The one Lightning file of ``mmkd.data``: datasets and a collator as a LightningDataModule whose training
position is saved in checkpoints.

The train loader is torchdata's ``StatefulDataLoader``. Lightning 2.6's fit loop stores the ``state_dict()`` of every
stateful train loader in the checkpoint (``_FitLoop.on_save_checkpoint`` -> ``combined_loader``) and loads it back
before the first ``iter()`` of a resumed fit (``_FitLoop.setup_data`` -> ``_load_combined_loader_states``). The
data module also keeps the same state in its own ``state_dict`` (Lightning saves it under the class name) and
applies it to the loader it builds, so the position survives paths where the fit loop's copy is not re-applied.
The sampler is a seeded ``DistributedSampler`` (so Lightning does not replace it under DDP): order = f(seed, epoch),
sharded by rank; the loader fast-forwards within that order on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class SeededSampler(DistributedSampler):
    """A ``DistributedSampler`` that also works without a process group (one replica, rank 0 by default).

    Order is a permutation seeded by ``seed + epoch`` (``set_epoch``), identical on every rank, then sharded by
    rank; with ``drop_last=False`` the last indices repeat to even out the shards (as ``DistributedSampler`` does).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)


class MMKDDataModule(L.LightningDataModule):
    """Train (and optional validation) datasets with one collator, for one stage.

    Args:
        train_dataset: Map-style dataset of records.
        collate_fn: Records -> batch (e.g. ``MultimodalCollator``).
        val_dataset: Optional validation dataset (collated the same way, never shuffled).
        batch_size: Samples per device per step.
        num_workers: Loader worker processes.
        seed: Seed of the sampling order.
        shuffle: Shuffle the training set (order still a function of ``seed`` and epoch).
        drop_last: Drop the last incomplete training batch.
        val_collate_fn: Collator for validation, if it differs (e.g. generation prompts).
    """

    def __init__(
        self,
        train_dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any],
        *,
        val_dataset: Dataset | None = None,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        val_collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.collate_fn, self.val_collate_fn = collate_fn, val_collate_fn or collate_fn
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self._train_loader: StatefulDataLoader | None = None
        self._pending_state: dict[str, Any] | None = None

    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)  # Lightning attaches the Trainer as ``self.trainer``
        if trainer is None:
            return 1, 0
        return max(1, trainer.world_size), trainer.global_rank

    def train_dataloader(self) -> StatefulDataLoader:
        num_replicas, rank = self._replicas()
        sampler = SeededSampler(
            self.train_dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=self.drop_last,
        )
        loader = StatefulDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=False,
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> StatefulDataLoader | list:
        if self.val_dataset is None:
            return []
        num_replicas, rank = self._replicas()
        sampler = SeededSampler(self.val_dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        return StatefulDataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=self.val_collate_fn,
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (what Lightning stores in checkpoints under this class's name)."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the position to apply to the next train loader built (Lightning calls this on resume)."""
        self._pending_state = state_dict.get("train_loader")
