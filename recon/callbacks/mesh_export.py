"""Export the reconstructed mesh when fitting ends: xatlas unwrap, albedo bake, OBJ/MTL/PNG, metrics."""
from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from recon.eval.evaluate import RUN_INFO, evaluate_run, format_table
from recon.export.cleanup import cull_invisible
from recon.export.gltf import write_glb
from recon.export.obj import atomic_write_bytes, write_textured_obj
from recon.export.uv_bake import bake_texture, simplify, unwrap


class MeshExport(L.Callback):
    """When training ends (rank zero): write ``mesh.glb`` and ``mesh.obj`` + ``mesh.mtl`` + ``texture_kd.png`` into ``out_dir``,
    then evaluate the files on the test split into ``metrics.json``.

    texture_res: side of the baked texture in texels. max_faces: decimate larger meshes to this many
    triangles before unwrapping (0 keeps every triangle; xatlas's time grows fast with the count).
    cull_invisible: drop faces that no training view sees (interior DMTet surfaces; see export/cleanup.py).
    save_extracted: also write the full-resolution extracted surface (before decimation) as
    ``mesh_extracted.ply``. evaluate: run recon.eval on the export.
    """

    def __init__(self, out_dir: str, texture_res: int = 2048, max_faces: int = 100_000, cull_invisible: bool = True,
                 save_extracted: bool = False,
                 evaluate: bool = True, eval_samples: int = 100_000):
        self.save_extracted = save_extracted
        self.cull_invisible = cull_invisible
        self.out_dir = Path(out_dir)
        self.max_faces = int(max_faces)
        self.texture_res = int(texture_res)
        self.evaluate = evaluate
        self.eval_samples = int(eval_samples)
        self._t0 = None

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()
        dm = trainer.datamodule
        info = {"data_dir": str(Path(dm.scene_dir()).resolve()), "format": dm.format if dm.path else "nerf_synthetic",
                "resolution": list(dm.resolution) if dm.resolution else None,
                "background_color": list(dm.background_color) if dm.background_color else None,
                "mask_tolerance": dm.mask_tolerance}
        atomic_write_bytes(self.out_dir / RUN_INFO, json.dumps(info, indent=2).encode())

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: the module is still on its training device here
        if trainer.interrupted:
            rank_zero_info("fit interrupted: no mesh exported.")
            return
        fit_seconds = time.perf_counter() - self._t0 if self._t0 else None
        t0 = time.perf_counter()
        with torch.no_grad():
            full = pl_module.extract_mesh()
            if self.save_extracted:
                ply = full.to_trimesh().export(file_type="ply")
                atomic_write_bytes(self.out_dir / "mesh_extracted.ply", ply)
            mesh = full
            if self.cull_invisible:
                frames = trainer.datamodule.load_split("train")
                mesh = cull_invisible(pl_module.rasterizer, full, frames.mvp(), frames.resolution)
            visible_faces = int(mesh.faces.shape[0])
            mesh = unwrap(simplify(mesh, self.max_faces))
            kd = bake_texture(pl_module.rasterizer, mesh, pl_module.material.sample, self.texture_res)
        write_glb(self.out_dir / "mesh.glb", mesh, kd)  # before the OBJ, which is written last
        obj = write_textured_obj(self.out_dir, mesh, kd)
        export_seconds = time.perf_counter() - t0
        rank_zero_info(f"exported {obj} ({mesh.faces.shape[0]} triangles, {self.texture_res}^2 texture)")
        timing = {"fit_seconds": fit_seconds, "export_seconds": export_seconds, "steps": trainer.global_step,
                  "extracted_triangles": int(full.faces.shape[0]), "visible_triangles": visible_faces,
                  "exported_triangles": int(mesh.faces.shape[0])}
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            timing["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(pl_module.device)
        atomic_write_bytes(self.out_dir / "timing.json", json.dumps(timing, indent=2).encode())
        if self.evaluate:
            metrics = evaluate_run(self.out_dir, backend=pl_module.rasterizer.name, device=str(pl_module.device),
                                   n_samples=self.eval_samples)
            rank_zero_info("test metrics of the exported mesh:\n" + format_table(metrics))
