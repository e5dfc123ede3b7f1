"""Super-resolution in token space: a non-autoregressive transformer over the high-resolution token grid that
predicts masked high-res codes from low-res codes and text (VideoPoet), trained and decoded as in MAGVIT
(`pipeline.masking`).

Layout: high-res codes are int64 (B, t, h, w) on the config's `grid`; low-res codes (B, t, h/2, w/2), from the
same tokenizer at half the spatial resolution; text is a float sequence (B, L, text_dim) of text-encoder
embeddings or, with `text_vocab` > 0, int64 word ids (B, L) (`pipeline.text.WordVocabulary`) that a learned table
embeds at width text_dim, with an optional bool mask (B, L), True = a real position.

Tokens: k-way factorization splits a code of `bits` bits into k sub-tokens of bits/k bits, low bits first (2^18 ->
two 512-way choices). A position's input embedding is the sum of its sub-token embeddings (one table, k ranges), or
the mask embedding where masked; the output is k heads of 2^(bits/k) logits, computed as one projection. The low-res
codes are embedded the same way with their own table.

Blocks: each block has one layer per window of `windows`, (t, h, w) sizes that tile the grid (paper stage 1 on
(5, 56, 32): (1, 56, 4) vertical, (1, 8, 32) horizontal, (5, 8, 8) temporal). A layer self-attends inside each window,
cross-attends from each window to the low-res window that covers the same area, (t, h/2, w/2) (the two grids tile
into the same number of windows in the same order), cross-attends to the text, then an MLP; all pre-norm residual.
Windows are cut with einops and attended as a batch of short sequences, so nothing crosses a window and the cost is
linear in the number of tokens; full attention is the special case of one window the size of the grid.

Attention kernels (`attention`, `pipeline.attention`): `sdpa` (default) runs each window as its own short sequence
with no mask, which SDPA serves with its fused kernels (FlashAttention on CUDA); only the text keys carry a boolean
mask. `flex` lays each sample's windows side by side as one sequence and keeps them apart with block-diagonal
FlexAttention BlockMasks (the text keys' mask becomes one too). It computes the same thing, but its 128-token blocks
straddle windows whose size is not a multiple of 128, so it evaluates 1 to 3.6 times the attention scores of the
batched windows on the paper's grid (`benchmarks/attention.py`); hence it is opt-in. `compile = true` compiles every
block in place (`nn.Module.compile`; state-dict keys unchanged). Logits of guidance passes are combined in float32.

Conditions can be dropped per example (training) or per forward pass (guidance): a dropped low-res input becomes a
learned null embedding at every position; the text keys always start with a learned null token, and a dropped or
absent text masks every other key, so `text=None` and a dropped text compute the same thing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from pipeline.attention import Mask, MaskMod, attend, block_mask
from pipeline.checkpoint import fingerprint
from pipeline.config import RUNTIME
from pipeline.masking import (
    DecodingConfig,
    MaskingConfig,
    add_code_noise,
    guidance_weights,
    masked_cross_entropy,
    parallel_decode,
    sample_drop,
    sample_mask,
)

SPATIAL_SCALE = 2  # high-res grid / low-res grid, in h and w

Window = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------------------------
# Token factorization and windows


def split_codes(codes: Tensor, bits: int, factors: int) -> Tensor:
    """Codes (...) in [0, 2^bits) -> sub-tokens (..., factors) in [0, 2^(bits/factors)), low bits first."""
    if bits % factors:
        raise ValueError(f"bits={bits} cannot be split into {factors} equal sub-tokens")
    sub_bits = bits // factors
    shifts = torch.arange(factors, device=codes.device) * sub_bits
    return (codes[..., None] >> shifts) & ((1 << sub_bits) - 1)


def merge_codes(sub_tokens: Tensor, bits: int) -> Tensor:
    """Inverse of `split_codes`: sub-tokens (..., factors) -> codes (...)."""
    factors = sub_tokens.shape[-1]
    shifts = torch.arange(factors, device=sub_tokens.device) * (bits // factors)
    return (sub_tokens << shifts).sum(-1)


def tile(x: Tensor, n: int) -> Tensor:
    """n copies of a batch, stacked along the batch axis."""
    return x.repeat(n, *(1,) * (x.ndim - 1))


def lowres_window(window: Window) -> Window:
    t, h, w = window
    return t, h // SPATIAL_SCALE, w // SPATIAL_SCALE


def check_window(grid: Window, window: Window) -> None:
    if any(n < 1 or g % n for g, n in zip(grid, window)):
        raise ValueError(f"window {tuple(window)} does not tile the grid {tuple(grid)} (each size must divide it)")


def partition_windows(x: Tensor, window: Window) -> Tensor:
    """(B, t, h, w, D) -> (B * windows, tokens per window, D), windows in (t, h, w) raster order."""
    check_window(tuple(x.shape[1:4]), window)
    wt, wh, ww = window
    return rearrange(x, "b (nt wt) (nh wh) (nw ww) d -> (b nt nh nw) (wt wh ww) d", wt=wt, wh=wh, ww=ww)


def merge_windows(x: Tensor, window: Window, grid: Window) -> Tensor:
    """Inverse of `partition_windows`: (B * windows, tokens per window, D) -> (B, t, h, w, D)."""
    check_window(grid, window)
    (t, h, w), (wt, wh, ww) = grid, window
    return rearrange(x, "(b nt nh nw) (wt wh ww) d -> b (nt wt) (nh wh) (nw ww) d",
                     nt=t // wt, nh=h // wh, nw=w // ww, wt=wt, wh=wh, ww=ww)


def same_window(queries: int, keys: int | None = None) -> MaskMod:
    """mask_mod of windows laid side by side: query i and key j attend when they are in the same window, windows
    holding `queries` queries and `keys` keys (default: as many as queries)."""
    keys = keys or queries

    def allowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return q // queries == k // keys

    return allowed


# ---------------------------------------------------------------------------------------------------------------------
# Layers


@dataclass
class LayerMasks:
    """The masks of one layer's attentions. sdpa: no window masks (windows are batch rows) and a boolean text key
    mask (B, 1, 1, S); flex: BlockMasks over each sample's windows laid side by side, and over the text keys."""

    windows: Mask
    lowres: Mask
    text: Mask

    @property
    def windows_side_by_side(self) -> bool:
        return self.windows is not None


def window_masks(attention: str, grid: Window, window: Window, device: torch.device) -> tuple[Mask, Mask]:
    """The masks of windowed self-attention and windowed low-res cross-attention on a grid."""
    if attention == "sdpa":
        return None, None
    n, size, lr_size = math.prod(grid), math.prod(window), math.prod(lowres_window(window))
    return (block_mask(same_window(size), None, n, n, device),
            block_mask(same_window(size, lr_size), None, n, n // SPATIAL_SCALE**2, device))


def text_mask(attention: str, queries: int, text_keep: Tensor) -> Mask:
    """The mask of `queries` queries over text keys, text_keep (B, S) True = attend."""
    if attention == "sdpa":
        return rearrange(text_keep, "b s -> b 1 1 s")

    def kept(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return text_keep[b, k]

    return block_mask(kept, text_keep.shape[0], queries, text_keep.shape[1], text_keep.device)


class Attention(nn.Module):
    """Multi-head attention of queries x (n, L, D) over a context (n, S, D) under a mask (`pipeline.attention`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, mask: Mask = None) -> Tensor:
        q = rearrange(self.q(x), "n l (h e) -> n h l e", h=self.heads)
        k, v = rearrange(self.kv(context), "n s (two h e) -> two n h s e", two=2, h=self.heads)
        y = attend(q, k, v, mask)
        return self.out(rearrange(y, "n h l e -> n l (h e)"))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int):
        super().__init__()
        self.fc = nn.Linear(width, ratio * width)
        self.out = nn.Linear(ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.gelu(self.fc(x)))


class WindowLayer(nn.Module):
    """Windowed self-attention, windowed cross-attention to the low-res tokens, cross-attention to the text, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, window: Window):
        super().__init__()
        self.window = tuple(window)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.norm_lr = nn.LayerNorm(width)
        self.lr_attn = Attention(width, heads)
        self.norm_text = nn.LayerNorm(width)
        self.text_attn = Attention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio)

    def forward(self, x: Tensor, lr: Tensor, text: Tensor, masks: LayerMasks) -> Tensor:
        """x (B, t, h, w, D), lr (B, t, h/2, w/2, D), text (B, L, D) -> (B, t, h, w, D)."""
        batch, grid = x.shape[0], tuple(x.shape[1:4])
        windows = partition_windows(x, self.window)
        lr_windows = partition_windows(lr, lowres_window(self.window))
        if masks.windows_side_by_side:
            windows, lr_windows = (rearrange(w, "(b n) l d -> b (n l) d", b=batch) for w in (windows, lr_windows))
        h = self.norm_self(windows)
        windows = windows + self.self_attn(h, h, masks.windows)
        windows = windows + self.lr_attn(self.norm_lr(windows), lr_windows, masks.lowres)
        if masks.windows_side_by_side:
            windows = rearrange(windows, "b (n l) d -> (b n) l d", l=math.prod(self.window))
        x = merge_windows(windows, self.window, grid)
        flat = rearrange(x, "b t h w d -> b (t h w) d")
        flat = flat + self.text_attn(self.norm_text(flat), text, masks.text)
        flat = flat + self.mlp(self.norm_mlp(flat))
        return rearrange(flat, "b (t h w) d -> b t h w d", t=grid[0], h=grid[1], w=grid[2])


class Block(nn.Module):
    """One layer per window (paper: vertical, horizontal, temporal)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, windows: tuple[Window, ...]):
        super().__init__()
        self.layers = nn.ModuleList(WindowLayer(width, heads, mlp_ratio, w) for w in windows)

    def forward(self, x: Tensor, lr: Tensor, text: Tensor, masks: list[LayerMasks]) -> Tensor:
        for layer, layer_masks in zip(self.layers, masks):
            x = layer(x, lr, text, layer_masks)
        return x


class GridEmbedding(nn.Module):
    """Learned position embedding of a (t, h, w) grid as the sum of one embedding per axis."""

    def __init__(self, grid: Window, width: int):
        super().__init__()
        self.axes = nn.ParameterList(nn.Parameter(torch.zeros(n, width)) for n in grid)

    def forward(self) -> Tensor:
        t, h, w = self.axes
        return t[:, None, None] + h[None, :, None] + w[None, None, :]


# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class SuperResConfig:
    grid: tuple[int, int, int] = (5, 56, 32)  # high-res token grid (t, h, w); the low-res one is (t, h/2, w/2)
    windows: tuple[tuple[int, int, int], ...] = ((1, 56, 4), (1, 8, 32), (5, 8, 8))  # one layer each per block
    bits: int = 18  # the video tokenizer's code bits
    factors: int = 2  # sub-tokens per code
    width: int = 1536
    heads: int = 12
    blocks: int = 7
    mlp_ratio: int = 4
    text_dim: int = 2048  # text encoder width (T5-XL)
    text_vocab: int = 0  # > 0: text may also come as word ids below this, embedded at width text_dim
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    # sdpa: windows as batch rows, no window mask; flex: windows side by side under block masks (backward needs CUDA)
    attention: Literal["sdpa", "flex"] = field(default="sdpa", metadata=RUNTIME)
    compile: bool = field(default=False, metadata=RUNTIME)  # torch.compile every block in place

    def __post_init__(self):
        if any(n % SPATIAL_SCALE for n in self.grid[1:]):
            raise ValueError(f"SuperResConfig.grid {self.grid}: h and w must be multiples of {SPATIAL_SCALE}")
        if not self.windows:
            raise ValueError("SuperResConfig.windows: needs at least one window")
        for window in self.windows:
            check_window(self.grid, window)
            if any(n % SPATIAL_SCALE for n in window[1:]):
                raise ValueError(f"SuperResConfig.windows: {window} needs even h and w (the low-res window is half)")
        if self.bits % self.factors:
            raise ValueError(f"SuperResConfig: bits={self.bits} is not divisible by factors={self.factors}")
        if self.text_vocab < 0:
            raise ValueError(f"SuperResConfig.text_vocab must be >= 0, got {self.text_vocab}")
        if self.width % self.heads:
            raise ValueError(f"SuperResConfig: width={self.width} is not divisible by heads={self.heads}")
        if self.attention not in ("sdpa", "flex"):
            raise ValueError(f"SuperResConfig.attention must be 'sdpa' or 'flex', got {self.attention!r}")

    @property
    def lr_grid(self) -> tuple[int, int, int]:
        t, h, w = self.grid
        return t, h // SPATIAL_SCALE, w // SPATIAL_SCALE

    @property
    def sub_vocab(self) -> int:
        return 1 << (self.bits // self.factors)


class SuperResTransformer(nn.Module):
    def __init__(self, cfg: SuperResConfig):
        super().__init__()
        self.config = cfg
        d = cfg.width
        self.token_embed = nn.Embedding(cfg.factors * cfg.sub_vocab, d)
        self.mask_embed = nn.Parameter(torch.zeros(d))
        self.pos_embed = GridEmbedding(cfg.grid, d)
        self.lr_embed = nn.Embedding(cfg.factors * cfg.sub_vocab, d)
        self.lr_null = nn.Parameter(torch.zeros(d))
        self.lr_pos_embed = GridEmbedding(cfg.lr_grid, d)
        self.lr_norm = nn.LayerNorm(d)
        self.text_words = nn.Embedding(cfg.text_vocab, cfg.text_dim) if cfg.text_vocab else None
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.text_null = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp_ratio, cfg.windows) for _ in range(cfg.blocks))
        if cfg.compile:
            for block in self.blocks:
                block.compile()
        self.norm_out = nn.LayerNorm(d)
        self.heads = nn.Linear(d, cfg.factors * cfg.sub_vocab)  # the k output heads as one projection
        self.register_buffer("factor_offsets", torch.arange(cfg.factors) * cfg.sub_vocab, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * len(self.config.windows) * self.config.blocks)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # biases, norms and the mask / null vectors, set below
                continue
            if name.endswith("out.weight"):  # projections onto the residual stream, scaled by depth (GPT-2)
                nn.init.normal_(p, std=residual_std)
            else:
                nn.init.normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_embed, std=0.02)
        nn.init.normal_(self.lr_null, std=0.02)

    @property
    def length(self) -> int:
        return math.prod(self.config.grid)

    # --- inputs -------------------------------------------------------------------------------------------------------

    def check_codes(self, name: str, codes: Tensor, grid: tuple[int, int, int]) -> None:
        if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected an int64 tensor, got {getattr(codes, 'dtype', type(codes))}")
        if codes.ndim != 4 or tuple(codes.shape[1:]) != grid:
            raise ValueError(f"{name}: expected shape (B, {', '.join(map(str, grid))}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= 1 << self.config.bits):
            raise ValueError(f"{name}: values must lie in [0, 2^{self.config.bits}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")

    def check_text(self, text: Tensor | None, text_mask: Tensor | None, batch: int) -> None:
        if text is None:
            if text_mask is not None:
                raise ValueError("text_mask: given without text")
            return
        if not isinstance(text, Tensor):
            raise TypeError(f"text: expected a tensor, got {type(text).__name__}")
        if text.is_floating_point():
            if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.config.text_dim:
                raise ValueError(f"text: expected embeddings ({batch}, L, {self.config.text_dim}), "
                                 f"got {tuple(text.shape)}")
        elif text.dtype in (torch.int64, torch.int32) and self.text_words is not None:
            if text.ndim != 2 or text.shape[0] != batch:
                raise ValueError(f"text: expected word ids ({batch}, L), got {tuple(text.shape)}")
            if text.numel() and (text.min() < 0 or text.max() >= self.config.text_vocab):
                raise ValueError(f"text: word ids must lie in [0, {self.config.text_vocab}), "
                                 f"got [{int(text.min())}, {int(text.max())}]")
        else:
            accepted = "float embeddings or int64 word ids" if self.text_words is not None else "float embeddings"
            raise TypeError(f"text: expected {accepted}, got {text.dtype}")
        if text_mask is not None and (text_mask.dtype != torch.bool or tuple(text_mask.shape) != text.shape[:2]):
            raise ValueError(f"text_mask: expected bool {tuple(text.shape[:2])}, got {text_mask.dtype} "
                             f"{tuple(text_mask.shape)}")

    def embed_tokens(self, table: nn.Embedding, sub_tokens: Tensor) -> Tensor:
        """Sum of the k sub-token embeddings: (..., k) -> (..., D)."""
        return table(sub_tokens + self.factor_offsets).sum(-2)

    def embed_lowres(self, lr_codes: Tensor, drop: Tensor | None) -> Tensor:
        x = self.embed_tokens(self.lr_embed, split_codes(lr_codes.long(), self.config.bits, self.config.factors))
        if drop is not None:
            x = torch.where(drop[:, None, None, None, None], self.lr_null.to(x.dtype), x)
        return self.lr_norm(x + self.lr_pos_embed())

    def embed_text(self, text: Tensor | None, text_mask: Tensor | None, drop: Tensor | None,
                   batch: int) -> tuple[Tensor, Tensor]:
        """Keys (B, 1 + L, D) led by the null token, and which of them to attend to (B, 1 + L)."""
        null = self.text_null.expand(batch, 1, -1)
        if text is None:
            return null, torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        keep = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None else text_mask
        if drop is not None:
            keep = keep & ~drop[:, None]
        # Embeddings take the parameters' dtype (a bf16 model may be handed float32 embeddings).
        text = text.to(null.dtype) if text.is_floating_point() else self.text_words(text.long())
        projected = self.text_proj(text)
        keys = torch.cat([null.to(projected.dtype), projected], dim=1)
        return keys, F.pad(keep, (1, 0), value=True)

    def layer_masks(self, text_keep: Tensor) -> list[LayerMasks]:
        """The masks of each layer of a block (the layers of every block share them), for text keys text_keep (B, S)."""
        cfg = self.config
        text = text_mask(cfg.attention, self.length, text_keep)
        return [LayerMasks(*window_masks(cfg.attention, cfg.grid, window, text_keep.device), text)
                for window in cfg.windows]

    # --- forward ------------------------------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, masked: Tensor, lr_codes: Tensor, text: Tensor | None = None,
                text_mask: Tensor | None = None, drop_lr: Tensor | None = None,
                drop_text: Tensor | None = None) -> Tensor:
        """Sub-tokens (B, N, k) with masked (B, N) -> logits (B, N, k, 2^(bits/k)); N = t h w in raster order.
        drop_lr / drop_text (B,) bool drop a condition per example."""
        cfg = self.config
        batch = tokens.shape[0]
        x = torch.where(masked[..., None], self.mask_embed, self.embed_tokens(self.token_embed, tokens))
        x = rearrange(x, "b (t h w) d -> b t h w d", t=cfg.grid[0], h=cfg.grid[1], w=cfg.grid[2])
        x = x + self.pos_embed()
        lr = self.embed_lowres(lr_codes, drop_lr)
        text_keys, text_keep = self.embed_text(text, text_mask, drop_text, batch)
        masks = self.layer_masks(text_keep)
        for block in self.blocks:
            x = block(x, lr, text_keys, masks)
        logits = self.heads(self.norm_out(rearrange(x, "b t h w d -> b (t h w) d")))
        return rearrange(logits, "b n (k v) -> b n k v", k=cfg.factors)

    def loss(self, hr_codes: Tensor, lr_codes: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked token modeling loss on a batch; returns (loss, detached stats). All randomness (masks, noise,
        condition dropout) comes from `generator`."""
        cfg, m = self.config, self.config.masking
        self.check_codes("hr_codes", hr_codes, cfg.grid)
        self.check_codes("lr_codes", lr_codes, cfg.lr_grid)
        batch, device = hr_codes.shape[0], hr_codes.device
        if lr_codes.shape[0] != batch:
            raise ValueError(f"lr_codes: batch {lr_codes.shape[0]} does not match hr_codes' {batch}")
        self.check_text(text, text_mask, batch)
        targets = split_codes(rearrange(hr_codes.long(), "b t h w -> b (t h w)"), cfg.bits, cfg.factors)
        masked = sample_mask(batch, self.length, generator, device)
        noisy_lr = add_code_noise(lr_codes.long(), m.lr_noise, 1 << cfg.bits, generator)
        drop_lr = sample_drop(batch, m.lr_drop, generator, device)
        drop_text = sample_drop(batch, m.text_drop, generator, device)
        logits = self(targets, masked, noisy_lr, text, text_mask, drop_lr, drop_text)
        loss = masked_cross_entropy(logits, targets, masked)
        with torch.no_grad():
            hits = logits[masked].argmax(-1) == targets[masked]
            stats = {"loss": loss.detach(), "accuracy": hits.all(-1).float().mean(),
                     "factor_accuracy": hits.float().mean(), "mask_ratio": masked.float().mean()}
        return loss, stats

    # --- generation ---------------------------------------------------------------------------------------------------

    def guided_logits(self, tokens: Tensor, masked: Tensor, lr_codes: Tensor, text: Tensor | None,
                      text_mask: Tensor | None, text_guidance: float, lr_guidance: float) -> Tensor:
        """Classifier-free guided logits (`pipeline.masking`), the passes it needs run as one batch."""
        weights = guidance_weights(text_guidance, lr_guidance, has_text=text is not None)
        n, batch = len(weights), tokens.shape[0]
        drop_lr = torch.tensor([not keep_lr for keep_lr, _ in weights], device=tokens.device)
        drop_text = torch.tensor([not keep_text for _, keep_text in weights], device=tokens.device)
        logits = self(tile(tokens, n), tile(masked, n), tile(lr_codes, n), None if text is None else tile(text, n),
                      None if text_mask is None else tile(text_mask, n),
                      drop_lr.repeat_interleave(batch), drop_text.repeat_interleave(batch))
        scales = torch.tensor(list(weights.values()), device=logits.device)
        return torch.einsum("c, c b n k v -> b n k v", scales, logits.float().unflatten(0, (n, batch)))

    @torch.no_grad()
    def generate(self, lr_codes: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None, *,
                 steps: int | None = None, text_guidance: float | None = None, lr_guidance: float | None = None,
                 temperature: float | None = None, choice_temperature: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Low-res codes (B, t, h/2, w/2) (+ text) -> high-res codes (B, t, h, w) by iterative parallel decoding;
        unset arguments take the config's `decoding` values."""
        cfg = self.config
        overrides = dict(steps=steps, text_guidance=text_guidance, lr_guidance=lr_guidance,
                         temperature=temperature, choice_temperature=choice_temperature)
        dec = dataclasses.replace(cfg.decoding, **{k: v for k, v in overrides.items() if v is not None})
        self.check_codes("lr_codes", lr_codes, cfg.lr_grid)
        self.check_text(text, text_mask, lr_codes.shape[0])

        def predict(tokens: Tensor, masked: Tensor) -> Tensor:
            return self.guided_logits(tokens, masked, lr_codes, text, text_mask, dec.text_guidance, dec.lr_guidance)

        sub_tokens = parallel_decode(predict, lr_codes.shape[0], self.length, cfg.factors, steps=dec.steps,
                                     temperature=dec.temperature, choice_temperature=dec.choice_temperature,
                                     generator=generator, device=lr_codes.device)
        codes = merge_codes(sub_tokens, cfg.bits)
        return rearrange(codes, "b (t h w) -> b t h w", t=cfg.grid[0], h=cfg.grid[1], w=cfg.grid[2])

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.state_dict())
