"""Material recovery: a fit of the PBR built-in scene under its known, fixed light recovers the uniform materials,
and its export relights under another light (bench/pbr_recovery.py --known-light, small CPU settings)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from recon.data.synthetic_scene import PBR_MATERIAL

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("pbr_recovery", ROOT / "bench" / "pbr_recovery.py")
recovery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery)

MATERIAL = [
    # no normal map: the bounds pin the tangent-space normal to +z, so the exported normal map is flat too
    "model.material.perturb_normal=false", "model.material.nrm_min=[0,0,1]", "model.material.nrm_max=[0,0,1]",
    # no occlusion channel (ks.x = 0), as several nvdiffrec configs: it would darken the albedo instead
    "model.material.ks_max=[0,1,1]",
]
# 96 px, 96 views, tet grid 24, 300 + 100 steps of 4 views: about 40 s of fitting on two CPU cores.
SETTINGS = [
    "trainer.accelerator=cpu", "model.pass1_steps=300", "model.pass2_steps=100", "model.geometry.tet_grid=24",
    "data.batch_size=4", "model.loss.reg_ramp_steps=100", "model.bake.texture_res=256",
    "trainer.val_check_interval=1000",
    # a coarse hash grid (4 levels up to 32^3): the material is uniform, and the full grid costs 10x the time
    "model.material.encoding.n_levels=4", "model.material.encoding.base_resolution=4",
    "model.material.encoding.max_resolution=32", "model.material.encoding.log2_hashmap_size=12",
    *MATERIAL,
]


@pytest.mark.slow
def test_fit_under_known_light_recovers_materials_and_relights(tmp_path, monkeypatch):
    """Fit the sky-lit PBR scene with the sky probe given and fixed; measure the export (face means of its textures)
    and relight it under the sunset probe against the sunset ground truth (PSNR on object pixels, sRGB).

    Measured with these settings (seeds 0 / 1 / 2; truth kd (0.70, 0.38, 0.18), roughness 0.40, metallic 0.50):
      kd            (0.89, 0.53, 0.27) / (0.83, 0.50, 0.25) / (0.84, 0.51, 0.26)   max error 0.19 / 0.13 / 0.14
      kd*(1-metal)  max error 0.034 / 0.053 / 0.033 against (0.35, 0.19, 0.09)
      metallic      0.58 / 0.52 / 0.56
      roughness     0.75 / 0.74 / 0.73
      relit PSNR    22.8 / 22.3 / 22.2 dB; the same export under the wrong (sky) probe 19.0 / 18.9 / 18.9 dB
    References: the ground-truth mesh and materials score ~29 dB; a fit given the sunset probe instead of the sky one
    relights at 19.7 dB (kd*(1-metal) error 0.23, metallic 0.40); a fit that learns the light (the ill-posed case)
    at 17.4-18.6 dB with metallic 0.83 and kd*(1-metal) error 0.21.

    Bounds: relit PSNR >= 21.5 dB and >= 2.5 dB above the wrong probe (fails a wrong light convention or probe);
    |metallic - 0.5| <= 0.15 (fails a collapse to 0, as when occlusion absorbs it, or a drift to 1 as when the light
    is learned); kd*(1-metal) within 0.08 and kd within 0.25 per channel.
    Roughness is only bounded to [0.3, 0.9]: at this resolution the fitted surface is bumpy at the scale of a tet
    cell (normal consistency ~0.78 against ~0.96 for the true SDF on the same grid) and roughness absorbs the normal
    noise; with the true SDF held fixed the same material fit gives roughness 0.42-0.46 and kd within 0.01. At larger
    settings the fit itself recovers it: on a GPU at 256 px, tet grid 64, the full hash grid and 1500 + 500 steps,
    roughness 0.50,
    metallic 0.47, kd within 0.03, relit 28.9 dB (bench/results/pbr-recovery-known-light-g64-cuda-nvidia-h200.json).
    Smoothing the surface does not close that gap: the pass-1 normal-consistency term
    (model.loss.normal_consistency_weight=0.1) raises the area-weighted cosine between the export's face normals and
    the true ones from 0.55-0.63 to 0.86-0.89, yet roughness stays at 0.72 / 0.73 / 0.73 (relit 23.0 / 22.9 / 22.6 dB),
    and it is as high (0.68, seed 0) on the faces whose normals are within 18 degrees of the truth; applied from mid
    pass 1 on (normal_consistency_start=0.5) it relights better (24.6 / 23.7 / 23.3 dB) at roughness 0.75 / 0.72 / 0.72.
    A longer pass 1 (600 steps) raises roughness to 0.80, a lower lr_geometry (0.01) gives 0.76 (seed 0).
    Where it comes from (seed 0): roughness is already 0.77 in the pass-1 bake (pass 2 leaves it); a uniform
    (kd, roughness, metallic) refit under the sky probe on the fitted pass-1 mesh gives 0.72 with the mesh's own
    normals and 0.42 with the true SDF's normals at the same points (0.39 on the ground-truth mesh), so it is the
    shading normals, not the material field, the light's mip selection or pass 2. The geometry optimisation itself
    degrades them: started from the true SDF and trained, the surface leaves the truth within the first steps
    (roughness 0.78 at lr_geometry 0.03, 0.74 at 0.003, 0.51 at 0.0003; 0.75 at 0.003 with 16 views a step, so not
    minibatch noise), and with the true materials pinned the trained surface's normals fall to a cosine of 0.50
    (0.54 without the deformation, 0.70 without the SDF regulariser, 0.98 at lr_geometry 0.0003) while its colour
    loss rises above the truth's. With the material free, neither the SDF regulariser, the deformation, the random
    background, Adam's eps/beta2 nor the gradient through the shading normals changes the result; pinning roughness
    to 0.4 for the first half of pass 1 ends at 0.47 but by trading it for metallic (0.38) on an equally bumpy
    surface. The export's normal error is reported by bench/pbr_recovery.py under ``surface``.
    The albedo's excess (kd ~25 % bright) is the other side of metallic being a little high: the diffuse colour
    kd*(1-metal) is what the photos pin down, hence its tighter bound.
    """
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    r = recovery.main(["--known-light", "--resolution", "96", "--views", "96", "--run-dir", str(run), *SETTINGS])
    rec, err = r["recovered"], r["error"]
    summary = {"recovered": rec, "relit": r["relit"], "wrong_probe": r["learned_light_on_relit_views"]}
    assert r["relit"]["psnr"] >= 21.5, summary
    assert r["relit"]["psnr"] >= r["learned_light_on_relit_views"]["psnr"] + 2.5, summary
    assert abs(rec["metallic"] - PBR_MATERIAL["metallic"]) <= 0.15, summary
    assert err["diffuse_max_abs"] <= 0.08, summary
    assert err["kd_max_abs"] <= 0.25, summary
    assert 0.3 <= rec["roughness"] <= 0.9, summary
    assert rec["occlusion"] == 0.0, summary  # ks_max[0] = 0 holds through the bake and the 8-bit export


# The GPU settings: 256 px, 100 views, tet grid 64, the full hash grid, 1500 + 500 steps (about 80 s of fitting on an
# H200). The material settings are the CPU test's: no normal map, no occlusion channel.
GPU_SETTINGS = [
    "trainer.accelerator=gpu", "model.pass1_steps=1500", "model.pass2_steps=500", "model.geometry.tet_grid=64",
    "data.batch_size=4", "model.light.base_res=128", "model.bake.texture_res=1024", "model.loss.reg_ramp_steps=300",
    "trainer.val_check_interval=5000", *MATERIAL,
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_under_known_light_recovers_roughness_on_gpu(tmp_path, monkeypatch):
    """At 256 px and tet grid 64 the known-light fit recovers every material channel, roughness too.

    Measured with these settings (seed 0, bench/results/pbr-recovery-known-light-g64-cuda-nvidia-h200.json): roughness
    0.50 (truth 0.40), metallic 0.47, kd within 0.026, kd*(1-metal) within 0.034, relit 28.9 dB against 18.8 dB
    under the wrong probe (the ground truth scores about 29 dB at the CPU test's 96 px). Bounds: roughness within 0.2, metallic within 0.1,
    kd within 0.08, relit >= 27 dB."""
    monkeypatch.setenv("RECON_CACHE", str(tmp_path / "cache"))
    r = recovery.main(["--known-light", "--resolution", "256", "--views", "100", "--run-dir", str(tmp_path / "run"),
                       *GPU_SETTINGS])
    rec, err = r["recovered"], r["error"]
    summary = {"recovered": rec, "relit": r["relit"], "wrong_probe": r["learned_light_on_relit_views"]}
    assert abs(rec["roughness"] - PBR_MATERIAL["roughness"]) <= 0.2, summary
    assert abs(rec["metallic"] - PBR_MATERIAL["metallic"]) <= 0.1, summary
    assert err["kd_max_abs"] <= 0.08 and err["diffuse_max_abs"] <= 0.08, summary
    assert r["relit"]["psnr"] >= 27.0, summary
