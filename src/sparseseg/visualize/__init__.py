"""Pictures: :mod:`.plots` (pruning policy, overlays, training curves), :mod:`.policy` (a model's pruning policy
over a whole volume) and :mod:`.tokens` (the cells TokenSeg keeps over a whole volume)."""

from __future__ import annotations

from sparseseg.visualize.plots import load_overlay_inputs, plot_curves, plot_overlay, plot_policy
from sparseseg.visualize.policy import policy_from_checkpoint

__all__ = ["load_overlay_inputs", "plot_curves", "plot_overlay", "plot_policy", "policy_from_checkpoint"]
