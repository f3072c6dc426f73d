"""The closing summary and the TensorBoard mesh's vertex colours."""
from pathlib import Path

import torch

from recon.callbacks.mesh_export import final_summary, vertex_albedo
from recon.geometry.mesh import Mesh


def test_vertex_albedo_reads_the_texel_under_each_vertex():
    kd = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [1.0, 1.0, 1.0]]])  # rows: v down; cols: u
    uv = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]])  # texel centres (0,0), (0,1), (1,0)
    mesh = Mesh(verts=torch.rand(3, 3), faces=torch.tensor([[0, 1, 2]]), uv=uv, uv_faces=torch.tensor([[0, 1, 2]]))
    colors = vertex_albedo(mesh, kd)
    assert colors.dtype == torch.uint8
    assert colors.tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255]]


def test_final_summary_names_exports_metrics_and_time(tmp_path: Path):
    for name in ("mesh.obj", "mesh.glb"):
        (tmp_path / name).write_text("x")
    text = final_summary(tmp_path, {"fit_seconds": 12.5, "steps": 100, "export_seconds": 1.0,
                                    "pass1_iterations_per_second": 9.5, "peak_gpu_memory_bytes": 3 * 2**30},
                         {"psnr": "inf", "ssim": 1.0, "iou": 1.0, "geometry": {"chamfer_l1": 0.001}})
    assert str(tmp_path) in text and "mesh.obj, mesh.glb" in text and "PSNR inf dB" in text
    assert "fit 12.5 s for 100 steps (pass 1 9.5 it/s)" in text and "3.00 GiB" in text
