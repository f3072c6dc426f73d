"""A triangle mesh with fixed topology and learnable vertex positions (nvdiffrec's pass 2, ``DLMesh``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from recon.cuda_graphs import GraphCache
from recon.geometry.mesh import Mesh, laplacian_loss, laplacian_uniform, normals_and_tangents, unit_face_normals
from recon.sparse import SparseOperator


class FixedTopologyMesh(nn.Module):
    """Vertex positions = initial positions + a learnable offset; faces and UVs never change.

    mesh: the starting mesh (needs ``uv``/``uv_faces`` for texturing). Every tensor is a buffer (checkpoints
    hold them, so a run resumed in this pass rebuilds the same mesh) and ``offset [Nv,3]`` is the parameter.
    """

    def __init__(self, mesh: Mesh):
        super().__init__()
        if mesh.uv is None or mesh.uv_faces is None:
            raise ValueError("FixedTopologyMesh needs a UV-unwrapped mesh (uv and uv_faces).")
        self.register_buffer("initial_verts", mesh.verts.detach().float().clone())
        self.register_buffer("faces", mesh.faces.detach().long().clone())
        self.register_buffer("uv", mesh.uv.detach().float().clone())
        self.register_buffer("uv_faces", mesh.uv_faces.detach().long().clone())
        self.offset = nn.Parameter(torch.zeros_like(self.initial_verts))
        self._laplacian: SparseOperator | None = None  # built on first use, on the faces' device (fixed topology)
        self._graphs = GraphCache()  # CUDA graphs of forward and the Laplacian term (fixed shapes: recon.cuda_graphs)

    @classmethod
    def empty_like(cls, state: dict[str, Tensor], prefix: str = "") -> FixedTopologyMesh:
        """A module shaped like the one whose ``state_dict`` is ``state`` (keys under ``prefix``), for loading."""
        mesh = Mesh(verts=state[prefix + "initial_verts"], faces=state[prefix + "faces"],
                    uv=state[prefix + "uv"], uv_faces=state[prefix + "uv_faces"])
        return cls(mesh)

    @property
    def verts(self) -> Tensor:
        return self.initial_verts + self.offset

    def forward(self) -> Mesh:
        """The current mesh with area-weighted normals, UV tangents and their handedness (differentiable; while
        training on CUDA through CUDA graphs)."""
        verts, normals, tangents, sign, unit_faces = self._graphs.call(
            "mesh", _vertex_frames, self.offset, self.initial_verts, self.faces, self.uv, self.uv_faces)
        return Mesh(verts=verts, faces=self.faces, normals=normals, uv=self.uv, uv_faces=self.uv_faces,
                    tangents=tangents, handedness=sign, face_normals=unit_faces)

    def laplacian_regularizer(self) -> Tensor:
        """nvdiffrec's relative Laplacian term: mean squared Laplacian of the offset (penalises local shape change)."""
        lap = self._laplacian
        if lap is None or lap.device != self.faces.device or lap.dtype != self.initial_verts.dtype:
            lap = laplacian_uniform(self.initial_verts.shape[0], self.faces, dtype=self.initial_verts.dtype)
            lap = self._laplacian = SparseOperator.from_sparse(lap)

        def term(offset: Tensor, initial: Tensor, faces: Tensor) -> tuple[Tensor]:
            return (laplacian_loss(initial + offset, faces, initial, lap=lap),)

        return self._graphs.call("laplacian", term, self.offset, self.initial_verts, self.faces)[0]

    def extra_repr(self) -> str:
        return f"verts={self.initial_verts.shape[0]}, faces={self.faces.shape[0]}, uv={self.uv.shape[0]}"


def _vertex_frames(offset: Tensor, initial: Tensor, faces: Tensor, uv: Tensor, uv_faces: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Positions ``initial + offset``, their normals, tangents and handedness (`normals_and_tangents`) and the unit
    face normals."""
    verts = initial + offset
    return (verts, *normals_and_tangents(verts, faces, uv, uv_faces), unit_face_normals(verts, faces))
