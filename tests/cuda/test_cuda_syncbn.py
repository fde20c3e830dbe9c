"""SyncBatchNorm2d over NCCL: two processes on two GPUs, started by detector.engine.launch."""
import pytest
import torch

from gpu_training_checks import check_sync_batchnorm

pytestmark = pytest.mark.cuda


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs (torch.cuda.device_count() < 2)")
def test_sync_batchnorm_over_nccl_equals_batchnorm_on_the_whole_batch(tmp_path):
    """Would catch: the launcher not choosing NCCL or not giving each rank its own GPU, the
    fused CUDA kernel not being used, statistics or gradients that are not those of the whole
    batch (uneven per-GPU batches, a rank holding a single image), and running statistics
    that drift apart between GPUs."""
    check_sync_batchnorm(tmp_path, expected_backend="nccl")
