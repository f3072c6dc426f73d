"""ReconSystem.losses: the image means it takes from the covered pixels' values (the albedo-smoothness and occlusion
terms) equal the means over the rendered images, in value and gradient."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_run_losses", ROOT / "bench" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_covered_means_equal_image_means(tmp_path, monkeypatch, fraction):
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    cfg = bench.compose_config("cpu-small", ["data.resolution=32", "model.geometry.tet_grid=16", "data.builtin.n_train=4",
                                             "data.builtin.n_val=1", "data.builtin.n_test=1",
                                             f"model.material.smoothness_fraction={fraction}"])
    device = torch.device("cpu")
    datamodule, system, _, _ = bench.build_for_profile(cfg, device)
    system.train()
    batch = next(bench._batches(datamodule, device))
    img = batch["img"]
    bg = torch.rand(img.shape[:3] + (3,), generator=torch.Generator().manual_seed(0))
    results = []
    # the losses of a training render (no material images) and of a render with images; the reference: nvdiffrec's
    # means over the images, kd_grad.mean() and (ks[..., 0:1] * alpha).mean()
    for variant in ("training", "images", "reference"):
        torch.manual_seed(0)  # the same jitter each time
        out = system.render(batch["mvp"], batch["cam_pos"], tuple(img.shape[1:3]), smoothness=True,
                            material_images=variant != "training")
        assert out["covered"]["kd_grad"].shape[0] == out["covered_index"].shape[0]
        assert ("kd" in out and "kd_grad" in out) == (variant != "training")
        if variant == "reference":
            terms = {"kd_smooth": out["kd_grad"].mean(), "occlusion": (out["ks"][..., 0:1] * out["alpha"].detach()).mean()}
        else:
            terms = system.losses(out, img, bg)
        system.zero_grad(set_to_none=True)
        (terms["kd_smooth"] + 10 * terms["occlusion"]).backward()
        grads = [p.grad.clone() for p in system.material.parameters() if p.grad is not None]
        results.append(({k: float(v) for k, v in terms.items()}, grads))
    terms_b, grads_b = results[-1]
    for terms_a, grads_a in results[:2]:
        assert terms_a["kd_smooth"] > 0 and terms_a["occlusion"] > 0
        for k in ("kd_smooth", "occlusion"):
            assert terms_a[k] == pytest.approx(terms_b[k], rel=1e-5), k
        assert len(grads_a) == len(grads_b) > 0
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)
