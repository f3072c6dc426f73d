"""Neural volumetric material: hash-grid encoding + small MLP, as in nvdiffrec's `MLPTexture3D`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from recon.compiled import fused
from recon.materials.hash_grid import HashGridEncoding
from recon.optional import optional_module


@fused
def _decode(net: nn.Module, features: Tensor, min_max: Tensor) -> Tensor:
    """The MLP and its squashing into [min, max] per channel (one fused function, see `recon.compiled`)."""
    return _squash(net(features), min_max)


@fused
def _squash(y: Tensor, min_max: Tensor) -> Tensor:
    return torch.sigmoid(y) * (min_max[1] - min_max[0]) + min_max[0]


def _interpreting() -> bool:
    """Whether Triton runs its interpreter in this process (TRITON_INTERPRET=1; tests run the kernels on CPU)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


class MLPTexture3D(nn.Module):
    """A material field over a box: world-space points -> `channels` values in [min, max].

    aabb: [2,3] min and max corners of the box, world space (a buffer: follows `.to()`).
    min_max: [2,C] lower and upper bound of each channel; default 0 and 1.
    The network maps hash-grid features through `n_hidden_layers` ReLU layers of `n_neurons`
    and a linear output layer to C values, then out = sigmoid(y) * (max - min) + min.
    Like nvdiffrec, the linear layers have no bias (tiny-cuda-nn's fused MLPs have none) and are
    initialised with Kaiming-uniform weights for ReLU.
    encoding: keyword arguments of `HashGridEncoding` (default: nvdiffrec's 16 levels x 2
    features, 2^19 entries, resolution 16..4096). nvdiffrec scales the encoder's gradient by 128
    ({"grad_scale": 128.0}); the default here is 1.
    backend: `HashGridEncoding` backend unless `encoding` names one.
    fused_mlp: on CUDA, run the network as one Triton kernel forward and one backward (`mlp_triton`) when its
    shape allows (two hidden layers, widths 16-64); False keeps torch's layers.
    """

    def __init__(
        self,
        aabb: Tensor,
        channels: int = 3,
        min_max: Tensor | None = None,
        n_neurons: int = 32,
        n_hidden_layers: int = 2,
        encoding: dict | None = None,
        backend: str = "auto",
        fused_mlp: bool = True,
    ):
        super().__init__()
        self.channels = channels
        self.fused_mlp = bool(fused_mlp)
        self.register_buffer("aabb", torch.empty(2, 3))
        self.set_aabb(aabb)
        if min_max is None:
            min_max = torch.stack([torch.zeros(channels), torch.ones(channels)])
        min_max = torch.as_tensor(min_max, dtype=torch.float32)
        if min_max.shape != (2, channels):
            raise ValueError(f"min_max must have shape [2, {channels}], got {list(min_max.shape)}.")
        self.register_buffer("min_max", min_max.clone())

        encoding_kwargs = {"backend": backend, **(encoding or {})}
        self.encoder = HashGridEncoding(n_input_dims=3, **encoding_kwargs)

        layers: list[nn.Module] = []
        width = self.encoder.n_output_dims
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, n_neurons, bias=False), nn.ReLU()]
            width = n_neurons
        layers.append(nn.Linear(width, channels, bias=False))
        self.net = nn.Sequential(*layers)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")

    def set_aabb(self, aabb: Tensor) -> None:
        """Replace the box: aabb [2,3] min and max corners, world space."""
        aabb = torch.as_tensor(aabb, dtype=self.aabb.dtype, device=self.aabb.device)
        if aabb.shape != (2, 3):
            raise ValueError(f"aabb must have shape [2, 3] (min and max corner), got {list(aabb.shape)}.")
        if not bool((aabb[1] > aabb[0]).all()):
            raise ValueError(f"aabb max corner must exceed the min corner on every axis, got {aabb.tolist()}")
        self.aabb.copy_(aabb)

    def sample(self, points: Tensor, row_mask: Tensor | None = None) -> Tensor:
        """Evaluate the field at world-space points.

        points: [..., 3] world space; points outside the aabb take the value at the nearest point
        of the box. Returns [..., channels] in the encoder's dtype (float32 by default), each
        channel within [min_max[0], min_max[1]]. row_mask: [...] bool, the points that matter (None: all): the
        others are encoded as zero features (`HashGridEncoding`'s row_mask) and their values are the network's at
        zero; no gradient reaches the table from them.
        """
        if points.shape[-1] != 3:
            raise ValueError(f"points must have shape [..., 3], got {list(points.shape)}.")
        lead = points.shape[:-1]
        p = points.reshape(-1, 3).to(self.aabb.dtype)
        unit = ((p - self.aabb[0]) / (self.aabb[1] - self.aabb[0])).clamp(0.0, 1.0)
        features = self.encoder(unit, None if row_mask is None else row_mask.reshape(-1)).to(self.net[0].weight.dtype)
        fused_mlp = optional_module("recon.materials.mlp_triton") if self.fused_mlp and (features.is_cuda or _interpreting()) else None
        weights = [layer.weight for layer in self.net if isinstance(layer, nn.Linear)]
        if fused_mlp is not None and fused_mlp.supports(features, weights):
            out = _squash(fused_mlp.fused_mlp(features, *weights), self.min_max)
        else:
            out = _decode(self.net, features, self.min_max)
        return out.reshape(*lead, self.channels)

    def forward(self, points: Tensor) -> Tensor:
        """Same as `sample`."""
        return self.sample(points)
