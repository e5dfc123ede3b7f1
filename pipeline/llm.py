"""The VideoPoet LLM: a decoder-only prefix-LM transformer over the unified vocabulary (`pipeline.vocab`).

Attention: bidirectional over each sample's prefix (the conditions, up to and including the first output's begin
token; see `pipeline.sequence`), causal after it. Blocks are pre-norm: RMSNorm, multi-head attention with rotary
position embeddings (RoPE), and a SwiGLU MLP. One mask is built per forward and shared by every block: a FlexAttention
`BlockMask` (`pipeline.attention`; `attention = "auto"` picks it on CUDA), whose kernel skips the blocks above the
causal diagonal, or a boolean mask (B, 1, T, S) for `scaled_dot_product_attention`. Both come from one rule,
`prefix_lm_rule`.

Padding: training batches are padded on the right. Pads sit after every real token, and real output tokens attend
causally, so pads are never attended to by a real position and need no mask; the loss mask drops them as targets.
Generation pads prompts of different lengths on the left (classifier-free guidance batches a conditional and an
unconditional prompt): `start` is each sample's first real position, keys before it are masked and positions count
from it. RoPE depends only on position differences, so a left-padded sample computes what it would alone.

Text: word tokens live in the vocabulary's text range like any other id. Text-encoder embeddings (T5-XL in the paper:
width 2048, at most 64 positions) enter through `text_embeddings` (B, n, text_width): a linear projection of them
replaces the token embedding at the `<text_embedding>` placeholder positions, the k-th placeholder of a sample taking
its k-th embedding (extra embeddings, i.e. padding, are ignored).

Generation: `prefill` runs the whole prompt in one bidirectional forward and fills a `KVCache`; `decode_step` then
appends one token at a time, causally (`pipeline.sampling` drives both). Both stay on SDPA with a dense mask: a prompt
is all prefix (bidirectional, no block for a BlockMask to skip) and a decode step has a single query row.

Precision: RoPE and the loss's logits are computed in float32 whatever the parameters' dtype or autocast; masks are
boolean. `compile = true` compiles every block in place (`nn.Module.compile`; state-dict keys unchanged).

Parameter counts (the flavor names) include the token embedding and the output head (shared when
`tie_embeddings`) and the text projection: at the paper's 266,496-id vocabulary the embedding is a large share of
the smaller models (205M of `300m`, 409M of `1b`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.attention import Backend, Mask, MaskMod, attend, block_mask, check_backend, uses_flex
from pipeline.config import RUNTIME
from pipeline.vocab import Special, Vocabulary


def rope_angles(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, T, head_dim / 2) of positions (B, T); computed per forward, so nothing caps the length."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = positions.float()[..., None] * theta ** -exponents
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, D) by pairs (i, i + D/2), in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def prefix_lm_rule(prefix_end: Tensor, start: Tensor) -> MaskMod:
    """The prefix-LM rule as a FlexAttention mask_mod(b, h, q, k) -> True where query q of sample b may attend key k.

    prefix_end (B,): keys below it form the bidirectional prefix; start (B,): keys below it are left padding, hidden
    from every query. A query always sees itself, so no row is empty (a padding query's output is never read).
    """

    def allowed(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return ((k >= start[b]) & ((k <= q) | (k < prefix_end[b]))) | (k == q)

    return allowed


def prefix_lm_mask(query_index: Tensor, keys: int, prefix_end: Tensor, start: Tensor) -> Tensor:
    """`prefix_lm_rule` as a boolean (B, 1, T, keys) mask for queries at positions query_index (T,) of the (padded)
    sequence."""
    batch = torch.arange(len(start), device=query_index.device)[:, None, None]
    k = torch.arange(keys, device=query_index.device)[None, None, :]
    return prefix_lm_rule(prefix_end, start)(batch, None, query_index[None, :, None], k)[:, None]


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


class LayerCache:
    """Keys and values of one attention layer, (B, H, capacity, D), filled from the left."""

    def __init__(self, keys: Tensor, values: Tensor):
        self.keys, self.values, self.length = keys, values, 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache: {end} positions exceed its capacity of {self.keys.shape[2]}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class KVCache:
    """Every layer's cache plus what the masks need: each sample's first real position and the prefix end."""

    layers: list[LayerCache]
    start: Tensor
    prefix_end: Tensor

    @property
    def length(self) -> int:
        return self.layers[0].length


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, cache: LayerCache | None = None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
        y = attend(q, k, v, mask)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float):
        super().__init__()
        self.attn_norm = nn.RMSNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.mlp_norm = nn.RMSNorm(width, eps=eps)
        self.mlp = SwiGLU(width, mlp_width)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Mask, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------------------------------
# Model


@dataclass(frozen=True)
class LLMConfig:
    vocab: Vocabulary = field(default_factory=Vocabulary.paper)
    width: int = 1536
    depth: int = 21
    heads: int = 12
    mlp_width: int = 4096  # SwiGLU hidden width (about 8/3 of width keeps the MLP at 8 width^2 parameters)
    text_width: int = 2048  # text-encoder embedding width projected into <text_embedding> positions; 0: none
    tie_embeddings: bool = True  # the output head reuses the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False  # recompute each block in backward (training only)
    # sdpa: dense boolean mask; flex: FlexAttention BlockMask (its backward needs CUDA); auto: flex on CUDA
    attention: Backend = field(default="auto", metadata=RUNTIME)
    compile: bool = field(default=False, metadata=RUNTIME)  # torch.compile every block in place

    def __post_init__(self):
        for name in ("width", "depth", "heads", "mlp_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"LLMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"LLMConfig: width {self.width} must split into {self.heads} heads of an even size")
        if self.text_width < 0:
            raise ValueError(f"LLMConfig.text_width must be >= 0, got {self.text_width}")
        check_backend("LLMConfig", self.attention)


class VideoPoetLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.config = cfg
        self.vocab_size = cfg.vocab.size
        self.embed = nn.Embedding(self.vocab_size, cfg.width)
        self.text_proj = nn.Linear(cfg.text_width, cfg.width) if cfg.text_width else None
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_width, cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.width, self.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Residual branches sum over 2 * depth outputs: scale their last projections so the stream stays O(1).
        for block in self.blocks:
            nn.init.normal_(block.attn.out.weight, std=cfg.init_std / (2 * cfg.depth) ** 0.5)
            nn.init.normal_(block.mlp.down.weight, std=cfg.init_std / (2 * cfg.depth) ** 0.5)
            if cfg.compile:
                block.compile()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def head_dim(self) -> int:
        return self.config.width // self.config.heads

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- inputs ----------------------------------------------------------------------------------------------------

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids: expected an int64 tensor (B, T) with T >= 1, got "
                             f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}")
        if not ids.is_meta and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids: values must lie in [0, {self.vocab_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    @staticmethod
    def _per_sample(value: Tensor | int | None, ids: Tensor, name: str, high: int) -> Tensor:
        """An int or (B,) integer tensor -> (B,) int64, checked to lie in [0, high]."""
        batch = ids.shape[0]
        value = torch.as_tensor(0 if value is None else value, device=ids.device)
        if value.dtype not in (torch.int64, torch.int32) or value.ndim > 1 or value.numel() not in (1, batch):
            raise ValueError(f"{name}: expected an int or an integer tensor ({batch},), got {value.dtype} "
                             f"{tuple(value.shape)}")
        if value.min() < 0 or value.max() > high:
            raise ValueError(f"{name}: values must lie in [0, {high}], got {value.tolist()}")
        return value.long().expand(batch)

    def _embed(self, ids: Tensor, text_embeddings: Tensor | None) -> Tensor:
        x = self.embed(ids)
        placeholder = ids == Special.TEXT_EMBEDDING
        counts = placeholder.sum(1)
        needed = int(counts.max())
        if text_embeddings is None:
            if needed:
                raise ValueError(f"ids hold up to {needed} <text_embedding> placeholders but no text_embeddings "
                                 "were given")
            return x
        if self.text_proj is None:
            raise ValueError("text_embeddings given, but this model has no text projection (config text_width = 0)")
        batch, width = ids.shape[0], self.config.text_width
        if text_embeddings.ndim != 3 or text_embeddings.shape[0] != batch or text_embeddings.shape[2] != width:
            raise ValueError(f"text_embeddings: expected ({batch}, n, {width}), got {tuple(text_embeddings.shape)}")
        if needed > text_embeddings.shape[1]:
            raise ValueError(f"text_embeddings: {text_embeddings.shape[1]} positions, but a sample has {needed} "
                             "<text_embedding> placeholders")
        projected = self.text_proj(text_embeddings.to(x.dtype))
        rank = (placeholder.cumsum(1) - 1).clamp(min=0)
        gathered = projected.gather(1, rank[..., None].expand(-1, -1, x.shape[-1]))
        return torch.where(placeholder[..., None], gathered, x)

    # -- the network -----------------------------------------------------------------------------------------------

    def _run(self, x: Tensor, positions: Tensor, mask: Mask, cache: KVCache | None = None) -> Tensor:
        cos, sin = rope_angles(positions, self.head_dim, self.config.rope_theta)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, None if cache is None else cache.layers[i])
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(hidden, weight)

    def hidden(self, ids: Tensor, prefix_len: Tensor | int, *, text_embeddings: Tensor | None = None,
               start: Tensor | int | None = None) -> Tensor:
        """Final hidden states (B, T, width) of whole sequences.

        prefix_len (B,) or int: positions below it attend bidirectionally. start (B,) or int, for left-padded
        batches: each sample's first real position (default 0).
        """
        self._check_ids(ids)
        prefix_len = self._per_sample(prefix_len, ids, "prefix_len", ids.shape[1] + 1)
        start = self._per_sample(start, ids, "start", ids.shape[1] - 1)
        length = ids.shape[1]
        index = torch.arange(length, device=ids.device)
        positions = (index[None] - start[:, None]).clamp(min=0)
        if uses_flex(self.config.attention, ids.device):
            mask = block_mask(prefix_lm_rule(prefix_len, start), len(start), length, length, ids.device)
        else:
            mask = prefix_lm_mask(index, length, prefix_len, start)
        return self._run(self._embed(ids, text_embeddings), positions, mask)

    def forward(self, ids: Tensor, prefix_len: Tensor | int, *, text_embeddings: Tensor | None = None,
                start: Tensor | int | None = None) -> Tensor:
        """Logits (B, T, vocab) of whole sequences; see `hidden`."""
        return self.logits(self.hidden(ids, prefix_len, text_embeddings=text_embeddings, start=start))

    def loss(self, ids: Tensor, prefix_len: Tensor | int, loss_mask: Tensor, text_embeddings: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-token cross-entropy over the output tokens (loss_mask (B, T) True), averaged over them.

        stats (detached, per sample, so a trainer can sum them per task): `loss_sum` (B,) the summed token losses,
        `tokens` (B,) the number of target tokens, `correct` (B,) how many the argmax got right.
        """
        if loss_mask.shape != ids.shape or loss_mask.dtype != torch.bool:
            raise ValueError(f"loss_mask: expected a bool tensor of the ids' shape {tuple(ids.shape)}, got "
                             f"{loss_mask.dtype} {tuple(loss_mask.shape)}")
        if loss_mask[:, 0].any():
            raise ValueError("loss_mask: position 0 has no preceding token to predict it from")
        # The last position predicts nothing, so it is left out of the forward.
        hidden = self.hidden(ids[:, :-1], prefix_len, text_embeddings=text_embeddings)
        targets = loss_mask[:, 1:]
        sample = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[targets]
        logits = self.logits(hidden[targets]).float()
        token_loss = F.cross_entropy(logits, ids[:, 1:][targets], reduction="none")
        tokens = targets.sum(1)
        loss = token_loss.sum() / tokens.sum().clamp(min=1)
        with torch.no_grad():
            correct = (logits.argmax(-1) == ids[:, 1:][targets]).float()
            zeros = torch.zeros(ids.shape[0], device=ids.device)
            stats = {"loss_sum": zeros.index_add(0, sample, token_loss.detach()), "tokens": tokens,
                     "correct": zeros.index_add(0, sample, correct)}
        return loss, stats

    # -- cached generation -----------------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int, start: Tensor, prefix_end: Tensor) -> KVCache:
        param = self.embed.weight
        shape = (batch, self.config.heads, capacity, self.head_dim)
        layers = [LayerCache(param.new_empty(shape), param.new_empty(shape)) for _ in self.blocks]
        return KVCache(layers, start, prefix_end)

    @torch.no_grad()
    def prefill(self, ids: Tensor, capacity: int, *, text_embeddings: Tensor | None = None,
                start: Tensor | int | None = None) -> tuple[Tensor, KVCache]:
        """Run a whole prompt (B, P) as the bidirectional prefix and cache it for `capacity` positions in all.

        Returns the logits (B, vocab) of the prompt's last position (they predict the first output token) and the
        cache that `decode_step` extends.
        """
        self._check_ids(ids)
        batch, length = ids.shape
        start = self._per_sample(start, ids, "start", length - 1)
        prefix_end = torch.full((batch,), length, device=ids.device)
        cache = self.new_cache(batch, capacity, start, prefix_end)
        index = torch.arange(length, device=ids.device)
        positions = (index[None] - start[:, None]).clamp(min=0)
        mask = prefix_lm_mask(index, length, prefix_end, start)
        hidden = self._run(self._embed(ids, text_embeddings), positions, mask, cache)
        return self.logits(hidden[:, -1]), cache

    @torch.no_grad()
    def decode_step(self, ids: Tensor, cache: KVCache) -> Tensor:
        """Append one token per sample (B,) after the cached positions; returns the next logits (B, vocab)."""
        self._check_ids(ids[:, None])
        index = torch.tensor([cache.length], device=ids.device)
        positions = (index[None] - cache.start[:, None]).clamp(min=0)
        mask = prefix_lm_mask(index, cache.length + 1, cache.prefix_end, cache.start)
        hidden = self._run(self.embed(ids[:, None]), positions, mask, cache)
        return self.logits(hidden[:, -1])
