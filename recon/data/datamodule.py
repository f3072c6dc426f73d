"""LightningDataModule over posed frames: NeRF-synthetic, nerfstudio / instant-ngp, LLFF or COLMAP directories,
unposed photos (posed by structure-from-motion), or the built-in scene."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from recon.data.frames import DataError, FrameDataset, Frames
from recon.data.normalize import Normalization, fit_normalization
from recon.data.sampler import GlobalBatchSampler, SharedPermutation, run_seed
from recon.data.sources import FORMATS, detect_format, load_frames

log = logging.getLogger(__name__)
NORMALIZE_DEFAULT = {"nerf_synthetic": "none"}  # poses already in NeRF-synthetic units; every other format: auto


def _as_hw(resolution) -> tuple[int, int] | None:
    if resolution is None:
        return None
    if isinstance(resolution, int):
        return resolution, resolution
    hw = tuple(int(r) for r in resolution)
    if len(hw) != 2 or min(hw) <= 0:
        raise DataError(f"data.resolution={resolution!r} must be an int or [height, width] of positive ints.")
    return hw


class NeRFDataModule(L.LightningDataModule):
    """Train/val/test frames for reconstruction.

    path: a scene directory; None uses the built-in scene (generated on first use at ``resolution``).
    format: auto | nerf_synthetic | nerfstudio | llff | colmap | views | images; auto picks by the marker
    (transforms_train.json, transforms.json, poses_bounds.npy, sparse/0/cameras.bin|txt, cameras.json, then images/
    or image files; see sources.FORMATS). Batches hold ``img`` [B,H,W,4], ``mvp`` [B,4,4], ``cam_pos`` [B,3],
    ``index`` [B] and, when the scene has depth maps, ``depth`` [B,H,W,1] (scene units along -z, 0 = unknown).
    resolution: int or [H, W]; frames are resampled to it (None keeps the files' size).
    batch_size: views per training step. background_color: sRGB backdrop of RGB-only images (mask from colour).
    resident: keep every frame on the training device and batch by index there (no per-step host copies);
    off, batches are collated on the host and copied each step (for data sets larger than device memory).
    sfm: structure-from-motion settings of format=images (see ``recon.data.sfm.load_images``).
    normalize: auto | none | None. auto fits a similarity from the training cameras and masks that puts the
    object inside the tet grid (``grid_scale`` edge at ``grid_center``, ``normalize_margin`` of the half edge
    free) and applies it to every split (camera positions, depth); none keeps the input's coordinates. None
    picks per format: none for nerf_synthetic and the built-in scene (already in NeRF-synthetic units), auto
    for the others. The similarity is ``self.normalization`` (``to_world`` maps a mesh back).
    min_views: the fewest training frames accepted.
    """

    def __init__(
        self,
        path: str | None = None,
        resolution: int | list[int] | None = 256,
        batch_size: int = 4,
        background_color: list[float] | None = None,
        mask_tolerance: float = 0.02,
        num_workers: int = 0,
        builtin: dict | None = None,
        resident: bool = True,
        format: str = "auto",
        sfm: dict | None = None,
        normalize: str | None = None,
        normalize_margin: float = 0.1,
        grid_scale: float = 2.1,
        grid_center: list[float] | None = None,
        min_views: int = 3,
    ):
        super().__init__()
        if format != "auto" and format not in FORMATS:
            raise DataError(f"data.format={format!r} is not one of auto, {', '.join(FORMATS)}.")
        self.path = path
        self.format = format
        self.resolution = _as_hw(resolution)
        self.batch_size = int(batch_size)
        if self.batch_size <= 0:
            raise DataError(f"data.batch_size={batch_size} must be a positive number of views per step.")
        self.background_color = tuple(background_color) if background_color is not None else None
        self.mask_tolerance = mask_tolerance
        self.num_workers = num_workers
        self.builtin = dict(builtin or {})
        self.resident = resident
        self.sfm = dict(sfm or {})
        if normalize not in (None, "auto", "none"):
            raise DataError(f"data.normalize={normalize!r} is not one of auto, none (or null: per format).")
        self.normalize = normalize
        self.normalize_margin = float(normalize_margin)
        self.grid_scale = float(grid_scale)
        self.grid_center = [float(c) for c in (grid_center if grid_center is not None else [0.0, 0.0, 0.0])]
        self.min_views = int(min_views)
        self._normalization: Normalization | None = None
        self._raw: dict[str, Frames] = {}
        self.frames: dict[str, Frames] = {}
        self._on_device: dict[tuple[str, str], dict] = {}

    def scene_dir(self) -> Path:
        """The data directory, generating the built-in scene when no path is set."""
        if self.path:
            return Path(self.path).expanduser()
        from recon.data.synthetic_scene import builtin_scene

        return builtin_scene(**self._builtin_settings())

    def scene_cached(self) -> bool | None:
        """Whether the built-in scene is already generated (None when ``data.path`` is set)."""
        if self.path:
            return None
        from recon.data.synthetic_scene import builtin_scene_dir

        return (builtin_scene_dir(**self._builtin_settings()) / "transforms_test.json").is_file()

    def _builtin_settings(self) -> dict:
        res = self.resolution[0] if self.resolution else 256
        if self.resolution and self.resolution[0] != self.resolution[1]:
            raise DataError(f"the built-in scene is square; data.resolution={list(self.resolution)} must have H == W.")
        return {"resolution": res, **self.builtin}

    def resolved_format(self) -> str:
        """The scene's format: the built-in scene is nerf_synthetic; 'auto' is detected from the marker file."""
        if not self.path:
            return "nerf_synthetic"
        return detect_format(self.scene_dir()) if self.format == "auto" else self.format

    def _load_raw(self, split: str) -> Frames:
        """A split as read (input coordinates), resampled to data.resolution."""
        if split not in self._raw:
            frames = load_frames(self.scene_dir(), split, self.resolved_format(), self.background_color,
                                 self.mask_tolerance, options={"images": self.sfm})
            if split == "train" and len(frames) < self.min_views:
                raise DataError(
                    f"the train split of {self.scene_dir()} has {len(frames)} frame(s), fewer than data.min_views="
                    f"{self.min_views}: too few views to reconstruct a shape. Add views, or lower data.min_views."
                )
            if self.resolution is not None:
                frames = frames.resized(self.resolution)
            self._raw[split] = frames
        return self._raw[split]

    @property
    def normalization(self) -> Normalization:
        """The similarity from the input's coordinates to the frames' (identity with normalize=none)."""
        if self._normalization is None:
            mode = self.normalize or NORMALIZE_DEFAULT.get(self.resolved_format(), "auto")
            if mode == "none":
                self._normalization = Normalization()
            else:
                self._normalization = fit_normalization(self._load_raw("train"), self.grid_scale, self.grid_center,
                                                        self.normalize_margin)
                n = self._normalization
                log.info("data.normalize=auto (%s): scale %.4g, translation %s; object box %s .. %s", n.method, n.scale,
                         [round(t, 4) for t in n.translation], [round(x, 3) for x in n.bbox_min],
                         [round(x, 3) for x in n.bbox_max])
        return self._normalization

    def load_split(self, split: str) -> Frames:
        """A split in normalized coordinates (see ``normalization``), resampled to data.resolution."""
        if split not in self.frames:
            frames, n = self._load_raw(split), self.normalization
            if not n.is_identity:
                frames = frames.transformed(n.scale, torch.tensor(n.translation))
            self.frames[split] = frames
        return self.frames[split]

    def prepare_data(self) -> None:
        self.scene_dir()  # generate the built-in scene once, before the processes fork

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.load_split("train")
            self.load_split("val")
        if stage in (None, "test", "validate"):
            self.load_split("val")

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        n = len(self.load_split(split))
        dataset = _SplitIndices(split, n) if self.resident else FrameDataset(self.load_split(split))
        if shuffle:  # training: this rank's slice of one global batch per step, the same for any number of ranks
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = GlobalBatchSampler(SharedPermutation(n, run_seed()), batch_size, rank, world)
            step = getattr(self.trainer, "global_step", 0) if self.trainer is not None else 0
            if step > 0:  # resumed from a checkpoint (Lightning restores the step before asking for loaders)
                sampler.resume_at(step)
            batches = {"batch_sampler": sampler}
        else:  # validation: every rank evaluates every view
            batches = {"batch_size": batch_size}
        if self.resident:  # batches of indices; on_after_batch_transfer gathers the frames on the device
            return DataLoader(dataset, **batches)
        return DataLoader(dataset, **batches, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", 1, shuffle=False)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if torch.is_tensor(batch.get("index")):  # the views' indices as host ints, read here without a device sync
            batch["views"] = batch["index"].tolist()
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "split" not in batch:
            return batch
        split, index = batch["split"][0], batch["index"]
        key = (split, str(index.device))
        if key not in self._on_device:
            ds = FrameDataset(self.load_split(split))
            self._on_device[key] = {"img": ds.frames.images.to(index.device), "mvp": ds.mvp.to(index.device),
                                    "cam_pos": ds.cam_pos.to(index.device)}
            if ds.frames.depth is not None:
                self._on_device[key]["depth"] = ds.frames.depth[..., None].to(index.device)
        data = self._on_device[key]
        out = {k: v.index_select(0, index) for k, v in data.items()}
        return {**out, "index": index, **({"views": batch["views"]} if "views" in batch else {})}


class _SplitIndices(torch.utils.data.Dataset):
    """Frame indices of one split, tagged with the split's name."""

    def __init__(self, split: str, n: int):
        self.split, self.n = split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"split": self.split, "index": i}
