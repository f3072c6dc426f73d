"""Wavefront OBJ/MTL export and import, written atomically."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from recon.color import linear_to_srgb, srgb_to_linear
from recon.geometry.mesh import Mesh
from recon.parallel import thread_map


def default_file_mode() -> int:
    """The permissions a new file gets from open() under the current umask (mkstemp would give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory atomically: yields a hidden temporary sibling, renamed to ``path`` when the block succeeds
    (if another process renamed its own copy there first, that one is kept), removed when the block fails. An
    interrupted build never leaves ``path`` half-filled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


# zlib level of the exported PNGs. 1, zlib's fastest (OpenCV's default too): a 2048^2 texture encodes in 0.4 s
# instead of 2.1 s at Pillow's default 6, for a file about 15% larger. 9 gives the smallest files, slowest.
PNG_LEVEL = 1


def check_png_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"PNG compression level must be an integer from 0 (none, fastest) to 9 (smallest files), "
                         f"got {level!r}; set callbacks.mesh_export.png_level.")
    return level


def png_bytes(image_uint8: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """PNG file bytes of an [H,W] or [H,W,C] uint8 image at zlib compression ``level`` (0-9)."""
    return iio.imwrite("<bytes>", image_uint8, extension=".png", compress_level=check_png_level(level))


def png_bytes_all(images: list[np.ndarray], level: int = PNG_LEVEL) -> list[bytes]:
    """`png_bytes` of each image, in order, encoded in threads (the encoder releases the GIL; a 2048^2 texture takes
    ~0.4 s at level 1)."""
    return thread_map(lambda image: png_bytes(image, level), images)


def texture_pixels(kd_linear: Tensor, ks: Tensor | None = None, orm: Tensor | None = None,
                   normal_ts: Tensor | None = None) -> dict[str, Callable[[], np.ndarray]]:
    """The 8-bit pixels of each texture given, as recon's files store them, made when called: ``kd`` sRGB, ``ks``
    and ``orm`` linear, ``normal`` as (n + 1) / 2; keyed by those names, in that order."""
    textures = {"kd": (texture_to_srgb8, kd_linear), "ks": (linear_to_8bit, ks), "orm": (linear_to_8bit, orm),
                "normal": (normal_to_8bit, normal_ts)}
    return {name: (lambda fn=fn, t=t: fn(t)) for name, (fn, t) in textures.items() if t is not None}


def encode_textures(pixels: Mapping[str, Callable[[], np.ndarray]],
                    pngs: Mapping[str, bytes] | None = None, level: int = PNG_LEVEL) -> dict[str, bytes]:
    """PNG bytes of each texture of ``pixels`` (`texture_pixels`), in its order: from ``pngs`` where it has them
    (encoded once for several files), else encoded at zlib ``level``, in threads."""
    pngs = pngs or {}
    todo = [name for name in pixels if name not in pngs]
    fresh = dict(zip(todo, png_bytes_all([pixels[name]() for name in todo], level)))
    return {name: pngs[name] if name in pngs else fresh[name] for name in pixels}


def texture_to_srgb8(texture_linear: Tensor) -> np.ndarray:
    """[H,W,3] linear RGB -> uint8 sRGB."""
    return (linear_to_srgb(texture_linear.clamp(0, 1)) * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def _write_rows(out: io.StringIO, rows: np.ndarray, fmt: str) -> None:
    """``np.savetxt(out, rows, fmt=fmt)``, the same text, formatted as one string (about 3x faster)."""
    if len(rows):
        out.write((fmt + "\n") * len(rows) % tuple(rows.ravel().tolist()))


def obj_text(mesh: Mesh, mtl_name: str | None = "mesh.mtl", material: str = "recon_material") -> str:
    """OBJ text of a mesh; UVs are written with v flipped (OBJ's v points up, texture rows go down)."""
    out = io.StringIO()
    out.write("# recon mesh\n")
    if mtl_name:
        out.write(f"mtllib {mtl_name}\n")
    v = mesh.verts.detach().cpu().numpy()
    _write_rows(out, v, "v %.6f %.6f %.6f")
    if mesh.normals is not None:
        _write_rows(out, mesh.normals.detach().cpu().numpy(), "vn %.6f %.6f %.6f")
    f = mesh.faces.detach().cpu().numpy() + 1
    if mesh.uv is not None:
        uv = mesh.uv.detach().cpu().numpy().copy()
        uv[:, 1] = 1.0 - uv[:, 1]
        _write_rows(out, uv, "vt %.6f %.6f")
        ft = (mesh.uv_faces if mesh.uv_faces is not None else mesh.faces).detach().cpu().numpy() + 1
        if mtl_name:
            out.write(f"usemtl {material}\n")
        if mesh.normals is not None:
            rows = np.stack([f[:, 0], ft[:, 0], f[:, 0], f[:, 1], ft[:, 1], f[:, 1], f[:, 2], ft[:, 2], f[:, 2]], 1)
            _write_rows(out, rows, "f %d/%d/%d %d/%d/%d %d/%d/%d")
        else:
            rows = np.stack([f[:, 0], ft[:, 0], f[:, 1], ft[:, 1], f[:, 2], ft[:, 2]], 1)
            _write_rows(out, rows, "f %d/%d %d/%d %d/%d")
    elif mesh.normals is not None:
        rows = np.stack([f[:, 0], f[:, 0], f[:, 1], f[:, 1], f[:, 2], f[:, 2]], 1)
        _write_rows(out, rows, "f %d//%d %d//%d %d//%d")
    else:
        _write_rows(out, f, "f %d %d %d")
    return out.getvalue()


def linear_to_8bit(image: Tensor) -> np.ndarray:
    """[H,W,C] values in [0,1] -> uint8 with no transfer curve (ORM and normal maps are stored linearly)."""
    return (image.detach().float().clamp(0, 1) * 255 + 0.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def normal_to_8bit(normal_ts: Tensor) -> np.ndarray:
    """[H,W,3] tangent-space normals in [-1,1] -> uint8 (n + 1) / 2, as OBJ and glTF normal maps store them."""
    return linear_to_8bit(normal_ts * 0.5 + 0.5)


def write_textured_obj(
    out_dir: str | Path,
    mesh: Mesh,
    kd_linear: Tensor,
    name: str = "mesh",
    ks: Tensor | None = None,
    normal_ts: Tensor | None = None,
    pngs: Mapping[str, bytes] | None = None,
) -> Path:
    """Write ``{name}.obj`` + ``{name}.mtl`` + ``texture_kd.png`` (sRGB) into ``out_dir``.

    ks: [H,W,3] (occlusion, roughness, metallic) -> ``texture_ks.png`` (linear, ``map_Ks``, nvdiffrec's layout).
    normal_ts: [H,W,3] tangent-space normals in [-1,1] -> ``texture_n.png`` stored as (n + 1) / 2 (``bump`` and
    ``norm``; x along increasing u, y up the image, z out of the surface).
    pngs: PNG bytes already encoded for "kd", "ks" or "normal" (`encode_textures`), used instead of encoding them.
    Each file is written atomically, and the OBJ last: an existing ``{name}.obj`` always refers to a
    complete MTL and textures. Returns the OBJ path.
    """
    out_dir = Path(out_dir)
    files = {"kd": "texture_kd.png"}
    mtl = "# recon material\nnewmtl recon_material\nillum 2\nKa 0 0 0\nKd 1 1 1\nKs 1 1 1\nmap_Kd texture_kd.png\n"
    if ks is not None:
        files["ks"] = "texture_ks.png"
        mtl += "map_Ks texture_ks.png\n"
    if normal_ts is not None:
        files["normal"] = "texture_n.png"
        mtl += "bump texture_n.png\nnorm texture_n.png\n"
    for texture, data in encode_textures(texture_pixels(kd_linear, ks=ks, normal_ts=normal_ts), pngs).items():
        atomic_write_bytes(out_dir / files[texture], data)
    atomic_write_bytes(out_dir / f"{name}.mtl", mtl.encode())
    obj_path = out_dir / f"{name}.obj"
    atomic_write_bytes(obj_path, obj_text(mesh, f"{name}.mtl").encode())
    return obj_path


def load_pbr_maps(obj_path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The ``map_Ks`` and ``bump``/``norm`` textures named by an OBJ's MTL, as written by `write_textured_obj`.

    Returns a dict with ``ks`` [1,H,W,3] (linear ORM) and/or ``nrm`` [1,H,W,3] (tangent-space, in [-1,1]);
    empty when the MTL names neither (an albedo-only export).
    """
    obj_path = Path(obj_path)
    mtl_names = [line.split(None, 1)[1].strip() for line in obj_path.read_text().splitlines()[:8] if line.startswith("mtllib ")]
    out: dict[str, Tensor] = {}
    if not mtl_names or not (obj_path.parent / mtl_names[0]).is_file():
        return out
    keys = {"map_ks": "ks", "norm": "nrm", "bump": "nrm", "map_bump": "nrm"}
    for line in (obj_path.parent / mtl_names[0]).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lower() in keys and keys[parts[0].lower()] not in out:
            path = obj_path.parent / parts[-1]
            if not path.is_file():
                raise FileNotFoundError(f"{path} (named in {mtl_names[0]}) not found: the export is incomplete.")
            img = torch.as_tensor(iio.imread(path)[..., :3].astype(np.float32) / 255.0, device=device)
            out[keys[parts[0].lower()]] = (img * 2 - 1 if keys[parts[0].lower()] == "nrm" else img)[None].contiguous()
    return out


def image_tensor(image, device: str | torch.device = "cpu") -> Tensor:
    """A PIL image (as trimesh hands out textures) as [1,H,W,3] float32 in [0,1], values as stored (no colour
    conversion)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.as_tensor(arr, device=device)[None].contiguous()


def load_textured_obj(path: str | Path, device: str | torch.device = "cpu") -> tuple[Mesh, Tensor | None]:
    """Load an OBJ with its ``map_Kd`` texture via trimesh.

    Returns the mesh (uv in recon's convention, v down the texture rows) and the texture [1,H,W,3] linear RGB,
    or None when the OBJ has no texture.
    """
    import trimesh

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has no exported mesh (did the fit finish?).")
    tm = trimesh.load(path, force="mesh", process=False)
    if len(tm.faces) == 0:
        raise ValueError(f"{path} has no faces: nothing to evaluate.")
    verts = torch.as_tensor(np.asarray(tm.vertices), dtype=torch.float32, device=device)
    faces = torch.as_tensor(np.asarray(tm.faces), dtype=torch.int64, device=device)
    texture, uv = None, None
    visual = tm.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None:
        uv_np = np.asarray(visual.uv, dtype=np.float32).copy()
        uv_np[:, 1] = 1.0 - uv_np[:, 1]
        uv = torch.as_tensor(uv_np, device=device)
        image = getattr(visual.material, "baseColorTexture", None) or getattr(visual.material, "image", None)
        if image is not None:
            texture = srgb_to_linear(image_tensor(image, device)).contiguous()
    mesh = Mesh(verts=verts, faces=faces, uv=uv, uv_faces=faces if uv is not None else None)
    return mesh, texture
