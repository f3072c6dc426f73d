"""ReconSystem: the LightningModule that wires geometry, PBR materials, the environment light and the renderer.

Two passes in one fit, as nvdiffrec:
  pass 1 (steps [0, pass1_steps)): DMTet surface + hash-grid neural material + learnable light;
  pass boundary: the surface is extracted, cleaned, decimated, UV-unwrapped and the neural material baked into a
  9-channel texture (kd, ks, tangent-space normal);
  pass 2 (the next pass2_steps steps): the fixed-topology mesh's vertex offsets, the texture and the light.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recon import compiled, cuda_graphs
from recon.color import linear_to_srgb, tonemap_srgb
from recon.data.depth import depth_loss
from recon.data.sampler import run_seed
from recon.export.cleanup import cull_invisible
from recon.export.uv_bake import bake_pbr_textures, simplify, unwrap
from recon.gather import masked_rows
from recon.geometry.dmtet import DMTetGeometry
from recon.geometry.fixed_mesh import FixedTopologyMesh
from recon.geometry.mesh import Mesh, normal_consistency_loss
from recon.light import EnvironmentLight
from recon.losses import composite, image_loss_function
from recon.materials.pbr import NeuralPBRMaterial, TexturePBRMaterial, channel_bounds
from recon.nonfinite import NonFiniteGuard, NonFiniteReport
from recon.render import make_rasterizer
from recon.render.background import view_noise
from recon.render.graphed import GraphedNeuralPBR, GraphedPBR, texture_material
from recon.render.shading import render_pbr

log = logging.getLogger(__name__)
BOUND_KEYS = ("kd_min", "kd_max", "ks_min", "ks_max", "nrm_min", "nrm_max")


class SurfaceLostError(RuntimeError):
    """The DMTet surface vanished (every SDF value has one sign)."""


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB of two images in [0,1] (any shape)."""
    mse = F.mse_loss(a, b)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def background(kind: str, shape: tuple[int, ...], device, generator: torch.Generator | None = None) -> Tensor:
    """Background [B,H,W,3] in linear RGB: 'white', 'black' or 'random' (per-pixel noise, as nvdiffrec)."""
    if kind == "white":
        return torch.ones(*shape, 3, device=device)
    if kind == "black":
        return torch.zeros(*shape, 3, device=device)
    if kind == "random":
        return torch.rand(*shape, 3, device=device, generator=generator)
    raise ValueError(f"model.loss.background={kind!r}: use 'white', 'black' or 'random'.")


def lr_factor(step: int, warmup_steps: int, decay_steps: int, final_factor: float) -> float:
    """Linear warm-up, then exponential decay reaching ``final_factor`` after ``decay_steps`` (nvdiffrec's schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(decay_steps, 1)
    return final_factor ** min(t, 1.0)


class ReconSystem(L.LightningModule):
    """Fits a relightable textured mesh (geometry, PBR materials, HDR environment light) to posed RGBA views.

    geometry: kwargs of DMTetGeometry. material: kwargs of NeuralPBRMaterial/MLPTexture3D plus the channel
    bounds (``kd_min`` ... ``nrm_max``) and ``perturb_normal``. light: kwargs of EnvironmentLight.
    render: ``backend``. loss: weights (see conf/model/nvdiffrec.yaml). optim: learning rates and schedule.
    bake: ``texture_res``, ``max_faces``, ``cull_invisible`` for the pass boundary and pass-1-only exports.
    pass1_steps, pass2_steps: length of each pass (pass2_steps=0: pass 1 only).
    """

    def __init__(self, geometry: dict, material: dict, light: dict, render: dict, loss: dict, optim: dict,
                 bake: dict, pass1_steps: int = 5000, pass2_steps: int = 5000):
        super().__init__()
        self.save_hyperparameters()
        self._image_thread: ThreadPoolExecutor | None = None  # writes validation images (`_log_image`)
        self._image_jobs: list[Future] = []
        material = dict(material)
        bounds = channel_bounds(**{k: material.pop(k) for k in BOUND_KEYS if k in material})
        self.perturb_normal = bool(material.pop("perturb_normal", True))
        self.geometry = DMTetGeometry(**geometry)
        half = 0.5 * float(self.geometry.scale)
        center = torch.as_tensor(geometry.get("center", (0.0, 0.0, 0.0)), dtype=torch.float32)
        self.material = NeuralPBRMaterial(torch.stack([center - half, center + half]), bounds, **material)
        self.light = EnvironmentLight(**light)
        self.register_buffer("bounds", bounds, persistent=False)
        self.surface: FixedTopologyMesh | None = None  # pass 2
        self.textures: TexturePBRMaterial | None = None
        self.render_cfg, self.loss_cfg, self.optim_cfg, self.bake_cfg = dict(render), dict(loss), dict(optim), dict(bake)
        compiled.set_mode(self.render_cfg.get("compile", "off"))
        cuda_graphs.set_enabled(bool(self.render_cfg.get("cuda_graphs", True)))
        self.pass1_renderer = GraphedNeuralPBR(margin=float(self.render_cfg.get("graph_margin", 0.15)),
                                               skip_padding=bool(self.render_cfg.get("graph_skip_padding", True)))
        self.pass2_renderer = GraphedPBR(margin=float(self.render_cfg.get("graph_margin", 0.15)))
        self.pass1_steps, self.pass2_steps = int(pass1_steps), int(pass2_steps)
        if self.pass1_steps <= 0 or self.pass2_steps < 0:
            raise ValueError(f"model.pass1_steps={pass1_steps} must be > 0 and model.pass2_steps={pass2_steps} >= 0.")
        self.bake_stats: dict = {}
        self.skipped_steps = 0  # steps dropped by optim.skip_nonfinite
        self.nonfinite: NonFiniteGuard | None = None  # set up with the optimiser, once the device is known
        self.pass1_result: dict | None = None  # the pass-1 export, handed to the export callback once
        self._rasterizer = None

    # ------------------------------------------------------------------------------------------ wiring
    @property
    def rasterizer(self):
        if self._rasterizer is None:
            self._rasterizer = make_rasterizer(self.render_cfg.get("backend", "auto"), self.device,
                                               int(self.render_cfg.get("cube_stride", 0)),
                                               str(self.render_cfg.get("cube_kernel", "triton")))
        return self._rasterizer

    @property
    def current_pass(self) -> int:
        return 1 if self.surface is None else 2

    @property
    def pass_step(self) -> int:
        """Step within the current pass."""
        return self.global_step if self.surface is None else max(0, self.global_step - self.pass1_steps)

    def mesh(self) -> Mesh:
        """The surface being optimised: DMTet's (pass 1) or the fixed-topology mesh's (pass 2)."""
        if self.surface is not None:
            return self.surface()
        mesh = self.geometry()
        if mesh.faces.shape[0] == 0:
            raise SurfaceLostError(
                f"the surface vanished at step {self.global_step}: every SDF value has the same sign. Lower "
                "model.optim.lr_geometry, raise model.loss.sdf_weight, or check that the object's masks are not empty."
            )
        return mesh

    def render(self, mvp: Tensor, cam_pos: Tensor, resolution: tuple[int, int], smoothness: bool = False,
               depth: bool = False, mark=None, generator: torch.Generator | None = None,
               material_images: bool = True) -> dict:
        """Render the current model from cameras mvp [B,4,4] at cam_pos [B,3] (see render_pbr's outputs, plus ``mesh``).

        mark: called after the mesh is built and after each rendering stage (for profilers). generator: draws the
        albedo-smoothness jitter (`step_generator` in training, so a resumed run repeats it). material_images: False
        for a training step, whose losses need no material images (render_pbr's)."""
        mesh = self.mesh()
        if mark is not None:
            mark()
        if self.light.specular is None:
            self.light.build_mips()
        fused_shading = bool(self.render_cfg.get("fused_shading", True))
        if self.surface is not None and not (material_images or depth) and self.render_cfg.get("graph_shading", True):
            # a pass-2 training step: the shading after the rasterization through CUDA graphs where they apply
            out = self.pass2_renderer.render(self.rasterizer, mesh, mvp, cam_pos, resolution, self.textures, self.light,
                                             perturb=self.perturb_normal, fused=fused_shading, mark=mark)
            out["mesh"] = mesh
            return out
        if self.surface is None and smoothness and not (material_images or depth) and self.render_cfg.get(
                "graph_shading_pass1", True):
            # a pass-1 training step: the material and shading through CUDA graphs where they apply
            out = self.pass1_renderer.render(self.rasterizer, mesh, mvp, cam_pos, resolution, self.material, self.light,
                                             perturb=self.perturb_normal, fused=fused_shading, generator=generator,
                                             mark=mark)
            out["mesh"] = mesh
            return out
        if self.surface is None:
            def material(gb, mask):
                return self.material(gb["covered_pos"], smoothness=smoothness, generator=generator)
        else:
            material = texture_material(self.textures, self.rasterizer)  # looked up at the covered pixels alone
        out = render_pbr(self.rasterizer, mesh, mvp, cam_pos, resolution, material, self.light, depth=depth,
                         perturb=self.perturb_normal, mark=mark, fused=fused_shading, material_images=material_images)
        out["mesh"] = mesh
        return out

    def sdf_weight(self) -> float:
        """SDF regulariser weight: linear decay over the first ``sdf_decay_fraction`` of pass 1."""
        w0, w1 = self.loss_cfg.get("sdf_weight", 0.2), self.loss_cfg.get("sdf_weight_final", 0.01)
        t = min(1.0, self.global_step / max(1.0, self.loss_cfg.get("sdf_decay_fraction", 0.25) * self.pass1_steps))
        return w0 - (w0 - w1) * t

    def composite(self, out: dict, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        """Rendered and reference colours over the same background, [B,H,W,3] linear."""
        return composite(out["rgb"], out["alpha"], img, bg)

    # ------------------------------------------------------------------------------------------ steps
    def losses(self, out: dict, img: Tensor, bg: Tensor, depth: Tensor | None = None) -> dict:
        """Loss terms of a render ``out`` against reference RGBA ``img`` over background ``bg`` [B,H,W,3].

        nvdiffrec's: alpha MSE + log-L1 on tonemapped sRGB (colour restricted to the reference mask); pass 1 adds the
        SDF sign-change regulariser and (``normal_consistency_weight`` > 0) the normal consistency of the DMTet
        surface, pass 2 the relative Laplacian fading out; both the albedo-smoothness and occlusion regularisers
        (ramped in over ``reg_ramp_steps``) and the light's white-balance prior; with reference ``depth`` [B,H,W,1]
        (0 = unknown) and ``depth_weight`` > 0 an L1 depth term.
        Returns the terms and their weighted ``total``.
        """
        c = self.loss_cfg
        ref_a = img[..., 3:]
        ramp = min(1.0, self.pass_step / max(1, c.get("reg_ramp_steps", 500)))
        losses = image_loss_function(bool(c.get("fused_kernel", True)), out["rgb"].device)
        color_loss, alpha_loss = losses(out["rgb"], out["alpha"], img, bg)
        terms = {"color": color_loss, "alpha": alpha_loss}
        weights = {"color": 1.0, "alpha": c.get("alpha_weight", 1.0)}
        if self.surface is None:
            terms["sdf"], weights["sdf"] = self.geometry.sdf_regularizer(), self.sdf_weight()
            nc_start = c.get("normal_consistency_start", 0.0) * self.pass1_steps
            if c.get("normal_consistency_weight", 0.0) > 0 and self.global_step >= nc_start:
                mesh = out["mesh"]
                terms["normal_consistency"] = normal_consistency_loss(mesh.verts, mesh.faces)
                weights["normal_consistency"] = c["normal_consistency_weight"]
        else:
            t = min(1.0, self.pass_step / max(1, self.pass2_steps))
            terms["laplace"] = self.surface.laplacian_regularizer()
            weights["laplace"] = c.get("laplace_scale", 3000.0) * (1 - t)
        # means over the images, from the covered pixels' values (the images are zero elsewhere): no full-image
        # gradient buffers
        covered, n_pix = out["covered"], out["alpha"][..., 0].numel()
        if "kd_grad" in covered:
            terms["kd_smooth"] = covered["kd_grad"].sum() / n_pix
            weights["kd_smooth"] = c.get("kd_smooth_weight", 0.03) * ramp
        alpha = masked_rows(out["alpha"].detach(), out["covered_index"], 3)
        terms["occlusion"] = (covered["ks"][..., 0:1] * alpha).sum() / n_pix
        weights["occlusion"] = c.get("occlusion_weight", 0.001) * ramp
        if self.light.trainable:
            terms["light_white"], weights["light_white"] = self.light.regularizer(), c.get("light_white_weight", 0.005)
        if depth is not None and c.get("depth_weight", 0.0) > 0 and "depth" in out:
            terms["depth"] = depth_loss(out["depth"], depth, out["alpha"], ref_a)
            weights["depth"] = c["depth_weight"]
        terms["total"] = sum(weights[k] * terms[k] for k in weights)
        return terms

    def step_generator(self) -> torch.Generator:
        """A generator for this step's random draws, seeded from (seed, step, rank) alone: a run resumed from a
        checkpoint draws what the uninterrupted run drew (torch's global generator is not in checkpoints)."""
        g = torch.Generator(device=self.device)
        rank = self.trainer.global_rank if self._trainer is not None else 0
        g.manual_seed(int(np.random.SeedSequence([run_seed(), int(self.global_step), int(rank)]).generate_state(1, np.uint64)[0]))
        return g

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        img = batch["img"]
        if self.light.trainable or self.light.specular is None:
            self.light.build_mips()  # the light's prefiltered levels follow its base every step (differentiably)
        want_depth = "depth" in batch and self.loss_cfg.get("depth_weight", 0.0) > 0
        pass1 = self.surface is None  # the albedo-smoothness jitter (pass 1) is the step's only random draw here
        out = self.render(batch["mvp"], batch["cam_pos"], tuple(img.shape[1:3]), smoothness=pass1, depth=want_depth,
                          generator=self.step_generator() if pass1 else None, material_images=False)
        kind = self.loss_cfg.get("background", "random")  # random: per-view noise, the same on any number of ranks
        bg = (view_noise(batch.get("views", batch["index"]), self.global_step, *img.shape[1:3], seed=run_seed(), device=img.device)
              if kind == "random" else background(kind, img.shape[:3], img.device))
        terms = self.losses(out, img, bg, batch.get("depth"))
        loss = terms["total"]
        self._step_terms = terms  # checked for non-finite values with the gradients: one host sync per step
        if self._logs_this_step():
            names = [k for k in terms if k != "total"]
            with torch.no_grad():
                color, ref = self.composite(out, img, bg)
                train_psnr = psnr(linear_to_srgb(color).clamp(0, 1), linear_to_srgb(ref).clamp(0, 1))
            logs = {f"train/loss_{k}": terms[k] for k in names}
            logs.update({"train/loss": loss, "train/psnr": train_psnr, "train/triangles": float(out["mesh"].faces.shape[0]),
                         "train/pass": float(self.current_pass)})
            for group in self.trainer.optimizers[0].param_groups if self._trainer is not None else []:
                logs[f"lr/{group['name']}"] = group["lr"]
            self.log_dict(logs, prog_bar=False, on_step=True, batch_size=img.shape[0])
            self.log_dict({"pass": float(self.current_pass), "loss": loss, "psnr": train_psnr}, prog_bar=True,
                          on_step=True, logger=False, batch_size=img.shape[0])  # the progress bar (+ it/s, ETA)
        return loss

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():  # the light is fixed while validating: prefilter it once, not per view
            self.light.build_mips()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        img = batch["img"]
        out = self.render(batch["mvp"], batch["cam_pos"], tuple(img.shape[1:3]))
        bg = background("white", img.shape[:3], img.device)
        color, ref = self.composite(out, img, bg)
        srgb, ref_srgb = linear_to_srgb(color).clamp(0, 1), linear_to_srgb(ref).clamp(0, 1)
        pred_m, ref_m = out["alpha"][..., 0] > 0.5, img[..., 3] > 0.5
        iou = (pred_m & ref_m).sum() / (pred_m | ref_m).sum().clamp_min(1)
        self.log_dict({"val/psnr": psnr(srgb, ref_srgb), "val/iou": iou.float()}, batch_size=img.shape[0])
        if batch_idx == 0 and self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            err = (srgb - ref_srgb).abs().mean(-1, keepdim=True).expand_as(srgb) * 4
            row1 = torch.cat([ref_srgb[0], srgb[0], err[0].clamp(0, 1)], dim=1)  # [H,3W,3]
            kd = linear_to_srgb(out["kd"][0]).clamp(0, 1)
            ks = out["ks"][0].clamp(0, 1)
            nrm = (out["normal"][0] * 0.5 + 0.5) * out["alpha"][0]
            row2 = torch.cat([kd, ks, nrm.clamp(0, 1)], dim=1)
            grid = torch.cat([row1, row2], dim=0)
            self._log_image("val/ref_render_error__kd_orm_normal", grid.permute(2, 0, 1))
            with torch.no_grad():  # the learned environment light, lat-long, tonemapped as probe.hdr would display
                probe = tonemap_srgb(self.light.to_latlong(64)).clamp(0, 1)
            self._log_image("val/light_probe", probe.permute(2, 0, 1))

    def _log_image(self, tag: str, image: Tensor) -> None:
        """``add_image`` on a worker thread, the image copied to the host first: encoding the PNG of an 800x800
        validation grid takes 0.2-0.9 s of CPU, which the training loop would otherwise wait for at every
        validation. A failed write raises at the next image or at the end of the stage (`teardown`)."""
        image = image.detach().float().cpu()
        for job in [j for j in self._image_jobs if j.done()]:
            self._image_jobs.remove(job)
            job.result()
        if self._image_thread is None:
            self._image_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recon-images")
        self._image_jobs.append(self._image_thread.submit(self.logger.experiment.add_image, tag, image,
                                                          self.global_step))

    def flush_images(self) -> None:
        """Wait for the validation images still being written (see `_log_image`); raises a failed write's error."""
        jobs, self._image_jobs = self._image_jobs, []
        thread, self._image_thread = self._image_thread, None
        try:
            for job in jobs:
                job.result()
        finally:
            if thread is not None:
                thread.shutdown(wait=True)

    def teardown(self, stage: str) -> None:
        self.flush_images()  # before Lightning finalizes the logger (fit, validate and test alike)

    # ------------------------------------------------------------------------------------------ passes
    @torch.no_grad()
    def bake(self) -> tuple[Mesh, Tensor]:
        """Pass-1 result as a textured mesh: extract, cull invisible faces, decimate, unwrap, bake [R,R,9].

        Statistics (triangle counts, seconds) go to ``bake_stats``.
        """
        import time

        t0 = time.perf_counter()
        full = self.geometry.extract_mesh()
        if full.faces.shape[0] == 0:
            raise SurfaceLostError("the surface vanished: nothing to export (every SDF value has the same sign).")
        mesh = full
        if self.bake_cfg.get("cull_invisible", True) and self._trainer is not None and self.trainer.datamodule is not None:
            frames = self.trainer.datamodule.load_split("train")
            mesh = cull_invisible(self.rasterizer, full, frames.mvp(), frames.resolution)
        visible = int(mesh.faces.shape[0])
        t1 = time.perf_counter()
        mesh = simplify(mesh, int(self.bake_cfg.get("max_faces", 100_000)))
        t2 = time.perf_counter()
        res = int(self.bake_cfg.get("texture_res", 2048))
        atlas: dict = {}
        mesh = unwrap(mesh, resolution=res, chunk_faces=int(self.bake_cfg.get("unwrap_chunk_faces", 1500)),
                      chart_iterations=int(self.bake_cfg.get("unwrap_chart_iterations", 0)), stats=atlas,
                      pack_resolution=int(self.bake_cfg.get("unwrap_pack_resolution", 1024)))
        t_unwrap = time.perf_counter()
        mesh = mesh.with_tangents()
        t3 = time.perf_counter()
        tex = bake_pbr_textures(self.rasterizer, mesh, self.material.sample, res)
        if not self.perturb_normal:  # the normal channels were never trained: export the unperturbed normal
            tex[..., 6:9] = 0.0
            tex[..., 8] = 1.0
        self.bake_stats = {
            "extracted_triangles": int(full.faces.shape[0]), "visible_triangles": visible,
            "exported_triangles": int(mesh.faces.shape[0]), "cull_seconds": t1 - t0, "simplify_seconds": t2 - t1,
            "unwrap_seconds": t_unwrap - t2, "tangents_seconds": t3 - t_unwrap, "bake_seconds": time.perf_counter() - t3,
            "unwrap_charts": atlas["charts"], "unwrap_atlas_used": atlas["atlas_used"],
            "unwrap_xatlas_seconds": atlas["generate_seconds"], "unwrap_components": atlas["components"],
            "unwrap_small_component_faces": atlas["small_component_faces"],
        }
        return mesh, tex

    def begin_pass2(self) -> None:
        """Switch to pass 2: bake the pass-1 result and make it the optimised mesh and texture.

        With several processes rank zero bakes (xatlas is not bit-reproducible across processes) and broadcasts
        the mesh and texture, so every rank continues from the identical result.
        """
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if not distributed or self.trainer.is_global_zero:
            mesh, tex = self.bake()
            payload = {"mesh": {k: getattr(mesh, k).cpu() for k in ("verts", "faces", "uv", "uv_faces")},
                       "texture": tex.cpu(), "stats": self.bake_stats}
        else:
            payload = None
        if distributed:
            payload = self.trainer.strategy.broadcast(payload, src=0)
            mesh = Mesh(**{k: v.to(self.device) for k, v in payload["mesh"].items()}).with_tangents()
            tex, self.bake_stats = payload["texture"].to(self.device), payload["stats"]
        if self.pass1_renderer.capacity is not None:  # pass 1 shaded through its CUDA graph
            self.bake_stats.update(self.pass1_renderer.stats())
        self.pass1_renderer.release()
        self.surface = FixedTopologyMesh(mesh).to(self.device)
        self.textures = TexturePBRMaterial(tex, self.bounds).to(self.device)
        self.textures.clamp_()
        self.pass1_result = {"mesh": mesh, "texture": tex, "light": self.light.to_latlong(self.light.base.shape[1]),
                             "stats": dict(self.bake_stats)}

    @property
    def pass_switch_due(self) -> bool:
        """True before the first pass-2 step: the next ``on_train_batch_start`` bakes the pass-1 result."""
        return self.surface is None and self.pass2_steps > 0 and self.global_step >= self.pass1_steps

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        if self.pass_switch_due:
            self._poll_nonfinite()  # pass 1's last steps are checked before their result is baked
            self.begin_pass2()
            self._rewrap_ddp()
            self.trainer.strategy.setup_optimizers(self.trainer)  # pass-2 parameters, fresh schedule

    def _rewrap_ddp(self) -> None:
        """Under DDP, wrap the module again so the pass-2 parameters join gradient averaging (DDP registers its
        parameters once, when it wraps); the pass-1 networks are frozen so DDP leaves them out."""
        from torch.nn.parallel import DistributedDataParallel

        strategy = self.trainer.strategy
        if not isinstance(getattr(strategy, "model", None), DistributedDataParallel):
            return
        for module in (self.geometry, self.material):
            module.requires_grad_(False)
        strategy.model = strategy._setup_model(strategy.model.module)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():  # nvdiffrec's projections after each step
            self.light.clamp_(min=0.0)
            if self.textures is not None:
                self.textures.clamp_()
        guard, step = self.nonfinite, self.global_step
        if guard is not None and guard.every > 1:
            last = self._trainer is not None and 0 < (self.trainer.max_steps or 0) <= step
            if step % guard.every == 0 or last:  # and before anything is exported
                self._poll_nonfinite()

    @torch.no_grad()
    def result(self) -> dict:
        """What the export writes: ``mesh`` (UV-unwrapped, with tangents), ``texture`` [R,R,9], ``light`` lat-long
        [H,2H,3] and ``stats``. In pass 2 the optimised mesh and texture; in pass 1 (pass2_steps=0 or a fit stopped
        early) a fresh bake of the neural material."""
        if self.surface is None:
            mesh, tex = self.bake()
        else:
            mesh, tex = self.surface().detach(), self.textures.texture.detach()[0]
        stats = dict(self.bake_stats)
        if self.pass2_renderer.capacity is not None:  # pass 2 shaded through its CUDA graph
            stats.update(self.pass2_renderer.stats())
        return {"mesh": mesh, "texture": tex, "light": self.light.to_latlong(self.light.base.shape[1]), "stats": stats}

    @torch.no_grad()
    def extract_mesh(self) -> Mesh:
        return self.geometry.extract_mesh() if self.surface is None else self.surface().detach()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint taken in pass 2 holds the fixed mesh and texture: build them before the weights load."""
        state = checkpoint.get("state_dict", {})
        if "surface.initial_verts" in state and self.surface is None:
            self.surface = FixedTopologyMesh.empty_like(state, "surface.").to(self.device)
            self.textures = TexturePBRMaterial(state["textures.texture"][0], self.bounds).to(self.device)
            for module in (self.geometry, self.material):  # as at the pass switch: pass 2 does not train them
                module.requires_grad_(False)

    # ------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        o = self.optim_cfg
        betas = tuple(o.get("betas", (0.9, 0.99)))
        lr_light = o.get("lr_light", o.get("lr_material", 0.01))
        if self.surface is None:
            groups = [{"name": "geometry", "params": self.geometry.parameters(), "lr": o.get("lr_geometry", 0.03)},
                      {"name": "material", "params": self.material.parameters(), "lr": o.get("lr_material", 0.01)}]
            steps = self.pass1_steps
        else:
            groups = [{"name": "position", "params": self.surface.parameters(), "lr": o.get("lr_position", 0.001)},
                      {"name": "texture", "params": self.textures.parameters(), "lr": o.get("lr_texture", 0.01)}]
            steps = self.pass2_steps
        if self.light.trainable:
            groups.append({"name": "light", "params": self.light.parameters(), "lr": lr_light})
        # one kernel for every parameter's update; fused Adam also cancels a non-finite step on the device
        fused = self.device.type == "cuda" or self.nonfinite_check_every() > 1
        opt = torch.optim.Adam(groups, betas=betas, eps=1e-15 if o.get("tiny_eps", True) else 1e-8, fused=fused)
        warm, final = int(o.get("warmup_steps", 0)), float(o.get("lr_final_factor", 0.1))
        geometry_final = o.get("lr_geometry_final_factor")
        finals = [float(geometry_final) if g["name"] == "geometry" and geometry_final is not None else final
                  for g in groups]
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s, f=f: lr_factor(s, warm, max(steps - warm, 1), f) for f in finals])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _logs_this_step(self) -> bool:
        """Whether this step's metrics reach the logger (every ``trainer.log_every_n_steps`` steps) or it is the first
        step. Logging a dozen values through Lightning costs milliseconds of host time, so the other steps skip it."""
        if self._trainer is None:
            return True
        connector = getattr(self.trainer, "_logger_connector", None)
        return self.global_step == 0 or bool(getattr(connector, "should_update_logs", True))

    def nonfinite_check_every(self) -> int:
        """Steps between host reads of the non-finite record: ``model.optim.nonfinite_check_every``, or by default
        every step on a CPU (no cost there) and every 50 steps on a GPU (a read per step stalls the launch queue)."""
        every = self.optim_cfg.get("nonfinite_check_every")
        return int(every) if every is not None else (50 if self.device.type == "cuda" else 1)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop (or, with ``model.optim.skip_nonfinite``, skip the update) on a non-finite loss or gradient, with the
        culprit named (see recon.nonfinite: the loss terms and every gradient are reduced on the device; read at once,
        or every ``nonfinite_check_every`` steps with the bad steps' updates cancelled on the device meanwhile)."""
        terms, self._step_terms = getattr(self, "_step_terms", None), None
        if self.nonfinite is None:
            self.nonfinite = NonFiniteGuard(self.nonfinite_check_every())
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        report = self.nonfinite.check(self.global_step, self.current_pass, optimizer, named, terms)
        if report is not None:
            self._on_nonfinite(report)

    def _poll_nonfinite(self) -> None:
        report = self.nonfinite.poll() if self.nonfinite is not None else None
        if report is not None:
            self._on_nonfinite(report)

    def _on_nonfinite(self, report: NonFiniteReport) -> None:
        if self.optim_cfg.get("skip_nonfinite", False):
            for p in self.parameters():  # a step checked at once: Adam leaves parameters without a gradient untouched
                p.grad = None
            self.skipped_steps += report.count
            log.warning("skipped %s: %s", "step %d" % report.step if report.count == 1 else f"{report.count} steps",
                        report.message)
            return
        raise FloatingPointError(f"{report.message}. Lower model.optim.lr_geometry / lr_material / lr_light.")
