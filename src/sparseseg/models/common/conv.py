"""A drop-in ``nn.Conv3d`` that takes oneDNN's kernels on the CPU where PyTorch's backend choice would not.

PyTorch picks a CPU convolution backend with a heuristic written for 2-D images: a batch-1 3-D convolution whose
``batch * channels * depth * height`` is at most 20480 and whose kernel is at most 3 wide (or any un-strided 1^3
convolution on one thread) goes to the reference ``slow_conv3d`` kernel (im2col + GEMM) instead of oneDNN.
Lightweight networks at 24^3 feature maps hit that rule on nearly every layer: VeloxSeg's 16 -> 128 3^3 head conv
takes 34 ms there and 16 ms in oneDNN on one thread, with the same result to float32 rounding.

:class:`Conv3d` is ``nn.Conv3d`` (same parameters and ``state_dict`` keys) whose forward calls oneDNN directly
for dense (``groups=1``) convolutions with a spatial kernel, on CPU float32 tensors, when oneDNN is available and
enabled, with zero padding given as numbers, and not while the graph is being traced, exported or compiled.
Pointwise and grouped convolutions keep PyTorch's choice: measured layer by layer on VeloxSeg at 96^3 (one
thread), the reference kernel is as fast or faster for them than oneDNN (a grouped 1^3 conv at 24^3: 0.27 ms
against 0.63 ms). A grouped 1^3 convolution with at least 16 channels per group on the CPU is one batched matmul
over its groups instead (the same result to float32 rounding): VeloxSeg's first transformer block at 96^3,
whose q/k/v, output and MLP projections are per-modality 1^3 convolutions, takes 15.3 instead of 16.2 ms on one
thread; with 4 or 8 channels per group the reference kernel stays as fast.
On small maps (at most 8^3 voxels: VeloxSeg's two coarsest stages) the call is mostly oneDNN reordering the weight
to its blocked layout, on every call; without autograd, layers with a spatial kernel there reorder it once
(``mkldnn_reorder_conv3d_weight``, kept per layer and input shape until the weight changes) and convolve with
``mkldnn._convolution_pointwise`` (a 64 -> 128 3^3 stride-2 conv on 6^3: 0.28 against 0.15 ms).
Everywhere else (CUDA, meta tensors for MAC counting, other dtypes) it is ``nn.Conv3d`` unchanged. oneDNN's
convolution has its own backward, so training takes the same path.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

# Feature maps of at most this many voxels are convolved with pre-packed weights at inference (module docstring).
PACKED_MAX_VOXELS = 512
# Grouped 1^3 convolutions with at least this many input and output channels per group run as a batched matmul.
GROUP_MATMUL_MIN = 16
_packed_weights: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` is a CPU tensor in an eager run, not one being traced, scripted, exported or compiled (CPU
    layout choices such as channels-last are for eager runs only: ONNX has no memory formats)."""
    return x.device.type == "cpu" and not (torch.jit.is_tracing() or torch.jit.is_scripting()
                                           or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())


def _onednn_usable(x: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or x.is_mkldnn or not eager_cpu(x):
        return False
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` with faster CPU float32 paths (module docstring): oneDNN for dense convolutions with a spatial
    kernel, weights reordered once for small maps at inference, one batched matmul for wide grouped 1^3 convs.

    Examples:
        >>> conv = Conv3d(16, 32, 3, padding=1)
        >>> conv(torch.zeros(1, 16, 8, 8, 8)).shape
        torch.Size([1, 32, 8, 8, 8])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, D, H, W] -> [B, C_out, D', H', W']``."""
        if self.kernel_size == (1, 1, 1):
            wide = self.groups > 1 and min(self.in_channels, self.out_channels) // self.groups >= GROUP_MATMUL_MIN
            plain = self.stride == (1, 1, 1) and self.padding == (0, 0, 0) and x.dim() == 5
            if wide and plain and x.dtype == torch.float32 and eager_cpu(x):
                return self._grouped_pointwise(x)
            return super().forward(x)
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or not _onednn_usable(x):
            return super().forward(x)
        # Inference tensors (weights made under inference_mode) keep no version counter to tell a change by.
        small = x.dim() == 5 and x.shape[2] * x.shape[3] * x.shape[4] <= PACKED_MAX_VOXELS
        if small and not torch.is_grad_enabled() and not self.weight.is_inference():
            return self._packed_forward(x.contiguous())
        if self.groups > 1:
            return super().forward(x)
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups,
        )

    def _grouped_pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """A grouped 1^3 convolution as one batched matmul over the groups: ``[B, C_in, ...] -> [B, C_out, ...]``."""
        b, c, *spatial = x.shape
        g = self.groups
        y = torch.matmul(self.weight.reshape(g, -1, c // g), x.reshape(b, g, c // g, -1))  # [B, g, C_out / g, D*H*W]
        if self.bias is not None:
            y = y.add_(self.bias.view(g, -1, 1))
        return y.view(b, -1, *spatial)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN convolution of a contiguous ``x`` with the weight reordered once per input shape and weight
        version (no autograd)."""
        padding, stride, dilation = list(self.padding), list(self.stride), list(self.dilation)
        key = (tuple(x.shape), self.weight.data_ptr(), self.weight._version)
        cached = _packed_weights.get(self)
        if cached is None or cached[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv3d_weight(
                self.weight.detach().to_mkldnn(), padding, stride, dilation, self.groups, list(x.shape)
            )
            cached = _packed_weights[self] = (key, packed)
        y = torch.ops.mkldnn._convolution_pointwise(x, cached[1], self.bias, padding, stride, dilation, self.groups,
                                                    "none", [], None)
        return y.contiguous()  # oneDNN returns it channels-last
