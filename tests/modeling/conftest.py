import pytest

from modeling_testutils import make_batch, tiny_cfg


@pytest.fixture
def cfg_factory():
    """Builds a tiny TinyNet RetinaNet config; keyword pairs are KEY=VALUE overrides."""
    return tiny_cfg


@pytest.fixture
def batch_factory():
    return make_batch
