"""Model size and compute: :func:`count_macs` (G multiply-accumulates) and :func:`count_params`.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode``: matrix multiplications, convolutions (and
transposed convolutions) and attention, as FLOPs / 2. Norms, activations, pooling and other element-wise work are not
counted (SPEC section 5). On CPU, ``scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_
for_cpu``, for which torch ships no formula: the counter would silently count attention as zero. Importing this
module registers the standard SDPA formulas (``sdpa_flop_count`` / ``sdpa_backward_flop_count``) for it.

By default the model runs on the ``meta`` device (shapes only, no arithmetic), so paper-sized models are counted in
about a second without touching their weights. Counting never falls back silently: when the meta run fails (an
operation without a meta kernel) :func:`count_macs` raises and names the cause; ``device="cpu"`` counts on real
tensors instead, by the caller's choice. Either way, an operation that does the work of a matrix product,
convolution or attention but has no formula in the counter (a private kernel such as ``aten.mkldnn_convolution``)
is an error, not a silent zero. Models compute the same on both devices (the test-suite checks that the two counts
agree for every registered model), and the CPU fast path (:mod:`sparseseg.inference.fast_cpu`) steps aside while a
counter watches.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

_aten = torch.ops.aten


def _register_cpu_sdpa_formulas() -> None:
    """Give the CPU flash-attention kernels (forward and backward) the formulas of the other SDPA kernels."""
    forward = _aten._scaled_dot_product_flash_attention_for_cpu
    if forward not in flop_registry:

        @register_flop_formula(forward)
        def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    backward = getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if backward is not None and backward not in flop_registry:

        @register_flop_formula(backward)
        def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                    **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa_formulas()


class MacCountError(RuntimeError):
    """A MAC count that cannot be made, or would leave work out."""


# Names of operations that multiply matrices, convolve or attend (``aten.mm``, ``aten._int_mm``,
# ``aten.mkldnn_convolution``, ``aten._transformer_encoder_layer_fwd``, ...; not ``convert_*`` or
# ``upsample_trilinear3d``): one of these without a formula in the counter would be counted as zero.
_COMPUTE_OP = re.compile(r"(^|_)(b?mm|addb?mm|baddbmm|matmul|linear|einsum)$|conv(?!ert)|attention|transformer")


class _UncountedWork(TorchDispatchMode):
    """Records every operation that looks like compute work (``_COMPUTE_OP``) but has no flop formula."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet not in flop_registry and _COMPUTE_OP.search(packet.__name__):
            self.ops.add(str(packet))
        return func(*args, **(kwargs or {}))


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are empty meta tensors (nothing is copied). A copy,
    not ``torch.func.functional_call``: that one cannot swap the weights of a module reached by two paths (MONAI's
    DynUNet holds its blocks both in lists and in its recursive skip layers) and leaves some of them meta."""
    def meta_like(t: torch.Tensor) -> torch.Tensor:
        empty = torch.empty_like(t, device="meta")
        return nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty

    return copy.deepcopy(model, memo={id(t): meta_like(t) for t in (*model.parameters(), *model.buffers())})


def _forward_flops(model: nn.Module, shape: tuple[int, ...], device: torch.device | str,
                   example: torch.Tensor | None = None) -> int:
    params = dict(model.named_parameters())
    dtype = next(iter(params.values())).dtype if params else torch.float32
    if example is not None and str(device) != "meta":
        x = example.to(device=device, dtype=dtype)
    else:
        x = torch.zeros(shape, dtype=dtype, device=device)
    if str(device) == "meta":
        model = _meta_copy(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter, _UncountedWork() as uncounted:
        model(x)
    if uncounted.ops:
        ops = ", ".join(sorted(uncounted.ops))
        raise MacCountError(f"cannot count the MACs of {type(model).__name__}: it runs {ops}, which "
                            f"torch.utils.flop_counter has no formula for")
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_shape: Sequence[int] | torch.Tensor, *, device: torch.device | str = "meta"
               ) -> float:
    """G MACs (FLOPs / 2 / 1e9) of one inference forward pass of ``model`` on an input of ``input_shape``.

    Args:
        model: any module; it is run in eval mode (its mode is restored afterwards), weights untouched.
        input_shape: e.g. ``(1, 4, 128, 128, 128)`` (zeros on a real device), or an example input tensor: its
            shape on ``meta``, the tensor itself on a real device. Its values matter only to a model whose work
            depends on them (``stp_mta_unetr`` with ``drop_background``, which refuses the meta device).
        device: ``"meta"`` (default: shapes only, instant) or the real device the model's parameters are on.

    Raises:
        MacCountError: the run on ``device`` failed (on ``meta``: an operation without a meta kernel; the message
            says so and how to count on real tensors), or the model runs a compute operation the counter has no
            formula for (it would be counted as zero).

    Examples:
        >>> count_macs(nn.Linear(8, 4), (2, 8))
        6.4e-08
    """
    example = input_shape if isinstance(input_shape, torch.Tensor) else None
    shape = tuple(example.shape) if example is not None else tuple(int(s) for s in input_shape)
    was_training = model.training
    model.eval()
    try:
        try:
            flops = _forward_flops(model, shape, device, example)
        except MacCountError:
            raise
        except (NotImplementedError, RuntimeError) as err:
            if str(device) != "meta":
                raise
            raise MacCountError(f"cannot count the MACs of {type(model).__name__} on the meta device ({err}); count "
                                f"on real tensors with count_macs(..., device='cpu')") from err
    finally:
        model.train(was_training)
    return flops / 2 / 1e9


def count_params(model: nn.Module, trainable_only: bool = False, inference_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``).

    ``inference_only``: leave out training-only parts for models that declare them through an
    ``inference_parameters()`` method (e.g. VeloxSeg's SDKT reconstruction decoders)."""
    if inference_only and hasattr(model, "inference_parameters") and not trainable_only:
        return int(model.inference_parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
