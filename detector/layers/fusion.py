"""Learnable weighted fusion of same-shaped feature maps (BiFPN's "fast normalized fusion" and its
variants), shared by the necks that fuse pyramid levels with scalar weights."""
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NormalizedFusion", "FUSION_METHODS"]

FUSION_METHODS = ("fast", "attn", "sum")


class NormalizedFusion(nn.Module):
    """Weighted sum of same-shaped inputs: "fast" ``sum(relu(w_i) x_i) / (sum(relu(w)) + eps)``,
    "attn" ``sum(softmax(w)_i x_i)``, "sum" ``sum(x_i)``. The weights are 1-D per-node scalars
    starting at 1; like norm parameters they get no weight decay (the optimizer treats "Norm"
    classes so). ``key`` names the config key in errors."""

    def __init__(self, num_inputs: int, method: str = "fast", eps: float = 1e-4,
                 key: str = "MODEL.BIFPN.FUSION"):
        super().__init__()
        if method not in FUSION_METHODS:
            raise ValueError(f"{key}='{method}' is not one of {FUSION_METHODS}")
        self.method = method
        self.eps = eps
        self.num_inputs = num_inputs
        # effdet's name, so checkpoints convert by renaming only
        self.edge_weights = nn.Parameter(torch.ones(num_inputs)) if method != "sum" else None

    def effective_weights(self) -> torch.Tensor:
        """The factor each input is multiplied by (non-negative for every method)."""
        if self.edge_weights is None:
            return torch.ones(self.num_inputs)
        w = self.edge_weights
        if self.method == "fast":
            w = F.relu(w)
            return w / (w.sum() + self.eps)
        return torch.softmax(w, dim=0)

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        if self.edge_weights is None:
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out
        w = self.effective_weights().to(inputs[0].dtype)
        out = inputs[0] * w[0]
        for i in range(1, len(inputs)):
            out = torch.addcmul(out, inputs[i], w[i])  # one pass, no stacked copy
        return out
