import pytest
import torch

from modeling_testutils import make_batch, tiny_cfg


@pytest.fixture
def cfg_factory():
    """Builds a tiny TinyNet RetinaNet config; keyword pairs are KEY=VALUE overrides."""
    return tiny_cfg


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture
def single_thread():
    """Tiny convs run faster on one thread, and do not stall when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
