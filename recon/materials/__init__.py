"""Materials: multi-resolution hash encoding and the neural (MLP) material field."""
from recon.materials.hash_grid import HashGridEncoding, tcnn_available
from recon.materials.mlp_texture import MLPTexture3D

__all__ = ["HashGridEncoding", "MLPTexture3D", "tcnn_available"]
