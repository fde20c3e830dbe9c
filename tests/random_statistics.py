"""Randomised norm statistics for the converted-weight tests, so a converter that drops or swaps a
norm tensor changes the outputs."""
import torch
from torch import nn


def randomize_batchnorms(modules, generator):
    """Gives every nn.BatchNorm2d among ``modules`` a weight in [0.75, 1.25), a bias and running
    mean of scale 0.1, and a running variance in [0.75, 1.25), drawn from ``generator``."""
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) * 0.5
                                    + 0.75)
