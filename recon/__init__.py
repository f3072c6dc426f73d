"""recon: multi-view images to a textured, relightable triangle mesh by differentiable rendering."""

__version__ = "0.1.0"
