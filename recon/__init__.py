"""recon: multi-view images to a textured, relightable triangle mesh by differentiable rendering.

``recon.reconstruct(source, out_dir, overrides, on_progress, cancel) -> recon.ReconResult`` runs one fit from Python
(see ``recon.api``); it is imported on first use, so ``import recon`` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["ReconResult", "reconstruct", "__version__"]


def __getattr__(name: str):
    if name in ("reconstruct", "ReconResult"):
        from recon import api

        return getattr(api, name)
    raise AttributeError(f"module 'recon' has no attribute {name!r}")
