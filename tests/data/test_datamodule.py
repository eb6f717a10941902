from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import Dataset

from mmkd.data.datamodule import MMKDDataModule, SeededSampler


class Numbers(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def collate(items: list[int]) -> torch.Tensor:
    return torch.tensor(items)


def batches(loader, k: int | None = None) -> list[list[int]]:
    out = []
    for b in loader:
        out.append(b.tolist())
        if k is not None and len(out) == k:
            break
    return out


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_restores_remaining_batches(num_workers: int) -> None:
    dm = MMKDDataModule(Numbers(40), collate, batch_size=3, seed=7, num_workers=num_workers)
    full = batches(dm.train_dataloader())
    assert len(full) == 13 and sorted(sum(full, [])) != list(range(39))  # shuffled, last one dropped

    first = dm.train_dataloader()
    head = batches(first, 5)
    state = dm.state_dict()

    fresh = MMKDDataModule(Numbers(40), collate, batch_size=3, seed=7, num_workers=num_workers)
    fresh.load_state_dict(state)
    rest = batches(fresh.train_dataloader())
    assert head == full[:5]
    assert rest == full[5:]


def test_sampler_is_seeded_sharded_and_epoch_dependent() -> None:
    ds = Numbers(20)
    a = list(SeededSampler(ds, seed=3))
    assert a == list(SeededSampler(ds, seed=3)) and a != list(SeededSampler(ds, seed=4))
    s = SeededSampler(ds, seed=3)
    s.set_epoch(1)
    assert sorted(list(s)) == list(range(20)) and list(s) != a
    r0 = list(SeededSampler(ds, num_replicas=2, rank=0, seed=3))
    r1 = list(SeededSampler(ds, num_replicas=2, rank=1, seed=3))
    assert len(r0) == len(r1) == 10 and sorted(r0 + r1) == list(range(20))


class Recorder(L.LightningModule):
    def __init__(self, use_estimated_steps: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.use_estimated_steps = use_estimated_steps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        return (self.w * batch.float().mean()).sum()

    def configure_optimizers(self):
        if self.use_estimated_steps:  # a cosine schedule would ask for this; it builds the loader early
            assert self.trainer.estimated_stepping_batches > 0
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path: Path, max_steps: int, ckpt: bool) -> L.Trainer:
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)]
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks if ckpt else [], enable_checkpointing=ckpt,
    )  # fmt: skip


@pytest.mark.parametrize("use_estimated_steps", [False, True])
def test_lightning_resume_continues_with_same_batches(tmp_path: Path, use_estimated_steps: bool) -> None:
    def dm() -> MMKDDataModule:
        return MMKDDataModule(Numbers(30), collate, batch_size=4, seed=1)

    ref = Recorder()
    _trainer(tmp_path / "ref", 10, False).fit(ref, datamodule=dm())  # 7 batches/epoch: crosses an epoch

    first = Recorder(use_estimated_steps)
    _trainer(tmp_path / "a", 3, True).fit(first, datamodule=dm())
    ckpt = sorted((tmp_path / "a").glob("*step=3*.ckpt"))
    assert ckpt, list((tmp_path / "a").iterdir())
    second = Recorder(use_estimated_steps)
    _trainer(tmp_path / "b", 10, False).fit(second, datamodule=dm(), ckpt_path=ckpt[0])
    assert first.seen == ref.seen[:3]
    assert second.seen == ref.seen[3:]
