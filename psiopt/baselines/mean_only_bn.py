r"""Mean-only batch normalization (Salimans & Kingma 2016, §4).

The companion of weight normalization: subtract each channel's batch mean, and do
**not** divide by the batch standard deviation,

.. math:: y = t - \mu_B[t] + \beta ,

with :math:`\mu_B` the mean over the batch (and spatial/sequence) dimensions in
training mode, and the running mean :math:`\hat\mu` at evaluation. The running mean is
updated like :class:`torch.nn.BatchNorm1d`'s, :math:`\hat\mu \leftarrow (1-m)\hat\mu + m\,\mu_B`
(or a cumulative average when ``momentum=None``).

Since nothing divides by a scale, a layer followed by mean-only BN is **not** scale
invariant: it is a centering, not a normalization (weight normalization provides the
scale).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MeanOnlyBatchNorm1d", "MeanOnlyBatchNorm2d"]


class _MeanOnlyBatchNorm(nn.Module):
    _accepted_dims: tuple[int, ...] = ()
    _layout: str = ""

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if momentum is not None and not (0.0 <= float(momentum) <= 1.0):
            raise ValueError(
                f"momentum must be in [0, 1] (or None for a cumulative average), got {momentum!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.momentum = momentum
        if bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self) -> None:
        """Zero the running mean and the batch counter."""
        self.running_mean.zero_()
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset the running statistics and the bias (to 0)."""
        self.reset_running_stats()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, bias={self.bias is not None}"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in self._accepted_dims:
            raise ValueError(
                f"{type(self).__name__} expects a {self._layout} input, got a {x.dim()}-d tensor of "
                f"shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got {x.shape[1]} channels (dim 1) in an "
                f"input of shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training:
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dim=dims)
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
                )
                self.running_mean.mul_(1.0 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
        else:
            mean = self.running_mean
        y = x - mean.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


class MeanOnlyBatchNorm1d(_MeanOnlyBatchNorm):
    r"""Mean-only batch normalization over a ``(N, C)`` or ``(N, C, L)`` input.

    .. math:: y = x - \mu_B[x] + \beta \quad\text{(training)}, \qquad
              y = x - \hat\mu + \beta \quad\text{(evaluation)},

    per channel :math:`C`, where :math:`\mu_B` averages over ``N`` (and ``L``) and the
    running mean follows :math:`\hat\mu \leftarrow (1-m)\hat\mu + m\,\mu_B`.

    Parameters
    ----------
    num_features : int
        Number of channels ``C``.
    momentum : float or None, default 0.1
        Weight :math:`m` of the new batch mean in the running mean (PyTorch's BN
        convention); ``None`` keeps a cumulative average over all batches seen.
    bias : bool, default True
        Add a learnable per-channel bias :math:`\beta` (initialized to 0).
    device, dtype
        Where and in which dtype to create the bias and running mean.

    Examples
    --------
    >>> import torch, psiopt
    >>> bn = psiopt.nn.MeanOnlyBatchNorm1d(2)
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    >>> bn(x)                       # batch mean removed, no division by the std
    tensor([[ -1., -10.],
            [  1.,  10.]], grad_fn=<AddBackward0>)
    >>> bn.running_mean             # 0.9 * 0 + 0.1 * [2, 20]
    tensor([0.2000, 2.0000])
    >>> _ = bn.eval()
    >>> bn(x)
    tensor([[ 0.8000,  8.0000],
            [ 2.8000, 28.0000]], grad_fn=<AddBackward0>)
    """

    _accepted_dims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class MeanOnlyBatchNorm2d(_MeanOnlyBatchNorm):
    r"""Mean-only batch normalization over a ``(N, C, H, W)`` input.

    .. math:: y = x - \mu_B[x] + \beta \quad\text{(training)}, \qquad
              y = x - \hat\mu + \beta \quad\text{(evaluation)},

    per channel, where :math:`\mu_B` averages over ``N``, ``H`` and ``W``.
    Parameters as for :class:`MeanOnlyBatchNorm1d`.

    Examples
    --------
    >>> import torch, psiopt
    >>> bn = psiopt.nn.MeanOnlyBatchNorm2d(3, bias=False)
    >>> x = torch.randn(4, 3, 5, 5)
    >>> y = bn(x)
    >>> torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-6)
    True
    >>> torch.allclose(y.std(), x.std(), rtol=0.5)  # the scale is left alone
    True
    """

    _accepted_dims = (4,)
    _layout = "(N, C, H, W)"
