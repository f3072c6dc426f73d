"""Environment lighting: learnable cube map with split-sum shading, and the GGX BSDF table it uses."""
from recon.light.bsdf import ggx_lut, lookup_lut
from recon.light.env_light import EnvironmentLight, cube_to_dir, dir_to_cube, sample_cube

__all__ = ["EnvironmentLight", "cube_to_dir", "dir_to_cube", "ggx_lut", "lookup_lut", "sample_cube"]
