"""The global-batch sampler: every process count sees the same global views per step, each rank its own slice."""
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from recon.data.datamodule import NeRFDataModule
from recon.data.frames import DataError
from recon.data.sampler import GlobalBatchSampler, SharedPermutation, run_seed


def rank_batches(n: int, batch: int, world: int, seed: int = 3, epoch: int = 0) -> list[list[list[int]]]:
    """[rank][step] -> indices."""
    out = []
    for rank in range(world):
        s = GlobalBatchSampler(SharedPermutation(n, seed), batch, rank, world)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_one_process_batches(world):
    (single,) = rank_batches(22, 8, 1)
    split = rank_batches(22, 8, world)
    assert len(single) == 22 // 8 and all(len(b) == 8 for b in single)
    for step, global_batch in enumerate(single):
        slices = [split[r][step] for r in range(world)]
        assert all(len(s) == 8 // world for s in slices)
        assert sum(slices, []) == global_batch  # rank r holds views r*B/W .. (r+1)*B/W - 1, in order


def test_permutation_depends_on_seed_and_epoch_only():
    a, b = rank_batches(30, 6, 1, seed=1), rank_batches(30, 6, 1, seed=1)
    assert a == b
    assert rank_batches(30, 6, 1, seed=2) != a and rank_batches(30, 6, 1, seed=1, epoch=1) != a
    (epoch,) = rank_batches(30, 6, 1, seed=1)
    assert sorted(sum(epoch, [])) == list(range(30))  # a permutation: no view twice in an epoch


def test_lightning_sets_the_epoch_through_the_dataloader():
    sampler = GlobalBatchSampler(SharedPermutation(12, 0), 4)
    loader = DataLoader(list(range(12)), batch_sampler=sampler)
    first = [b.tolist() for b in loader]
    _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls at every epoch start
    assert sampler.sampler.epoch == 1 and [b.tolist() for b in loader] != first


def test_batch_must_divide_by_world_size():
    with pytest.raises(DataError, match=r"data.batch_size=6 .* divide by the number of processes, 4"):
        GlobalBatchSampler(SharedPermutation(20, 0), 6, rank=0, world_size=4)
    with pytest.raises(DataError, match="fewer than data.batch_size=8"):
        GlobalBatchSampler(SharedPermutation(5, 0), 8, rank=0, world_size=2)


def test_fewer_views_than_a_batch_give_one_batch_of_all():
    (single,) = rank_batches(6, 8, 1)
    assert len(single) == 1 and sorted(single[0]) == list(range(6))
    split = rank_batches(6, 8, 2)
    assert split[0][0] + split[1][0] == single[0]


def test_run_seed_follows_seed_everything(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "17")
    assert run_seed() == 17
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert run_seed() == 0


@pytest.mark.parametrize("resident", [True, False])
def test_datamodule_hands_each_rank_its_slice(scene, resident):
    def first_epoch(world, rank):
        dm = NeRFDataModule(path=str(scene), resolution=32, batch_size=4, resident=resident)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank) if world > 1 else None
        dm.setup("fit")
        return [b["index"].tolist() for b in dm.train_dataloader()]

    single = first_epoch(1, 0)
    assert len(single) == 6 // 4 and all(len(b) == 4 for b in single)
    ranks = [first_epoch(2, r) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == single
    val = NeRFDataModule(path=str(scene), resolution=32, batch_size=4, resident=resident)
    val.trainer = SimpleNamespace(world_size=2, global_rank=1)
    assert sum(len(b["index"]) for b in val.val_dataloader()) == 1  # every rank validates every view
    bad = NeRFDataModule(path=str(scene), resolution=32, batch_size=3, resident=resident)
    bad.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.raises(DataError, match="data.batch_size=3"):
        bad.train_dataloader()


def test_datamodule_seed_changes_the_order(scene, monkeypatch):
    def order(seed):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        dm = NeRFDataModule(path=str(scene), resolution=32, batch_size=1)
        return [b["index"].item() for b in dm.train_dataloader()]

    assert order(0) == order(0) and order(0) != order(1)
    assert torch.equal(torch.tensor(sorted(order(5))), torch.arange(6))


def test_resume_at_continues_mid_epoch_once():
    """A run resumed at global step s draws, for the rest of that epoch, the batches the uninterrupted run drew; the
    next epoch is whole again."""
    full = GlobalBatchSampler(SharedPermutation(12, 5), 2)  # 6 steps an epoch
    full.set_epoch(1)
    epoch1 = list(full)
    resumed = GlobalBatchSampler(SharedPermutation(12, 5), 2)
    resumed.set_epoch(1)
    resumed.resume_at(6 + 4)  # step 10: epoch 1, its fifth batch
    assert list(resumed) == epoch1[4:]
    assert list(resumed) == epoch1  # only the first pass after resuming skips
