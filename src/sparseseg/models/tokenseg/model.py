"""TokenSeg: hierarchical visual token compression for 3D segmentation (SPEC section 2; design in docs/tokenseg.md).

Pipeline (finest level first everywhere; level ``l`` has stride ``2^(l+1)``: 1/2, 1/4, 1/8, 1/16):

1. **Multi-scale hierarchical encoder**: four levels, each a 2^3 stride-2 conv (it pools every non-overlapping
   2^3 cell of the finer map into one voxel) followed by a residual block; the first works on the image itself
   (no full-resolution encoder map). A level-``l`` *cell* is the ``stride^3`` image block under one voxel of that
   level's map (an octree: one cell of a level holds 8 cells of the finer one).
2. **Candidate proposal**: a 1x1x1 conv per level scores every cell (trained by BCE towards the cell's boundary
   fraction); the top ``tokens_per_level[l]`` cells of each level become candidates, 400 in all. Their features
   are projected to ``token_size`` (one Linear per level) and LayerNorm-ed.
3. **Boundary-aware tokenizer**: VQ-VAE quantisation of the candidates (:mod:`.vq`), then a fixed
   sin-cos embedding of the cell centre and a learned level embedding are added; an importance scorer keeps
   ``num_keep`` (100) tokens with the STP straight-through Gumbel top-K (training) or a plain top-K (eval), and is
   supervised by BCE towards each candidate's boundary fraction (:mod:`.boundary`). The top-K runs
   per level with a quota (``keep_per_level``, default proportional to the candidates: 40/30/20/10), so the kept
   set always mixes coarse context tokens with fine boundary tokens (one global top-K keeps only the finest
   level: small cells reach the highest boundary fractions).
4. **Token mixer**: ``mixer_depth`` Transformer blocks over the kept tokens only (global context at ~100 tokens).
5. **Sparse-to-dense decoder** (:mod:`.decoder`): only the kept tokens, quantised and mixed, reach it (the
   unselected candidates do not). Coarse to fine, each level's map is the fill vector + the upsampled coarser map +
   the level's tokens written into their cells (+ a skip, ``skips``); 1/16 and 1/8 are decoded densely and give a
   coarse prediction, 1/4, 1/2 and full resolution are refined only in the cells of kept tokens (gathered blocks
   with a halo through unpadded convolutions), so their cost follows the tokens kept. ``skips="sparse"`` (default)
   lets encoder detail into the fine levels only, inside the cells of kept coarser tokens (never at a token's own
   cell): the coarse prediction, the answer wherever no token was kept, is made from the tokens alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparseseg.models.common.output import SegmentationOutput
from sparseseg.models.common.registry import register_model
from sparseseg.models.common.tokens import TopKSelection, gather_tokens, soft_topk
from sparseseg.models.tokenseg.blocks import Down, ImportanceScorer, TokenBlock, norm_layer, sincos_3d, split_candidates
from sparseseg.models.tokenseg.boundary import TokenSelection, boundary_band, cell_band_fraction
from sparseseg.models.tokenseg.decoder import SparseDecoder
from sparseseg.models.tokenseg.vq import VectorQuantizer

NUM_LEVELS = 4
DEFAULT_SHARES = (0.4, 0.3, 0.2, 0.1)  # finest to coarsest: 160 / 120 / 80 / 40 of 400


@dataclass
class TokenizerOutput:
    """What :meth:`TokenSeg.forward_encoder` returns (shapes with N candidates and K kept tokens)."""

    features: list[torch.Tensor]  # encoder maps of levels 1/2 .. 1/16: [B, C_l, *grid_l]
    kept: torch.Tensor  # [B, K, T] kept tokens (quantised, positioned) after the mixer and its LayerNorm
    keep_idx: torch.Tensor  # [B, K] indices into the candidates, ascending
    drop_idx: torch.Tensor  # [B, N - K]
    cand_cells: torch.Tensor  # [B, N] flat cell index of each candidate in its level's grid
    score_logits: torch.Tensor  # [B, N] importance logits
    proposal_logits: list[torch.Tensor]  # per level [B, N_cells_l]
    codes: torch.Tensor  # [B, N] VQ code of each candidate
    vq_losses: tuple[torch.Tensor, torch.Tensor]  # codebook loss, commitment loss


@register_model("tokenseg", presets={"btcv": {}, "brats": {}})
class TokenSeg(nn.Module):
    """TokenSeg for ``[B, in_channels, *img_size] -> [B, out_channels, *img_size]``.

    Args:
        in_channels, out_channels, img_size: geometry; every ``img_size`` entry must be divisible by 16.
        feature_size: encoder/decoder width at full resolution; level ``l`` has ``feature_size * 2^(l+1)``.
        token_size: width of tokens, codes and the token mixer.
        num_candidates: candidate tokens over the four levels (400).
        tokens_per_level: candidates per level, finest first, summing to ``num_candidates``; ``None`` takes the
            shares 40/30/20/10 % (160/120/80/40), moving what a small level cannot hold to the finer levels.
        num_keep: tokens kept by the importance scorer (100); a plain attribute, changeable at inference.
        keep_per_level: kept tokens per level, summing to ``num_keep``; ``None`` splits ``num_keep`` in proportion
            to ``tokens_per_level`` (40/30/20/10 by default). A plain attribute too.
        codebook_size: VQ codes (4096). mixer_depth, num_heads: Transformer blocks and heads over kept tokens.
        tau: soft top-K temperature. norm_name: ``"instance"`` or ``"batch"``, the norm of the residual blocks.
        skips: what the encoder adds to the decoder: ``"sparse"`` (default: encoder maps of the fine levels and the
            image only inside the cells of kept coarser tokens), ``"dense"`` (everywhere, a U-Net's skips) or
            ``"none"`` (tokens only).
        zero_tokens: the kept tokens reach the decoder as zeros (an ablation; their cells still decide where the
            decoder refines). A plain attribute too, as is ``dense_decoding`` (refine the whole volume, same weights).
        band_radius: boundary band half-width in voxels (a cell's target = its fraction inside the band).
        vq_weight, commitment_beta, boundary_weight, proposal_weight: auxiliary loss weights.

    Examples:
        >>> model = TokenSeg(in_channels=1, out_channels=2, img_size=32, tokens_per_level=(40, 30, 20, 8),
        ...                  num_candidates=98, num_keep=24, codebook_size=64, token_size=48)
        >>> model.eval()(torch.randn(1, 1, 32, 32, 32)).shape
        torch.Size([1, 2, 32, 32, 32])
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        out_channels: int = 14,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 8,
        token_size: int = 128,
        num_candidates: int = 400,
        tokens_per_level: Sequence[int] | None = None,
        num_keep: int = 100,
        keep_per_level: Sequence[int] | None = None,
        codebook_size: int = 4096,
        mixer_depth: int = 2,
        num_heads: int = 4,
        tau: float = 1.0,
        norm_name: str = "instance",
        band_radius: int = 2,
        vq_weight: float = 1.0,
        commitment_beta: float = 0.25,
        boundary_weight: float = 1.0,
        proposal_weight: float = 1.0,
        skips: str = "sparse",
        zero_tokens: bool = False,
    ) -> None:
        super().__init__()
        size = (img_size,) * 3 if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        if len(size) != 3 or any(s <= 0 or s % 16 for s in size):
            raise ValueError(f"img_size must be 3 positive sizes divisible by 16, got {img_size}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("feature_size", feature_size), ("codebook_size", codebook_size)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if num_heads < 1 or token_size % (2 * num_heads):
            raise ValueError(f"token_size ({token_size}) must be divisible by 2 * num_heads ({num_heads})")
        if mixer_depth < 0:
            raise ValueError(f"mixer_depth must be >= 0, got {mixer_depth}")
        if band_radius < 1:
            raise ValueError(f"band_radius must be >= 1, got {band_radius}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.strides = tuple(2 ** (level + 1) for level in range(NUM_LEVELS))
        self.grid_sizes = tuple(tuple(s // st for s in size) for st in self.strides)
        cells = [g[0] * g[1] * g[2] for g in self.grid_sizes]
        if tokens_per_level is None:
            if num_candidates < NUM_LEVELS:
                raise ValueError(f"num_candidates must be >= {NUM_LEVELS}, got {num_candidates}")
            tokens_per_level = split_candidates(num_candidates, cells, DEFAULT_SHARES)
        tokens_per_level = [int(n) for n in tokens_per_level]
        if len(tokens_per_level) != NUM_LEVELS:
            raise ValueError(f"tokens_per_level needs {NUM_LEVELS} entries, got {tokens_per_level}")
        if sum(tokens_per_level) != num_candidates:
            raise ValueError(f"tokens_per_level {tokens_per_level} sums to {sum(tokens_per_level)}, "
                             f"not num_candidates={num_candidates}")
        for level, (n, c) in enumerate(zip(tokens_per_level, cells, strict=True)):
            if not 1 <= n <= c:
                raise ValueError(f"tokens_per_level[{level}]={n} must be in [1, {c}] (cells of level {level})")
        self.img_size = size
        self.tokens_per_level = tuple(tokens_per_level)
        self.num_candidates = num_candidates
        self.num_keep = num_keep
        self.keep_per_level = None if keep_per_level is None else tuple(int(k) for k in keep_per_level)
        self._keep_split()
        self.tau = tau
        self.band_radius = band_radius
        self.vq_weight, self.commitment_beta = vq_weight, commitment_beta
        self.boundary_weight, self.proposal_weight = boundary_weight, proposal_weight
        levels = torch.cat([torch.full((n,), lv) for lv, n in enumerate(tokens_per_level)])
        self.register_buffer("cand_levels", levels, persistent=False)  # [N] level of each candidate (static)
        self.register_buffer("grid_table", torch.tensor(self.grid_sizes), persistent=False)  # [4, 3]
        self.register_buffer("stride_table", torch.tensor(self.strides, dtype=torch.float32), persistent=False)

        ch = [feature_size * 2**i for i in range(NUM_LEVELS + 1)]  # full resolution, then levels 1/2 .. 1/16
        norm_layer(norm_name, 1)  # validates the name before anything is built
        self.stages = nn.ModuleList(Down(in_channels if i == 0 else ch[i], ch[i + 1], norm_name)
                                    for i in range(NUM_LEVELS))
        self.proposal = nn.ModuleList(nn.Conv3d(ch[i + 1], 1, 1) for i in range(NUM_LEVELS))
        self.token_embed = nn.ModuleList(nn.Linear(ch[i + 1], token_size) for i in range(NUM_LEVELS))
        self.token_norm = nn.LayerNorm(token_size, eps=1e-6)
        self.vq = VectorQuantizer(codebook_size, token_size)
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, token_size))
        self.scorer = ImportanceScorer(token_size)
        self.mixer = nn.Sequential(*(TokenBlock(token_size, num_heads) for _ in range(mixer_depth)))
        self.mixer_norm = nn.LayerNorm(token_size, eps=1e-6)
        self.decoder = SparseDecoder(ch, out_channels, in_channels, token_size, self.grid_sizes, norm_name, skips)
        self.zero_tokens = zero_tokens  # ablation: the decoder gets zeros for the kept tokens (not a weight)
        self.dense_decoding = False  # refine every cell instead of the kept ones (not a weight)

    def _keep_split(self) -> list[int]:
        """Kept tokens per level (validated): ``keep_per_level`` or ``num_keep`` split like the candidates."""
        if not 1 <= self.num_keep <= self.num_candidates:
            raise ValueError(f"num_keep must be in [1, num_candidates={self.num_candidates}], got {self.num_keep}")
        if self.keep_per_level is not None:
            split = list(self.keep_per_level)
            if len(split) != NUM_LEVELS or sum(split) != self.num_keep:
                raise ValueError(f"keep_per_level {split} needs {NUM_LEVELS} entries summing to "
                                 f"num_keep={self.num_keep}")
        else:
            split = [self.num_keep * n // self.num_candidates for n in self.tokens_per_level]
            for level, n in enumerate(self.tokens_per_level):  # the rounding remainder goes to the finest levels
                extra = min(self.num_keep - sum(split), n - split[level])
                split[level] += extra
        for level, (k, n) in enumerate(zip(split, self.tokens_per_level, strict=True)):
            if not 0 <= k <= n:
                raise ValueError(f"keep_per_level[{level}]={k} must be in [0, {n}] (candidates of level {level})")
        return split

    def _select(self, log_scores: torch.Tensor) -> TopKSelection:
        """Per-level straight-through top-K over the candidates ``[B, N]`` (levels are contiguous blocks)."""
        parts, start = [], 0
        for n, k in zip(self.tokens_per_level, self._keep_split(), strict=True):
            sel = soft_topk(log_scores[:, start:start + n], k, tau=self.tau, noise=self.training,
                            differentiable=self.training)
            parts.append(TopKSelection(sel.keep_idx + start, sel.drop_idx + start, sel.keep_mask, sel.drop_mask))
            start += n
        return TopKSelection(*(torch.cat(group, 1) for group in zip(*parts, strict=True)))  # ascending indices

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"expected input [B, C, {', '.join(map(str, self.img_size))}], got {tuple(x.shape)}")

    def _propose(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Top cells of every level: candidates ``[B, N, T]``, their flat cells ``[B, N]``, proposal logits."""
        tokens, cells, logits = [], [], []
        for level, n in enumerate(self.tokens_per_level):
            f = feats[level]
            logit = self.proposal[level](f).flatten(1)  # [B, 1, d, h, w] -> [B, N_cells]
            idx = logit.detach().topk(n, dim=1).indices.sort(dim=1).values  # [B, n] ascending
            tok = gather_tokens(f.flatten(2).transpose(1, 2), idx)  # [B, C_l, d, h, w] -> [B, n, C_l]
            tokens.append(self.token_embed[level](tok))  # [B, n, T]
            cells.append(idx)
            logits.append(logit)
        return torch.cat(tokens, 1), torch.cat(cells, 1), logits  # [B, N, T], [B, N]

    def _cell_coords(self, cells: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Flat cell index + level ``[B, N]`` -> (z, y, x) in the level's grid ``[B, N, 3]``."""
        grid = self.grid_table[levels]  # [B, N, 3]
        h, w = grid[..., 1], grid[..., 2]
        return torch.stack([cells // (h * w), (cells // w) % h, cells % w], dim=-1)  # [B, N, 3]

    def forward_encoder(self, x: torch.Tensor) -> TokenizerOutput:
        """Encoder, candidate proposal, VQ tokenizer, importance top-K and token mixer (no decoder)."""
        self._check_input(x)
        feats = []
        for stage in self.stages:
            feats.append(stage(feats[-1] if feats else x))  # [B, C_l, *grid_l]
        cand, cand_cells, proposal_logits = self._propose(feats)
        z = self.token_norm(cand)  # [B, N, T]
        q = self.vq(z)
        levels = self.cand_levels.expand_as(cand_cells)  # [B, N]
        centre = (self._cell_coords(cand_cells, levels).to(z.dtype) + 0.5) * self.stride_table[levels][..., None]
        pos = sincos_3d(centre, z.shape[-1]) + self.level_embed[levels]  # [B, N, T]
        tokens = q.tokens + pos
        score_logits = self.scorer(tokens)  # [B, N]
        sel = self._select(F.logsigmoid(score_logits))
        kept = gather_tokens(tokens, sel.keep_idx) * sel.keep_mask[..., None]  # [B, K, T]
        kept = self.mixer_norm(self.mixer(kept))
        return TokenizerOutput(feats, kept, sel.keep_idx, sel.drop_idx, cand_cells, score_logits,
                               proposal_logits, q.codes, (q.codebook_loss, q.commitment_loss))

    def _decode(self, x: torch.Tensor, enc: TokenizerOutput) -> torch.Tensor:
        """The kept tokens and their cells, level by level, through the sparse-to-dense decoder."""
        split = self._keep_split()
        kept = enc.kept * 0.0 if self.zero_tokens else enc.kept  # [B, K, T]
        cells = enc.cand_cells.gather(1, enc.keep_idx)  # [B, K] flat cell of each kept token in its level's grid
        return self.decoder(x, enc.features, kept.split(split, 1), cells.split(split, 1), self.dense_decoding)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor | SegmentationOutput:
        """``x`` ``[B, in_channels, *img_size]`` -> logits (eval) or :class:`SegmentationOutput` (training)."""
        enc = self.forward_encoder(x)
        logits = self._decode(x, enc)
        if not self.training:
            return logits
        codebook_loss, commitment_loss = enc.vq_losses
        aux = {"vq_codebook": self.vq_weight * codebook_loss,
               "vq_commitment": self.vq_weight * self.commitment_beta * commitment_loss}
        if target is not None:
            aux.update(self._boundary_losses(enc, target))
        return SegmentationOutput(logits, aux)

    def _boundary_losses(self, enc: TokenizerOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """BCE of the importance and proposal logits towards each cell's fraction inside the boundary band."""
        band = boundary_band(target, self.band_radius)  # [B, 1, D, H, W]
        fractions = [cell_band_fraction(band, s).to(enc.score_logits.dtype) for s in self.strides]  # [B, N_l]
        proposal = sum(F.binary_cross_entropy_with_logits(lg, fr) for lg, fr in
                       zip(enc.proposal_logits, fractions, strict=True)) / NUM_LEVELS
        offsets = torch.tensor([0] + [f.shape[1] for f in fractions[:-1]], device=band.device).cumsum(0)  # [4]
        cand_target = torch.cat(fractions, 1).gather(1, enc.cand_cells + offsets[self.cand_levels])  # [B, N]
        score = F.binary_cross_entropy_with_logits(enc.score_logits, cand_target)
        return {"boundary": self.boundary_weight * score, "proposal": self.proposal_weight * proposal}

    @torch.no_grad()
    def select_tokens(self, x: torch.Tensor) -> TokenSelection:
        """The tokens the model keeps for ``x`` (eval behaviour, deterministic), ready to draw.

        Returns a :class:`~.boundary.TokenSelection`: ``levels`` ``[B, K]`` (0 = finest, stride 2),
        ``cells`` ``[B, K, 3]`` and ``scores``; ``level_maps()`` / ``voxel_map()`` give per-level and image-size
        maps, and :func:`~.boundary.selected_boundary_fraction` scores them against a label.
        """
        was_training = self.training
        self.eval()
        try:
            enc = self.forward_encoder(x)
        finally:
            self.train(was_training)
        levels = self.cand_levels[enc.keep_idx]  # [B, K]
        cells = self._cell_coords(enc.cand_cells.gather(1, enc.keep_idx), levels)  # [B, K, 3]
        scores = F.logsigmoid(enc.score_logits.gather(1, enc.keep_idx))  # [B, K]
        return TokenSelection(levels, cells, scores, self.strides, self.grid_sizes)
