"""Fixtures shared by the data tests."""
import pytest

from recon.data.synthetic_scene import builtin_scene


@pytest.fixture(scope="session")
def scene(tmp_path_factory):
    """The built-in scene (6 train, 1 val, 2 test views, 32 px), generated once and re-expressed by the tests."""
    return builtin_scene(resolution=32, n_train=6, n_val=1, n_test=2,
                         cache_dir=tmp_path_factory.getbasetemp() / "builtin", backend="torch")
