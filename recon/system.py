"""ReconSystem: the LightningModule that wires DMTet geometry, the neural material and the renderer."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from recon.color import linear_to_srgb, tonemap_srgb
from recon.geometry.dmtet import DMTetGeometry
from recon.geometry.mesh import Mesh
from recon.materials.mlp_texture import MLPTexture3D
from recon.render import make_rasterizer
from recon.render.shading import render_albedo


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
    """Fits a DMTet surface and a hash-grid albedo field to posed RGBA views.

    geometry: kwargs of DMTetGeometry. material: kwargs of MLPTexture3D (besides aabb/channels).
    render: ``backend`` ('auto' | 'torch' | 'nvdiffrast'). loss: ``background``, ``sdf_weight``,
    ``sdf_weight_final``, ``sdf_decay_fraction``, ``alpha_weight``. optim: ``lr_geometry``, ``lr_material``,
    ``warmup_steps``, ``lr_final_factor``, ``betas``. ``max_steps`` sets the schedules' length.
    """

    def __init__(self, geometry: dict, material: dict, render: dict, loss: dict, optim: dict, max_steps: int = 5000):
        super().__init__()
        self.save_hyperparameters()
        self.geometry = DMTetGeometry(**geometry)
        half = 0.5 * float(self.geometry.scale)
        center = torch.as_tensor(geometry.get("center", (0.0, 0.0, 0.0)), dtype=torch.float32)
        aabb = torch.stack([center - half, center + half])
        self.material = MLPTexture3D(aabb, channels=3, **material)
        self.render_cfg = dict(render)
        self.loss_cfg = dict(loss)
        self.optim_cfg = dict(optim)
        self.max_steps = int(max_steps)
        self._rasterizer = None

    # ------------------------------------------------------------------------------------------ wiring
    @property
    def rasterizer(self):
        if self._rasterizer is None:
            self._rasterizer = make_rasterizer(self.render_cfg.get("backend", "auto"), self.device)
        return self._rasterizer

    def mesh(self) -> Mesh:
        mesh = self.geometry()
        if mesh.faces.shape[0] == 0:
            raise SurfaceLostError(
                f"the surface vanished at step {self.global_step}: every SDF value has the same sign. Lower "
                "model.optim.lr_geometry, raise model.loss.sdf_weight, or check that the object's masks are not empty."
            )
        return mesh

    def render(self, mesh: Mesh, mvp: Tensor, resolution: tuple[int, int]) -> dict:
        return render_albedo(self.rasterizer, mesh, mvp, resolution, albedo_fn=self.material.sample)

    def sdf_weight(self) -> float:
        """SDF regulariser weight: linear decay over the first ``sdf_decay_fraction`` of training."""
        w0, w1 = self.loss_cfg.get("sdf_weight", 0.2), self.loss_cfg.get("sdf_weight_final", 0.01)
        t = min(1.0, self.global_step / max(1.0, self.loss_cfg.get("sdf_decay_fraction", 0.25) * self.max_steps))
        return w0 - (w0 - w1) * t

    def composite(self, out: dict, img: Tensor, bg: Tensor) -> tuple[Tensor, Tensor]:
        """Rendered and reference colours over the same background, [B,H,W,3] linear."""
        color = out["rgb"] + (1 - out["alpha"]) * bg
        ref = img[..., :3] * img[..., 3:] + (1 - img[..., 3:]) * bg
        return color, ref

    # ------------------------------------------------------------------------------------------ steps
    def losses(self, out: dict, img: Tensor, bg: Tensor) -> dict:
        """Loss terms of a render ``out`` against reference RGBA ``img`` over background ``bg`` [B,H,W,3].

        nvdiffrec's image loss: alpha MSE + log-L1 on tonemapped sRGB, colour restricted to the reference mask;
        plus the SDF sign-change regulariser. Returns the terms, ``total`` and the composited ``color``/``ref``.
        """
        color, ref = self.composite(out, img, bg)
        ref_a = img[..., 3:]
        terms = {
            "color": F.l1_loss(tonemap_srgb(color * ref_a), tonemap_srgb(ref * ref_a)),
            "alpha": F.mse_loss(out["alpha"], ref_a),
            "sdf": self.geometry.sdf_regularizer(),
        }
        terms["total"] = terms["color"] + self.loss_cfg.get("alpha_weight", 1.0) * terms["alpha"] + self.sdf_weight() * terms["sdf"]
        return {**terms, "composited": color, "reference": ref}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        img = batch["img"]
        mesh = self.mesh()
        out = self.render(mesh, batch["mvp"], tuple(img.shape[1:3]))
        bg = background(self.loss_cfg.get("background", "random"), img.shape[:3], img.device)
        terms = self.losses(out, img, bg)
        loss, color, ref = terms["total"], terms["composited"], terms["reference"]
        loss_color, loss_alpha, loss_sdf = terms["color"], terms["alpha"], terms["sdf"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step} (color={loss_color.item()}, alpha={loss_alpha.item()}, "
                f"sdf={loss_sdf.item()}). Lower model.optim.lr_geometry / lr_material."
            )
        with torch.no_grad():
            train_psnr = psnr(linear_to_srgb(color).clamp(0, 1), linear_to_srgb(ref).clamp(0, 1))
        self.log_dict(
            {"train/loss": loss, "train/loss_color": loss_color, "train/loss_alpha": loss_alpha,
             "train/loss_sdf": loss_sdf, "train/psnr": train_psnr, "train/triangles": float(mesh.faces.shape[0])},
            prog_bar=False, on_step=True, batch_size=img.shape[0],
        )
        self.log("psnr", train_psnr, prog_bar=True, on_step=True, logger=False, batch_size=img.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        img = batch["img"]
        out = self.render(self.mesh(), batch["mvp"], tuple(img.shape[1:3]))
        bg = background("white", img.shape[:3], img.device)
        color, ref = self.composite(out, img, bg)
        srgb, ref_srgb = linear_to_srgb(color).clamp(0, 1), linear_to_srgb(ref).clamp(0, 1)
        pred_m, ref_m = out["alpha"][..., 0] > 0.5, img[..., 3] > 0.5
        iou = (pred_m & ref_m).sum() / (pred_m | ref_m).sum().clamp_min(1)
        self.log_dict({"val/psnr": psnr(srgb, ref_srgb), "val/iou": iou.float()}, batch_size=img.shape[0])
        if batch_idx == 0 and self.logger is not None and hasattr(self.logger.experiment, "add_image"):
            err = (srgb - ref_srgb).abs().mean(-1, keepdim=True).expand_as(srgb) * 4
            grid = torch.cat([ref_srgb[0], srgb[0], err[0].clamp(0, 1)], dim=1)  # [H,3W,3]
            self.logger.experiment.add_image("val/reference_render_error", grid.permute(2, 0, 1), self.global_step)

    # ------------------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        o = self.optim_cfg
        betas = tuple(o.get("betas", (0.9, 0.99)))
        opt = torch.optim.Adam(
            [{"params": self.geometry.parameters(), "lr": o.get("lr_geometry", 0.03)},
             {"params": self.material.parameters(), "lr": o.get("lr_material", 0.01)}],
            betas=betas, eps=1e-15 if o.get("tiny_eps", True) else 1e-8,
        )
        warm, final = int(o.get("warmup_steps", 0)), float(o.get("lr_final_factor", 0.1))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, warm, max(self.max_steps - warm, 1), final)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer) -> None:
        named = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        finite = torch.stack([g.isfinite().all() for _, g in named]) if named else None
        if finite is not None and not bool(finite.all()):  # one host sync for all parameters
            bad = [n for (n, _), ok in zip(named, finite.tolist()) if not ok]
            raise FloatingPointError(
                f"non-finite gradient at step {self.global_step} in {', '.join(bad)}. "
                "Lower model.optim.lr_geometry / lr_material."
            )

    @torch.no_grad()
    def extract_mesh(self) -> Mesh:
        return self.geometry.extract_mesh()

