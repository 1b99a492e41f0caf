"""A small, readable GPT: decoder-only transformer with learned positions, pre-norm blocks, a GELU MLP and
tied input/output embeddings (the GPT-2 architecture, Radford et al. 2019; layout after Karpathy's nanoGPT).

Shapes: ``B`` batch, ``T`` sequence length, ``C = n_embd``, ``H = n_head``, ``V = vocab_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "lm_loss"]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Size and options of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (256 for the byte-level corpus of :mod:`memfit.data`).
        block_size: longest sequence the learned position table covers.
        n_layer: transformer blocks.
        n_head: attention heads per block (``n_embd`` must be divisible by it).
        n_embd: width of the residual stream.
        dropout: dropout probability on attention weights and residual branches (0 in every preset: a
            recomputed random op would draw a new mask, so dropout also limits rematerialization).
        bias: biases in the linear and LayerNorm layers (GPT-2 has them; the small presets do not, which
            keeps SM3's optimizer state visibly sublinear).
        attention: ``"sdpa"`` uses ``F.scaled_dot_product_attention`` (fused kernel, no ``T x T`` matrix saved
            for backward); ``"manual"`` spells softmax(QK^T / sqrt(d)) V out, as in the paper.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    attention: Literal["sdpa", "manual"] = "sdpa"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "manual"):
            raise ValueError(f"GPTConfig.attention must be 'sdpa' or 'manual', got {self.attention!r}")

    @property
    def n_params(self) -> int:
        """Number of parameters (the tied output layer counted once), computed from the sizes alone."""
        c, v, t, b = self.n_embd, self.vocab_size, self.block_size, int(self.bias)
        ln = c * (1 + b)
        block = (
            2 * ln + (3 * c * c + 3 * c * b) + (c * c + c * b) + (4 * c * c + 4 * c * b) + (4 * c * c + c * b)
        )
        return v * c + t * c + self.n_layer * block + ln


class _Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.manual = cfg.attention == "manual"
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H)
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.manual:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = self.drop(att) @ v
        elif q.device.type == "meta" and not (self.training and self.dropout > 0):
            # On meta (memfit.plan) SDPA would take its math path, which saves the (B, H, T, T) weights for
            # backward; real devices take a fused kernel that saves O(B H T) statistics instead. Call the fused
            # kernel's op, so that memory planned on meta is what a real step allocates.
            y = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.drop(self.proj(y))


class _MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(F.gelu(self.fc(x))))


class _Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = _Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer: ``logits = ln(blocks(wte[idx] + wpe[pos])) @ wte^T``.

    Args:
        cfg: the sizes and options.

    Input: token ids ``(B, T)`` int64 with ``T <= block_size``; output: logits ``(B, T, V)``.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layer)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = (
                    1.0 / math.sqrt(2 * self.cfg.n_layer)
                    if name.endswith(("proj.weight", "out.weight"))
                    else 1.0
                )
                nn.init.normal_(p, mean=0.0, std=std * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if self.cfg.block_size < T:
            raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        # tied embeddings: the output layer reuses wte (B, T, C) @ (C, V)
        logits: torch.Tensor = self.ln_f(x) @ self.wte.weight.t()
        return logits


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of ``model`` on ``batch = (x, y)``, both ``(B, T)`` int64.

    The ``loss_fn(model, batch)`` signature of :func:`memfit.remat.compile`.
    """
    x, y = batch
    logits = model(x)  # (B, T, V)
    # = F.cross_entropy(logits, y), written as log-softmax + gather: the same saved tensors (the log-softmax), and
    # it also traces on the meta device, where nll_loss has no autograd kernel (the planner traces there)
    logp = logits.log_softmax(dim=-1)
    return -logp.gather(-1, y.unsqueeze(-1)).mean()
