"""``tiny-lm``: a byte-level decoder-only transformer trained on Python's ``pydoc_data.topics``.

The corpus is the English help text that ships with CPython (about 466 KB):
topics in sorted key order, joined by blank lines, as UTF-8 bytes. The first
90 % trains, the last 10 % is held out. The model uses RMSNorm, rotary
positions and SwiGLU, with no biases; every Linear is weight-quantized by
default (``quantize_first_last``), including the output head. Shapes come from
the input tensors at run time, so the model exports with dynamic batch and
sequence length.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mfqat_onnx.qat import TrainRecipe
from models._registry import Workload, WorkloadData

VOCAB_SIZE = 256
CONTEXT = 128
TRAIN_FRACTION = 0.9
TRAIN_STRIDE = 64


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned gain and no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last axis to unit RMS and scale it."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary position embedding to ``x`` ``[B, H, T, D]`` (pairs are the two halves of D)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, d_model: int, n_heads: int, rope_base: float) -> None:
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model {d_model} must split into {n_heads} heads of even size")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        head_dim = d_model // n_heads
        inv_freq = rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the sequence axis of ``x`` ``[B, T, d_model]``."""
        # Split heads with unflatten so batch and sequence sizes stay symbolic.
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        positions = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """Gated feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated feed-forward map to the last axis."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, d_model: int, n_heads: int, ffn_hidden: int, rope_base: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(d_model)
        self.attn = Attention(d_model, n_heads, rope_base)
        self.ffn_norm = RMSNorm(d_model)
        self.ffn = SwiGLU(d_model, ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply attention then the feed-forward block, each with a residual connection."""
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class TinyLM(nn.Module):
    """Byte-level decoder-only transformer; ``forward(tokens [B, T]) -> logits [B, T, 256]``."""

    def __init__(
        self,
        d_model: int = 128,
        n_layers: int = 3,
        n_heads: int = 4,
        ffn_hidden: int = 352,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_heads, ffn_hidden, rope_base) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, VOCAB_SIZE, bias=False)
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            # Residual-branch outputs start smaller so the sum over layers keeps unit scale.
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("out.weight", "down.weight")) else 0.02
            nn.init.normal_(param, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return next-byte logits for every position of ``tokens``."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def build_model(**kwargs: int | float) -> TinyLM:
    """Return a freshly initialized ``TinyLM``."""
    return TinyLM(**kwargs)  # type: ignore[arg-type]


def corpus_bytes() -> bytes:
    """Return the corpus: every ``pydoc_data.topics`` entry in sorted key order, as UTF-8."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def windows(data: torch.Tensor, length: int, stride: int) -> torch.Tensor:
    """Cut ``data`` into windows of ``length`` tokens starting every ``stride`` tokens."""
    return data.unfold(0, length, stride).contiguous()


def load_data(context: int = CONTEXT) -> WorkloadData:
    """Split the corpus 90/10 and cut it into windows of ``context + 1`` bytes.

    Training windows overlap, with a new one every 64 bytes. Held-out windows
    do not, so each held-out byte after the first of a window is predicted once.
    """
    data = torch.frombuffer(bytearray(corpus_bytes()), dtype=torch.uint8).long()
    cut = int(len(data) * TRAIN_FRACTION)
    return WorkloadData(
        train=TensorDataset(windows(data[:cut], context + 1, TRAIN_STRIDE)),
        eval=TensorDataset(windows(data[cut:], context + 1, context + 1)),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Return the mean next-byte cross-entropy (nats) of ``model`` on a batch of windows."""
    (tokens,) = batch
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 64) -> dict[str, float]:
    """Return held-out ``perplexity``, ``loss`` (nats per byte) and ``bits_per_byte``."""
    model.eval()
    (tokens,) = data.tensors
    total = 0.0
    count = 0
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        logits = model(chunk[:, :-1])
        total += float(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        count += chunk[:, 1:].numel()
    loss = total / count
    return {"perplexity": math.exp(loss), "loss": loss, "bits_per_byte": loss / math.log(2)}


def example_inputs(batch: int = 1, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """Return a token batch ``[batch, seq]`` of spaces."""
    return (torch.full((batch, seq), ord(" "), dtype=torch.long),)


WORKLOAD = Workload(
    name="tiny-lm",
    description="byte-level transformer on pydoc_data.topics (perplexity)",
    build_model=build_model,
    load_data=load_data,
    loss_fn=loss_fn,
    evaluate=evaluate,
    metric="perplexity",
    higher_is_better=False,
    recipe=TrainRecipe(steps=500, batch_size=32, lr=3e-3, weight_decay=0.1, warmup_steps=25),
    finetune_recipe=TrainRecipe(steps=200, batch_size=32, lr=2e-3, weight_decay=0.1, warmup_steps=10),
    quant_defaults={"quantize_first_last": True},
    example_inputs=example_inputs,
    input_names=("tokens",),
    output_names=("logits",),
    dynamic_axes={"tokens": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}},
)
