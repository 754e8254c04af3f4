"""The CPU fast path as one explicit inference step: ``fast = optimize_for_cpu_inference(model)``.

Models are built from standard modules; this step, applied by :func:`~sparseseg.inference.predict`,
:func:`~sparseseg.benchmark.benchmark` (to the dense baseline and the sparse models alike) and the demo's timing,
makes their convolutions faster for batch-1 CPU inference. It returns a copy of the module tree that **shares** the
model's parameters and buffers (no weight is copied) in which every eligible ``nn.Conv3d`` (exact type) is a
:class:`CpuConv3d` with the same parameters, ``state_dict`` keys and arguments. A ``CpuConv3d`` computes what
``nn.Conv3d`` computes, in another way:

* **dense convolutions with a spatial kernel** call oneDNN directly (``aten.mkldnn_convolution``). PyTorch picks a CPU
  backend with a rule written for 2-D images: a batch-1 3-D convolution whose ``batch * channels * depth * height``
  is at most 20480 and whose kernel is at most 3 wide goes to the reference ``slow_conv3d`` kernel (im2col + GEMM).
  Lightweight networks at 24^3 hit that rule on nearly every layer: VeloxSeg's 16 -> 128 3^3 head conv takes 34 ms
  there and 16 ms in oneDNN on one thread, with the same result to float32 rounding;
* **grouped 1^3 convolutions with at least 16 channels per group** run as one batched matmul over the groups (the
  same products; VeloxSeg's per-modality q/k/v, output and MLP projections: its first transformer block at 96^3
  15.3 instead of 16.2 ms on one thread). With 4 or 8 channels per group PyTorch's own kernel is as fast.

Nothing is cached: the weight is read at every call, so a write of any kind (``load_state_dict``, an optimizer step,
a ``.data`` write) shows in the next output. (Reordering the weights of the small maps' convolutions once, which
gained 0.9 % of a VeloxSeg pass, would need state that a ``.data`` write or a fused optimizer step cannot
invalidate: not kept.) A ``CpuConv3d`` takes its own way only where nothing else is watching or changing the
computation, and is ``nn.Conv3d`` everywhere else:

* with autograd (training, or a gradient of the input): the backward stays PyTorch's;
* under autocast (CPU bfloat16 gives a bfloat16 output, as ``nn.Conv3d`` does);
* under a dispatch mode such as ``torch.utils.flop_counter.FlopCounterMode`` or the meta device: MAC counts are
  those of the plain model;
* while tracing, scripting, exporting or compiling, for other devices, dtypes and tensor subclasses.

Where this PyTorch build has no oneDNN convolution (``torch.backends.mkldnn`` unavailable, or the operator gone from a
later release), the step logs one warning and keeps those convolutions standard.

Examples:
    >>> fast = optimize_for_cpu_inference(model.eval())  # doctest: +SKIP
    >>> with torch.inference_mode():  # doctest: +SKIP
    ...     logits = fast(image)
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn as nn

from sparseseg.models.common.context import capturing

try:  # a private helper of torch: without it no call can tell whether a counter watches, so none leaves nn.Conv3d
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode
except ImportError:  # pragma: no cover - depends on the torch release
    is_in_torch_dispatch_mode = None

log = logging.getLogger(__name__)

# Grouped 1^3 convolutions with at least this many input and output channels per group run as a batched matmul.
GROUP_MATMUL_MIN = 16


@functools.cache
def onednn_convolution_available() -> bool:
    """Whether this PyTorch build can run ``aten.mkldnn_convolution`` and tell when a dispatch mode watches
    (checked once per process, on a tiny convolution; when it cannot, one warning says so)."""
    try:
        x, w = torch.ones(1, 1, 2, 2, 2), torch.ones(1, 1, 1, 1, 1)
        ok = is_in_torch_dispatch_mode is not None and torch.backends.mkldnn.is_available() and bool(
            torch.ops.aten.mkldnn_convolution(x, w, None, [0] * 3, [1] * 3, [1] * 3, 1).sum() == 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        ok = False
    if not ok:
        log.warning("oneDNN convolution is not available in this PyTorch build; the CPU fast path keeps the "
                    "standard convolutions")
    return ok


def _route(conv: nn.Conv3d) -> str | None:
    """How a ``CpuConv3d`` would run ``conv`` on the fast path: ``"onednn"``, ``"matmul"`` or None (no gain)."""
    if type(conv) is not nn.Conv3d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    if conv.kernel_size == (1, 1, 1):
        wide = min(conv.in_channels, conv.out_channels) // conv.groups >= GROUP_MATMUL_MIN
        plain = conv.stride == (1, 1, 1) and conv.padding == (0, 0, 0)
        return "matmul" if conv.groups > 1 and wide and plain else None
    return "onednn" if conv.groups == 1 else None


def _fast_call(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this call may leave ``nn.Conv3d``'s path (see the module docstring for when it may not)."""
    return (type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 5
            and weight.dtype == torch.float32 and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and is_in_torch_dispatch_mode is not None and not is_in_torch_dispatch_mode() and not capturing())


class CpuConv3d(nn.Conv3d):
    """``nn.Conv3d`` with a faster way for batch-1 CPU inference (module docstring); made by
    :meth:`from_conv`, which shares the original's parameters.

    Examples:
        >>> conv = nn.Conv3d(16, 32, 3, padding=1)
        >>> fast = CpuConv3d.from_conv(conv, "onednn")
        >>> fast.weight is conv.weight
        True
    """

    route: str

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, route: str) -> CpuConv3d:
        """A ``CpuConv3d`` with the arguments of ``conv`` holding the very same parameter objects."""
        fast = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, device="meta")
        fast.weight, fast.bias = conv.weight, conv.bias
        fast.route = route
        fast.train(conv.training)
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, D, H, W] -> [B, C_out, D', H', W']``."""
        if not _fast_call(x, self.weight):
            return super().forward(x)
        if self.route == "matmul":
            return self._grouped_pointwise(x) if x.is_contiguous() else super().forward(x)
        if not torch.backends.mkldnn.enabled:  # the user's switch, read at call time
            return super().forward(x)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last_3d)):
            x = x.contiguous()
        return torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                                 list(self.dilation), self.groups)

    def _grouped_pointwise(self, x: torch.Tensor) -> torch.Tensor:
        """A grouped 1^3 convolution as one batched matmul over the groups: ``[B, C_in, ...] -> [B, C_out, ...]``."""
        b, c, *spatial = x.shape
        g = self.groups
        y = torch.matmul(self.weight.view(g, -1, c // g), x.view(b, g, c // g, -1))  # [B, g, C_out / g, D*H*W]
        if self.bias is not None:
            y = y.add_(self.bias.view(g, -1, 1))
        return y.view(b, -1, *spatial)  # [B, C_out, D, H, W]


def optimize_for_cpu_inference(model: nn.Module) -> nn.Module:
    """``model`` with the CPU fast path (module docstring): a copy of its module tree sharing its parameters and
    buffers, in which every eligible ``nn.Conv3d`` is a :class:`CpuConv3d`; ``model`` itself is left unchanged.

    The copy keeps the model's attributes (``model_name``, ``prune_ratio``, ...) and methods and computes the same
    outputs to float32 rounding, with the same MAC count; put it in eval mode and call it without autograd
    (``torch.inference_mode()``) for the fast path to apply. When a convolution cannot take it, nothing changes.
    """
    onednn = onednn_convolution_available()
    tensors = [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]
    shared = {id(t): t for t in (*model.parameters(), *model.buffers(), *tensors)}  # no tensor is copied
    fast = copy.deepcopy(model, memo=shared)
    for module in list(fast.modules()):
        for name, child in module.named_children():
            route = _route(child) if isinstance(child, nn.Conv3d) else None
            if route == "matmul" or (route == "onednn" and onednn):
                setattr(module, name, CpuConv3d.from_conv(child, route))
    return fast


def uses_cpu_fast_path(model: nn.Module) -> bool:
    """Whether ``model`` holds any :class:`CpuConv3d` (i.e. came from :func:`optimize_for_cpu_inference` and had
    an eligible convolution)."""
    return any(isinstance(m, CpuConv3d) for m in model.modules())
