"""glTF 2.0 binary (.glb) export of a textured mesh with a PBR metallic-roughness material, written atomically."""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from recon.export.obj import atomic_write_bytes, encode_textures, image_tensor, texture_pixels
from recon.geometry.mesh import Mesh, compute_tangents, tangent_handedness, vertex_normals

# glTF 2.0 enums (spec section 5: accessor.componentType, bufferView.target, sampler filters and wraps).
FLOAT, UNSIGNED_INT = 5126, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
LINEAR, LINEAR_MIPMAP_LINEAR, REPEAT = 9729, 9987, 10497
TRIANGLES = 4

GLB_MAGIC, GLB_VERSION = 0x46546C67, 2  # b"glTF"
CHUNK_JSON, CHUNK_BIN = 0x4E4F534A, 0x004E4942  # b"JSON", b"BIN\0"


def split_uv_seams(mesh: Mesh) -> tuple[Tensor, Tensor, Tensor]:
    """One vertex per distinct (position index, uv index) corner, as glTF has a single index buffer.

    Returns ``pos_index [Nc]`` (into ``mesh.verts``/``mesh.normals``), ``uv_index [Nc]`` (into ``mesh.uv``)
    and ``faces [Nf,3] int64`` indexing the Nc split vertices.
    """
    faces = mesh.faces.detach().cpu().long()
    uv_faces = faces if mesh.uv_faces is None else mesh.uv_faces.detach().cpu().long()
    # one int64 key per corner, ordered as the (position, uv) pairs: a flat unique instead of torch.unique(dim=0),
    # the same result, 0.59 s -> 0.01 s for 100k faces on a CPU
    n_uv = int(uv_faces.max()) + 1 if uv_faces.numel() else 1
    keys, inverse = torch.unique(faces.reshape(-1) * n_uv + uv_faces.reshape(-1), return_inverse=True)
    return keys // n_uv, keys % n_uv, inverse.reshape(-1, 3)


def gltf_tangents(pos: Tensor, faces: Tensor, uv: Tensor, normals: Tensor) -> Tensor:
    """glTF TANGENT ``[Nc,4]`` of a mesh with one uv per vertex: xyz along increasing u, w = +-1.

    glTF's bitangent is ``cross(normal, tangent.xyz) * w`` and its normal maps have +Y up the image, i.e.
    towards decreasing v (v runs down the rows); w picks the sign that makes the bitangent point that way.
    """
    tangents = compute_tangents(pos, faces, uv, None, normals)
    # Vertices only on zero-area UV triangles get no tangent: any unit vector orthogonal to the normal will do.
    axis = torch.where(normals[:, :1].abs() < 0.9, normals.new_tensor([1.0, 0.0, 0.0]), normals.new_tensor([0.0, 1.0, 0.0]))
    fallback = torch.nn.functional.normalize(torch.linalg.cross(normals, axis, dim=-1), dim=-1)
    tangents = torch.where(tangents.norm(dim=-1, keepdim=True) > 0.5, tangents, fallback)
    w = tangent_handedness(pos, faces, uv, None, normals, tangents)
    return torch.cat([tangents, w], dim=-1)


def _image(image: Tensor, name: str) -> Tensor:
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"write_glb: {name} must be [H,W,3] (got {tuple(image.shape)}).")
    return image.detach().float().cpu()


class _BinBuilder:
    """Accumulates bufferViews in the BIN chunk, each starting on a 4-byte boundary."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[dict] = []

    def add(self, payload: bytes, target: int | None = None) -> int:
        self.data += b"\0" * (-len(self.data) % 4)
        view = {"buffer": 0, "byteOffset": len(self.data), "byteLength": len(payload)}
        if target is not None:
            view["target"] = target  # tightly packed, one accessor per view: no byteStride needed
        self.data += payload
        self.views.append(view)
        return len(self.views) - 1


def glb_bytes(
    mesh: Mesh,
    kd_linear: Tensor,
    orm_linear: Tensor | None = None,
    normal_ts: Tensor | None = None,
    pngs: Mapping[str, bytes] | None = None,
) -> bytes:
    """The bytes of a .glb file: see :func:`write_glb`."""
    if mesh.uv is None:
        raise ValueError("write_glb needs texture coordinates: this mesh has uv=None (UV-unwrap it first, "
                         "recon.export.uv_bake.unwrap).")
    if mesh.faces.shape[0] == 0:
        raise ValueError("write_glb: the mesh has no faces.")
    mesh = mesh.detach().to("cpu")
    normals = mesh.normals if mesh.normals is not None else vertex_normals(mesh.verts.float(), mesh.faces)
    pos_index, uv_index, faces = split_uv_seams(mesh)

    pos = mesh.verts[pos_index].to(torch.float64).numpy().astype(np.float32)
    nrm = normals[pos_index].to(torch.float64)
    nrm = nrm / nrm.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # the validator wants unit length in float32
    nrm = nrm.numpy().astype(np.float32)
    uv = mesh.uv[uv_index].to(torch.float64).numpy().astype(np.float32)  # recon's v goes down the rows, as glTF's
    idx = faces.numpy().astype(np.uint32).reshape(-1)
    attributes = {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}

    bin_ = _BinBuilder()
    accessors = [
        {"bufferView": bin_.add(pos.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(pos),
         "type": "VEC3", "min": pos.min(0).tolist(), "max": pos.max(0).tolist()},
        {"bufferView": bin_.add(nrm.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(nrm), "type": "VEC3"},
        {"bufferView": bin_.add(uv.tobytes(), ARRAY_BUFFER), "componentType": FLOAT, "count": len(uv), "type": "VEC2"},
        {"bufferView": bin_.add(idx.tobytes(), ELEMENT_ARRAY_BUFFER), "componentType": UNSIGNED_INT,
         "count": len(idx), "type": "SCALAR"},
    ]
    if normal_ts is not None:  # a normal map needs a tangent space; ship it rather than leave it to the viewer
        tan = gltf_tangents(torch.from_numpy(pos).double(), faces, torch.from_numpy(uv).double(), torch.from_numpy(nrm).double())
        tan = tan.numpy().astype(np.float32)
        accessors.append({"bufferView": bin_.add(tan.tobytes(), ARRAY_BUFFER), "componentType": FLOAT,
                          "count": len(tan), "type": "VEC4"})
        attributes["TANGENT"] = len(accessors) - 1

    pixels = texture_pixels(_image(kd_linear, "kd_linear"),
                            orm=None if orm_linear is None else _image(orm_linear, "orm_linear"),
                            normal_ts=None if normal_ts is None else _image(normal_ts, "normal_ts"))
    # texture i uses image i, in the order of pixels; the PNGs are encoded together, in threads
    images = [{"bufferView": bin_.add(data), "mimeType": "image/png", "name": name}
              for name, data in encode_textures(pixels, pngs).items()]
    index = {name: i for i, name in enumerate(pixels)}

    pbr: dict = {"baseColorTexture": {"index": index["kd"]}}
    material: dict = {"name": "recon_material", "pbrMetallicRoughness": pbr}
    if orm_linear is not None:
        # glTF reads occlusion from R, roughness from G, metallic from B: recon's ORM order, one image for both.
        pbr["metallicRoughnessTexture"] = {"index": index["orm"]}
        material["occlusionTexture"] = {"index": index["orm"]}
    else:
        pbr["metallicFactor"] = 0.0  # a baked albedo without ORM: dielectric, fully rough (the default)
    if normal_ts is not None:
        material["normalTexture"] = {"index": index["normal"]}

    gltf = {
        "asset": {"version": "2.0", "generator": "recon"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "recon_mesh"}],
        "meshes": [{"name": "recon_mesh", "primitives": [{
            "attributes": attributes,
            "indices": 3, "material": 0, "mode": TRIANGLES,
        }]}],
        "materials": [material],
        "textures": [{"sampler": 0, "source": i} for i in range(len(images))],
        "samplers": [{"magFilter": LINEAR, "minFilter": LINEAR_MIPMAP_LINEAR, "wrapS": REPEAT, "wrapT": REPEAT}],
        "images": images,
        "accessors": accessors,
        "bufferViews": bin_.views,
        "buffers": [{"byteLength": 0}],
    }
    bin_data = bytes(bin_.data) + b"\0" * (-len(bin_.data) % 4)  # BIN chunk padded with zeros
    gltf["buffers"][0]["byteLength"] = len(bin_data)
    json_data = json.dumps(gltf, separators=(",", ":")).encode()
    json_data += b" " * (-len(json_data) % 4)  # JSON chunk padded with spaces
    total = 12 + 8 + len(json_data) + 8 + len(bin_data)
    return b"".join([
        struct.pack("<III", GLB_MAGIC, GLB_VERSION, total),
        struct.pack("<II", len(json_data), CHUNK_JSON), json_data,
        struct.pack("<II", len(bin_data), CHUNK_BIN), bin_data,
    ])


def write_glb(
    path: str | Path,
    mesh: Mesh,
    kd_linear: Tensor,
    orm_linear: Tensor | None = None,
    normal_ts: Tensor | None = None,
    pngs: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``mesh`` as a glTF 2.0 binary: one mesh, one primitive, one PBR metallic-roughness material.

    mesh: needs ``uv``/``uv_faces`` (recon's convention, v down the texture rows, which is glTF's: UVs are
    written unchanged); vertices are split at UV seams. Normals are computed when ``mesh.normals`` is None.
    kd_linear: [H,W,3] albedo, linear RGB in [0,1], stored as an sRGB PNG (baseColorTexture).
    orm_linear: [H,W,3] occlusion, roughness, metallic in [0,1], stored linearly as one PNG used as both
    metallicRoughnessTexture and occlusionTexture. Without it the material is dielectric (metallicFactor 0).
    normal_ts: [H,W,3] tangent-space unit normals in [-1,1], stored as (n + 1) / 2 (normalTexture): x along
    increasing u, y up the image (decreasing v), z out of the surface; TANGENT is then written (see gltf_tangents).
    pngs: PNG bytes already encoded for "kd", "orm" or "normal" (`recon.export.obj.encode_textures`), used instead
    of encoding them. The file is written atomically. Returns ``path``.
    """
    path = Path(path)
    atomic_write_bytes(path, glb_bytes(mesh, kd_linear, orm_linear, normal_ts, pngs))
    return path


def load_glb(path: str | Path, device: str | torch.device = "cpu") -> tuple[Mesh, dict[str, Tensor]]:
    """Read a .glb as `write_glb` writes it (and as other glTF PBR exporters do), through trimesh.

    Returns the mesh (positions as stored, split at UV seams; ``uv`` in recon's convention, v down the rows) and the
    material as recon's maps: ``kd`` [1,H,W,3] linear albedo, and when the file has them ``ks`` [1,H,W,3] =
    (1 - glTF occlusion, roughness, metallic) and ``nrm`` [1,H,W,3] tangent-space normals in [-1,1].
    """
    import trimesh

    from recon.color import srgb_to_linear

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no exported GLB (did the fit finish?).")
    try:
        tm = trimesh.load(path, force="mesh", process=False)
    except Exception as e:  # trimesh raises several kinds on a truncated or foreign file
        raise ValueError(f"{path} is not a readable glTF binary ({type(e).__name__}: {e}); export it again.") from e
    if len(tm.faces) == 0:
        raise ValueError(f"{path} has no faces: nothing to evaluate.")
    visual = tm.visual
    material = getattr(visual, "material", None)
    if not isinstance(visual, trimesh.visual.TextureVisuals) or visual.uv is None or material is None:
        raise ValueError(f"{path} has no texture coordinates or material: not a textured recon export.")

    def image(name: str) -> Tensor | None:
        img = getattr(material, name, None)
        return None if img is None else image_tensor(img, device)

    kd = image("baseColorTexture")
    if kd is None:
        raise ValueError(f"{path} has no baseColorTexture: the export is incomplete.")
    maps = {"kd": srgb_to_linear(kd).contiguous()}
    mr = image("metallicRoughnessTexture")
    if mr is not None:  # glTF: roughness in G, metallic in B; occlusion (1 = unoccluded) in R of its own texture
        occ = image("occlusionTexture")
        occlusion = 1 - occ[..., 0:1] if occ is not None else torch.zeros_like(mr[..., 0:1])
        maps["ks"] = torch.cat([occlusion, mr[..., 1:3]], -1).contiguous()
    nrm = image("normalTexture")
    if nrm is not None:
        maps["nrm"] = (nrm * 2 - 1).contiguous()
    uv = np.asarray(visual.uv, dtype=np.float32).copy()
    uv[:, 1] = 1.0 - uv[:, 1]  # trimesh turns glTF's v (down the rows) into v up; recon's convention is glTF's
    faces = torch.as_tensor(np.asarray(tm.faces), dtype=torch.int64, device=device)
    mesh = Mesh(verts=torch.as_tensor(np.asarray(tm.vertices), dtype=torch.float32, device=device), faces=faces,
                uv=torch.as_tensor(uv, device=device), uv_faces=faces)
    return mesh, maps
