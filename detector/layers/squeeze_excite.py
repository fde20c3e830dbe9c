"""Squeeze-and-excitation (SiLU MLP, sigmoid gate) with a hand-written backward.

Through autograd, the feature map of a squeeze-excite block is used twice (pooled, and scaled by
the gate), so its gradient arrives as two full maps that autograd then adds, after a third
temporary for the gate's gradient: five passes over the map where three suffice. The MLP on the
pooled (N, C) vector is tiny and is differentiated here by hand too.
"""
import torch
import torch.nn.functional as F

__all__ = ["squeeze_excite", "squeeze_excite_applies"]


class _SqueezeExcite(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, reduce_weight, reduce_bias, expand_weight, expand_bias):
        pooled = x.mean((2, 3))
        hidden = F.linear(pooled, reduce_weight, reduce_bias)
        activated = F.silu(hidden)
        gate = torch.sigmoid(F.linear(activated, expand_weight, expand_bias))
        ctx.save_for_backward(x, pooled, hidden, activated, gate, reduce_weight, expand_weight)
        return x * gate[:, :, None, None]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, pooled, hidden, activated, gate, reduce_weight, expand_weight = ctx.saved_tensors
        grad_gate = (grad * x).sum((2, 3))
        grad_logit = grad_gate * gate * (1 - gate)
        grad_expand_weight = grad_logit.t() @ activated
        grad_expand_bias = grad_logit.sum(0)
        grad_hidden = torch.ops.aten.silu_backward(grad_logit @ expand_weight, hidden)
        grad_reduce_weight = grad_hidden.t() @ pooled
        grad_reduce_bias = grad_hidden.sum(0)
        grad_pooled = grad_hidden @ reduce_weight / (x.shape[2] * x.shape[3])
        # both uses of x in one pass: through the gate, and through the mean
        grad_x = torch.addcmul(grad_pooled[:, :, None, None], grad, gate[:, :, None, None])
        return grad_x, grad_reduce_weight, grad_reduce_bias, grad_expand_weight, grad_expand_bias


def squeeze_excite_applies(x: torch.Tensor) -> bool:
    """Where :func:`squeeze_excite` is used: fp32 on the CPU with gradients, outside autocast,
    tracing and compilation (elsewhere autograd's own ops are as good)."""
    return (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 4 and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling())


def squeeze_excite(x: torch.Tensor, reduce_weight: torch.Tensor, reduce_bias: torch.Tensor,
                   expand_weight: torch.Tensor, expand_bias: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(expand(silu(reduce(mean_hw(x)))))`` for (R, C) and (C, R) linear weights
    with biases. Use it where :func:`squeeze_excite_applies`; the gradient is not itself
    differentiable."""
    return _SqueezeExcite.apply(x, reduce_weight, reduce_bias, expand_weight, expand_bias)
