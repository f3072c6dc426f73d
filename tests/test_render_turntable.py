"""Turntable rendering of an exported run: files, framing, colours, errors, atomic writes."""
import itertools

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from recon.color import linear_to_srgb, srgb_to_linear
from recon.export.obj import write_textured_obj
from recon.export.uv_bake import bake_texture, unwrap
from recon.geometry.mesh import Mesh
from recon.render import make_rasterizer
from recon.render_turntable import AMBIENT, main, render_turntable

pytest.importorskip("imageio_ffmpeg")

RED, BLUE = (0.8, 0.1, 0.1), (0.1, 0.2, 0.8)  # linear RGB
CENTER = (0.3, -0.2, 0.5)  # off the origin, so framing must find the object


def srgb8(linear) -> np.ndarray:
    return (linear_to_srgb(torch.tensor(linear)) * 255).numpy()


def make_run(run_dir, split: bool) -> None:
    """An exported run: a UV-unwrapped icosphere, red (split: red for x < centre, blue for x >= centre)."""
    tm = trimesh.creation.icosphere(subdivisions=2, radius=0.7)
    verts = torch.tensor(tm.vertices, dtype=torch.float32) + torch.tensor(CENTER)
    mesh = unwrap(Mesh(verts, torch.tensor(tm.faces, dtype=torch.int64)))

    def field(p: torch.Tensor) -> torch.Tensor:
        right = (p[:, :1] >= CENTER[0]) if split else torch.zeros_like(p[:, :1], dtype=torch.bool)
        return torch.where(right, torch.tensor(BLUE), torch.tensor(RED))

    write_textured_obj(run_dir, mesh, bake_texture(make_rasterizer("torch", "cpu"), mesh, field, 128))


@pytest.fixture(scope="module")
def red_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("red_run")
    make_run(run_dir, split=False)
    paths = render_turntable(run_dir, frames=6, resolution=64, fps=10, backend="torch", device="cpu",
                             background=(1, 1, 1), shading="unlit")
    return run_dir, paths


def test_writes_video_and_gif(red_run):
    run_dir, paths = red_run
    assert paths == {"mp4": run_dir / "turntable.mp4", "gif": run_dir / "turntable.gif"}
    assert paths["mp4"].stat().st_size > 1000 and paths["gif"].stat().st_size > 1000
    video = read_video(paths["mp4"])
    assert video.shape == (6, 64, 64, 3)
    gif = iio.imread(paths["gif"], index=None)
    assert gif.shape[0] == 3 and max(gif.shape[1:3]) <= 256  # every 2nd frame
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_colours_and_framing(red_run):
    _, paths = red_run
    video = read_video(paths["mp4"]).astype(np.float32)
    expected = srgb8(RED)
    for frame in video:
        centre = frame[28:36, 28:36].reshape(-1, 3).mean(0)
        assert np.abs(centre - expected).max() < 12, (centre, expected)  # H.264 + 4:2:0 chroma
        for corner in (frame[:4, :4], frame[:4, -4:], frame[-4:, :4], frame[-4:, -4:]):
            assert np.abs(corner - 255).max() < 8
        # object pixels: far from white; a sphere framed to fill 80 % of the height covers ~pi/4 * 0.8^2 = 50 %
        obj = np.abs(frame - 255).max(-1) > 60
        assert 0.35 < obj.mean() < 0.65, obj.mean()
        rows, cols = np.nonzero(obj)
        assert abs(rows.mean() - 31.5) < 2 and abs(cols.mean() - 31.5) < 2  # centred
        assert 0.7 < (rows.max() - rows.min() + 1) / 64 < 0.9


def test_lambert_shading_keeps_hue_and_background(tmp_path):
    make_run(tmp_path, split=False)
    paths = render_turntable(tmp_path, frames=2, resolution=32, backend="torch", device="cpu", background=(0, 0, 0))
    frame = read_video(paths["mp4"])[0].astype(np.float32)
    centre = srgb_to_linear(torch.tensor(frame[14:18, 14:18].reshape(-1, 3).mean(0) / 255)).numpy()
    shade = centre[0] / RED[0]  # AMBIENT + (1 - AMBIENT) * n.l, about 0.9 at the centre for the default key light
    assert AMBIENT < shade < 1.03, shade
    assert 6 < centre[0] / centre[2] < 10  # the albedo's hue (8:1:1) survives the lighting
    assert frame[:3, :3].max() < 10  # black background


def test_frames_change_with_asymmetric_texture(tmp_path):
    make_run(tmp_path, split=True)
    paths = render_turntable(tmp_path, frames=4, resolution=32, backend="torch", device="cpu", shading="unlit")
    video = read_video(paths["mp4"]).astype(np.float32)
    for a, b in itertools.pairwise(video):
        assert np.abs(a - b).mean() > 5
    # frame 0 looks from +z: x grows to the right, so the left half is red and the right half blue
    left, right = video[0, 12:20, 9:13].reshape(-1, 3).mean(0), video[0, 12:20, 19:23].reshape(-1, 3).mean(0)
    assert left[0] > left[2] + 60 and right[2] > right[0] + 60


def test_missing_mesh_exits_2(tmp_path, capsys):
    assert main([str(tmp_path), "--frames", "2", "--resolution", "32", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "mesh.obj") in err and "no exported mesh" in err
    assert not list(tmp_path.iterdir())


def test_untextured_mesh_and_bad_arguments_exit_2(tmp_path, capsys):
    tm = trimesh.creation.icosphere(subdivisions=1)
    (tmp_path / "mesh.obj").write_text(trimesh.exchange.obj.export_obj(tm, include_texture=False))
    assert main([str(tmp_path), "--frames", "2", "--resolution", "32", "--backend", "torch"]) == 2
    assert "no map_Kd texture" in capsys.readouterr().err
    assert main([str(tmp_path), "--resolution", "33"]) == 2
    assert main([str(tmp_path), "--background", "1,1"]) == 2
    assert not list(tmp_path.glob("turntable.*")) and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_cli_prints_paths(tmp_path, capsys):
    make_run(tmp_path, split=False)
    assert main([str(tmp_path), "--frames", "2", "--resolution", "32", "--backend", "torch", "--background", "0,0,0"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "turntable.mp4"), str(tmp_path / "turntable.gif")]


def read_video(path) -> np.ndarray:
    """All frames [N,H,W,3] uint8, read back with imageio (its ffmpeg plugin)."""
    return iio.imread(path, plugin="FFMPEG", index=None)


def test_failure_mid_render_leaves_no_partial_files(tmp_path, monkeypatch):
    import recon.render_turntable as turntable

    make_run(tmp_path, split=False)

    def broken(*args, **kwargs):
        raise RuntimeError("rasterizer failed")

    monkeypatch.setattr(turntable, "render_frames", broken)
    with pytest.raises(RuntimeError):
        render_turntable(tmp_path, frames=2, resolution=32, backend="torch", device="cpu")
    assert {p.name for p in tmp_path.iterdir()} == {"mesh.obj", "mesh.mtl", "texture_kd.png"}
