"""Typed schemas of every config group: YAML fills them, so a misspelt key fails when the config is composed."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class BuiltinSceneConfig:
    n_train: int = 100       # training views on a Fibonacci sphere around the object
    n_val: int = 4
    n_test: int = 16


@dataclass
class SfmConfig:
    """Structure-from-motion of unposed photos (data.format=images)."""
    min_registered: float = 0.8           # fraction of the photos SfM must register (and at least 3), else an error
    matcher: str = "exhaustive"           # exhaustive | sequential (video frames, matched with neighbours in name order)
    camera_model: str = "SIMPLE_RADIAL"   # COLMAP camera model estimated (distortion is then removed)
    single_camera: bool = True            # one camera (intrinsics) shared by all photos
    use_masks: bool = True                # extract features only on the object (masks/, alpha or background_color)
    max_image_size: int = 1600            # photos are downscaled to this longest side for feature extraction
    cache_dir: Optional[str] = None       # null = $RECON_CACHE/sfm (default ~/.cache/recon/sfm)


@dataclass
class DataConfig:
    _target_: str = "recon.data.datamodule.NeRFDataModule"
    path: Optional[str] = None            # scene directory; null = the built-in scene
    format: str = "auto"                  # auto | nerf_synthetic | nerfstudio | llff | colmap | views | images
    resolution: Any = 800                 # int or [H, W]; frames are resampled to it
    batch_size: int = 8                   # views per training step
    background_color: Optional[List[float]] = None  # sRGB backdrop of RGB-only images (mask from colour)
    mask_tolerance: float = 0.02
    num_workers: int = 0
    resident: bool = True                 # keep frames on the training device (no per-step host copies)
    builtin: BuiltinSceneConfig = field(default_factory=BuiltinSceneConfig)
    sfm: SfmConfig = field(default_factory=SfmConfig)
    normalize: Optional[str] = None       # auto | none | null = per format (none: nerf_synthetic, built-in; else auto)
    normalize_margin: float = 0.1         # normalize=auto: fraction of the grid's half edge left free around the object
    grid_scale: float = 2.1               # tet-grid cube edge to fit the object into (yamls: ${model.geometry.scale})
    grid_center: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # (yamls: ${model.geometry.center})
    min_views: int = 3                    # fewest training frames accepted


@dataclass
class GeometryConfig:
    tet_grid: int = 128                   # cells per cube side; the tet grid is generated in code
    scale: float = 2.1                    # grid cube edge length, scene units
    center: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    deform_scale: float = 0.5             # max vertex offset, in cell edges
    sdf_init: str = "sphere"              # 'sphere' or 'random'
    init_radius: float = 0.6              # initial sphere radius, fraction of the half edge


@dataclass
class HashGridConfig:
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 4096


@dataclass
class MaterialConfig:
    n_neurons: int = 32
    n_hidden_layers: int = 2
    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    backend: str = "auto"                 # hash-grid backend: auto | torch | tcnn


@dataclass
class RenderConfig:
    backend: str = "auto"                 # auto | torch | nvdiffrast


@dataclass
class LossConfig:
    background: str = "random"            # training background: random | white | black
    alpha_weight: float = 1.0
    sdf_weight: float = 0.2               # SDF sign-change regulariser, decays linearly ...
    sdf_weight_final: float = 0.01        # ... to this value ...
    sdf_decay_fraction: float = 0.25      # ... over this fraction of the steps


@dataclass
class OptimConfig:
    lr_geometry: float = 0.03
    lr_material: float = 0.01
    warmup_steps: int = 0
    lr_final_factor: float = 0.1          # lr multiplier reached at max_steps (exponential decay)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class ModelConfig:
    _target_: str = "recon.system.ReconSystem"
    _convert_: str = "all"
    max_steps: int = 5000
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    material: MaterialConfig = field(default_factory=MaterialConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainConfig:
    name: str = "recon"
    seed: int = 0
    ckpt_path: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (``train.yaml`` extends ``train_schema``)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
