"""Mixed-precision training on a GPU: float16 autocast with a GradScaler through DefaultTrainer
(SOLVER.AMP.ENABLED), and the scaler's state in the checkpoint."""
import pytest

from gpu_training_checks import AMP_ITERS, check_amp_training

pytestmark = pytest.mark.cuda


def test_amp_float16_training_with_grad_scaler_and_resume(tmp_path):
    """Would catch: the trainer not switching to float16 + GradScaler on CUDA, weights cast to
    float16, a loss that overflows to inf/NaN or does not fall under fp16, a scaler never
    updated, and a resume that forgets the scaler (a resumed fp16 run restarting at scale
    65536 overflows again)."""
    losses = check_amp_training("cuda", tmp_path)
    assert len(losses) == AMP_ITERS
