"""recon.cuda_graphs off CUDA: everything runs eagerly, the switch follows the config, and copies start empty
(the graphs themselves: tests/test_cuda_graphs_gpu.py)."""
import copy
import pickle

import torch

from recon import cuda_graphs
from recon.light import EnvironmentLight


def test_cpu_tensors_run_eagerly():
    cache = cuda_graphs.GraphCache()
    x = torch.randn(5, requires_grad=True)
    calls = []

    def fn(a):
        calls.append(1)
        return (a * 2,)

    (y,) = cache.call("double", fn, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 2.0)) and len(calls) == 1
    assert cache.captures("double") == 0 and not cuda_graphs.applies((x,))


def test_conditions():
    x = torch.randn(3, requires_grad=True)
    assert not cuda_graphs.applies(())
    with torch.no_grad():
        assert not cuda_graphs.applies((x,))
    cuda_graphs.set_enabled(False)
    try:
        assert not cuda_graphs.enabled()
    finally:
        cuda_graphs.set_enabled(True)
    assert cuda_graphs.enabled()


def test_copies_and_pickles_start_empty():
    light = EnvironmentLight(base_res=16, min_res=8, diffuse_res=8)
    light._graphs._graphs["light mips"] = cuda_graphs._Graphed("light mips")
    assert copy.deepcopy(light)._graphs._graphs == {}
    assert pickle.loads(pickle.dumps(light))._graphs._graphs == {}
    copy.deepcopy(light).build_mips()


def test_system_follows_the_config():
    import hydra

    from recon.fit import compose_config as compose

    try:
        for value in (False, True):
            cfg = compose(["model.geometry.tet_grid=16", f"model.render.cuda_graphs={value}"])
            hydra.utils.instantiate(cfg.model)
            assert cuda_graphs.enabled() is value
    finally:
        cuda_graphs.set_enabled(True)
