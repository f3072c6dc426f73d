"""Per-view background noise: a function of (seed, step, frame index), not of the batch it is drawn in."""
import torch

from recon.render.background import view_noise


def test_noise_of_a_view_does_not_depend_on_its_batch():
    whole = view_noise(torch.tensor([4, 9, 2, 7]), step=11, height=6, width=5, seed=0)
    assert whole.shape == (4, 6, 5, 3) and whole.dtype == torch.float32
    assert 0 <= whole.min() and whole.max() < 1 and 0.4 < whole.mean() < 0.6
    halves = torch.cat([view_noise(torch.tensor([4, 9]), 11, 6, 5, 0), view_noise(torch.tensor([2, 7]), 11, 6, 5, 0)])
    assert torch.equal(whole, halves)
    assert torch.equal(view_noise(torch.tensor([7]), 11, 6, 5, 0)[0], whole[3])


def test_noise_changes_with_view_step_and_seed():
    base = view_noise(torch.tensor([3]), 5, 8, 8, seed=0)
    for other in (view_noise(torch.tensor([4]), 5, 8, 8, 0), view_noise(torch.tensor([3]), 6, 8, 8, 0),
                  view_noise(torch.tensor([3]), 5, 8, 8, 1)):
        assert (other - base).abs().mean() > 0.1
    two = view_noise(torch.tensor([3, 3]), 5, 8, 8, 0)
    assert torch.equal(two[0], two[1]) and torch.equal(two[0], base[0])  # the same view twice: the same noise
