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
    shading: str = "baked"   # baked (procedural albedo, baked Lambertian light) | pbr (known materials and light)
    light: str = "sky"       # the pbr variant's light: sky | sunset


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
    lattice_kernel: bool = True           # CUDA: marching tets' topology as two Triton kernels on the lattice


@dataclass
class HashGridConfig:
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    max_resolution: int = 4096
    triton_layout: Optional[str] = None   # Triton kernel launch layout: levels | points | FORWARD/BACKWARD; null: levels
    run_levels: Optional[int] = None      # Triton backward: coarsest levels adding once per run of points; null: all


@dataclass
class MaterialConfig:
    n_neurons: int = 32
    n_hidden_layers: int = 2
    encoding: HashGridConfig = field(default_factory=HashGridConfig)
    backend: str = "auto"                 # hash-grid backend: auto | torch | tcnn | triton
    fused_mlp: bool = True                # CUDA: the MLP as one Triton kernel each way (2 hidden layers, width 16-64)
    # bounds of the nine channels: albedo kd, ks = (occlusion, roughness, metallic), tangent-space normal
    kd_min: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    kd_max: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    ks_min: List[float] = field(default_factory=lambda: [0.0, 0.08, 0.0])
    ks_max: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    nrm_min: List[float] = field(default_factory=lambda: [-1.0, -1.0, 0.0])
    nrm_max: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    perturb_normal: bool = True           # learn a normal perturbation (normal map)
    smoothness_jitter: float = 0.01       # offset (scene units) of the albedo-smoothness regulariser
    smoothness_fraction: float = 1.0      # share of the points it jitters (nvdiffrec: 1); below 1 a systematic sample
    position_grad: bool = True            # material gradients reach the surface points (nvdiffrec); false: detached


@dataclass
class LightConfig:
    base_res: int = 512                   # cube-map face size of the learnable HDR light
    min_res: int = 16                     # coarsest specular mip
    min_roughness: float = 0.08
    max_roughness: float = 0.5
    init: str = "constant"                # constant | random | path of a lat-long .hdr probe (e.g. a measured light)
    init_value: float = 0.5
    trainable: bool = True                # false: keep the light as initialised (a known probe; nvdiffrec's lock_light)
    prefilter_samples: int = 32           # GGX samples per texel of each prefiltered level (at least)
    diffuse_res: int = 16                 # irradiance cube size


@dataclass
class RenderConfig:
    backend: str = "auto"                 # auto | torch | nvdiffrast
    compile: str = "off"                  # torch.compile the shading and losses: off | auto (CUDA) | on
    fused_shading: bool = True            # CUDA: the per-pixel shading as Triton kernels (recon/render/shading_triton.py)
    cuda_graphs: bool = True              # CUDA training: light mips, pass 2's mesh, both passes' shading as graphs (recon/cuda_graphs.py)
    graph_shading: bool = True            # pass 2's shading after the rasterization as one CUDA graph (with cuda_graphs)
    graph_shading_pass1: bool = True      # pass 1's material and shading as one CUDA graph (with cuda_graphs)
    graph_skip_padding: bool = True       # pass 1's graph: the hash grid skips the padding rows (row_mask)
    graph_margin: float = 0.15            # graphed shading (both passes): rows above the most covered pixels seen (recon/render/graphed.py)
    cube_stride: int = 0                  # CUDA: light cube-map lookups with neighbouring threads this many pixels apart (0: in order)
    cube_kernel: str = "triton"           # CUDA: the light's cube-map lookups: triton (recon/render/cube_triton.py) | nvdiffrast


@dataclass
class LossConfig:
    background: str = "random"            # training background: random | white | black
    alpha_weight: float = 1.0
    sdf_weight: float = 0.2               # SDF sign-change regulariser (pass 1), decays linearly ...
    sdf_weight_final: float = 0.01        # ... to this value ...
    sdf_decay_fraction: float = 0.25      # ... over this fraction of pass 1
    normal_consistency_weight: float = 0.0  # pass 1: 1 - cos between normals of adjacent DMTet faces (smooth surface)
    normal_consistency_start: float = 0.0   # ... from this fraction of pass 1 on (the shape forms first)
    kd_smooth_weight: float = 0.03        # albedo smoothness (pass 1)
    occlusion_weight: float = 0.001       # pushes the occlusion channel to 0
    light_white_weight: float = 0.005     # penalises coloured light
    reg_ramp_steps: int = 500             # the two material regularisers ramp in over this many steps of a pass
    laplace_scale: float = 3000.0         # relative Laplacian of pass 2, fading to 0 over the pass
    depth_weight: float = 0.0             # L1 depth loss where reference depth is given
    fused_kernel: bool = True             # CUDA: colour and alpha losses as one Triton kernel each way


@dataclass
class OptimConfig:
    lr_geometry: float = 0.03             # pass 1: SDF and grid deformation
    lr_material: float = 0.01             # pass 1: hash grid and MLP
    lr_light: float = 0.01                # both passes
    lr_position: float = 0.001            # pass 2: vertex offsets
    lr_texture: float = 0.01              # pass 2: the 9-channel texture
    warmup_steps: int = 0
    lr_final_factor: float = 0.1          # lr multiplier reached at the end of each pass (exponential decay)
    lr_geometry_final_factor: Optional[float] = None  # pass 1's geometry group's own final factor (null: lr_final_factor)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    skip_nonfinite: bool = False          # drop steps with a non-finite loss or gradient instead of stopping
    nonfinite_check_every: Optional[int] = None  # steps between host reads of that check (null: 1 on CPU, 50 on GPU)


@dataclass
class BakeConfig:
    texture_res: int = 2048               # side of the baked textures (pass 2 and export)
    max_faces: int = 100000               # quadric decimation before UV unwrapping (0 keeps all)
    unwrap_chunk_faces: int = 1500        # xatlas charts pieces of this many faces in parallel (0: the whole mesh)
    unwrap_chart_iterations: int = 0      # xatlas's chart re-seeding rounds (ChartOptions.max_iterations; 1: xatlas's default)
    unwrap_pack_resolution: int = 1024    # xatlas packs the charts on this grid when smaller than texture_res (0: texture_res)
    cull_invisible: bool = True           # drop faces no training view sees (interior DMTet surfaces)


@dataclass
class ModelConfig:
    _target_: str = "recon.system.ReconSystem"
    _convert_: str = "all"
    pass1_steps: int = 5000               # DMTet + neural material + light
    pass2_steps: int = 5000               # fixed mesh + textures + light (0: pass 1 only)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    material: MaterialConfig = field(default_factory=MaterialConfig)
    light: LightConfig = field(default_factory=LightConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    bake: BakeConfig = field(default_factory=BakeConfig)


@dataclass
class TrainConfig:
    name: str = "recon"
    seed: int = 0
    ckpt_path: Optional[str] = None
    check_resources: bool = True          # refuse a fit whose estimated peak memory exceeds the free memory (recon.resources)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)
    callbacks: Dict[str, Any] = field(default_factory=dict)
    logger: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (``train.yaml`` extends ``train_schema``)."""
    from omegaconf import OmegaConf

    # trainer.max_steps = model.pass1_steps + model.pass2_steps, written ${add:...} in conf/trainer/default.yaml
    OmegaConf.register_new_resolver("add", lambda *xs: sum(xs), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


def write_run_config(cfg, out_dir) -> None:
    """Write ``config_resolved.yaml`` (every interpolation resolved) and the recon version into the run directory."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import recon
    from recon.export.obj import atomic_write_bytes

    text = f"# recon {recon.__version__}\n" + OmegaConf.to_yaml(cfg, resolve=True)
    atomic_write_bytes(Path(out_dir) / "config_resolved.yaml", text.encode())
