"""The Triton image losses (model.loss.fused_kernel) against recon.losses.image_losses, values and gradients: in
Triton's interpreter on the CPU (a child process: Triton picks interpreter or compiler when first imported) and,
marked `gpu`, compiled on CUDA."""
import importlib.util
import inspect

import pytest
import torch

from recon.losses import image_loss_function, image_losses

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the triton package is not installed")


def loss_inputs(b: int, h: int, w: int, device: str = "cpu", seed: int = 0):
    """A render as one antialiased RGBA tensor (rgb and alpha are strided slices of it), a masked reference and a
    background, with the kinks: zero colour (the tonemap's clamp bound and sRGB branch), render equal to the
    reference (abs at 0), colour above the clamp, transparent reference pixels."""
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(b, h, w, 4, generator=g) * 1.5
    full[..., 3] = full[..., 3].clamp(0, 1)
    img = torch.rand(b, h, w, 4, generator=g)
    img[..., 3] = (img[..., 3] > 0.3).float() * img[..., 3]
    bg = torch.rand(b, h, w, 3, generator=g)
    full[0, 0, 0, :3] = 0.0
    full[0, 0, 1, :3] = 7e4
    img[0, 0, 1, 3] = 1.0
    full[-1, 1, 1, :3] = 0.0
    img[-1, 1, 1, :3] = 0.0
    bg[-1, 1, 1] = 0.0
    img[-1, 2, 3] = torch.tensor([0.5, 0.5, 0.5, 0.0])
    return full.to(device), img.to(device), bg.to(device)


def compare(fn, b: int, h: int, w: int, device: str) -> tuple[float, float]:
    """Largest |difference| of the two losses and of the gradient (both upstream gradients non-trivial), relative to
    the reference's largest gradient."""
    full, img, bg = loss_inputs(b, h, w, device)
    results = []
    for impl in (image_losses, fn):
        x = full.clone().requires_grad_()
        color, alpha = impl(x[..., :3], x[..., 3:], img, bg)
        (color * 1.7 + alpha * 0.3).backward()
        results.append((torch.stack([color, alpha]).detach(), x.grad))
    (v_ref, g_ref), (v, g) = results
    return float((v - v_ref).abs().max()), float((g - g_ref).abs().max() / g_ref.abs().max())


CHECK = """
from recon.losses_triton import image_losses_triton
v, g = compare(image_losses_triton, 2, 33, 47, "cpu")
print("errors", v, g)
"""


@needs_triton
def test_fused_image_losses_match_torch_in_triton_interpreter(in_triton_interpreter):
    out = in_triton_interpreter("import torch\nfrom recon.losses import image_losses\n" + inspect.getsource(loss_inputs)
                                + inspect.getsource(compare) + CHECK)
    value_error, grad_error = map(float, out.split("errors")[1].split())
    assert value_error < 1e-6 and grad_error < 1e-5, out


@needs_triton
def test_fused_image_losses_name_bad_shapes():
    from recon.losses_triton import image_losses_triton

    full, img, bg = loss_inputs(1, 4, 4)
    with pytest.raises(ValueError, match="leading dimensions"):
        image_losses_triton(full[..., :3], full[..., 3:], img[:, :2], bg)
    with pytest.raises(ValueError, match="3, 1, 4 and 3 channels"):
        image_losses_triton(full, full[..., 3:], img, bg)


def test_the_fused_kernel_is_the_cuda_default_and_cuda_only():
    assert image_loss_function(False, torch.device("cuda")) is image_losses
    assert image_loss_function(True, torch.device("cpu")) is image_losses
    from recon.fit import compose_config
    assert compose_config(["experiment=nerf800"]).model.loss.fused_kernel is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_image_losses_match_torch_on_cuda():
    fn = image_loss_function(True, torch.device("cuda"))
    assert fn is not image_losses
    value_error, grad_error = compare(fn, 8, 200, 200, "cuda")
    assert value_error < 1e-5 and grad_error < 1e-4, (value_error, grad_error)
