"""Named model presets and ``package.module:factory`` import paths: one way to name every model memfit trains.

A preset is a :class:`ModelSpec`: how to build the module, how to make a batch of a given shape, and the loss.
The planner builds the module on the ``meta`` device (no memory) from the same spec that the demo and the
trainer build on the CPU.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from memfit.models._gpt import GPT, GPTConfig, lm_loss

__all__ = ["PRESETS", "ModelSpec", "SmallCNN", "get_model"]

Kind = Literal["lm", "image", "custom"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model by name.

    Attributes:
        name: the preset name or import path.
        kind: ``"lm"`` (batch ``(x, y)`` of token ids ``(B, T)``), ``"image"`` (images ``(B, 3, H, W)`` and
            labels ``(B,)``), or ``"custom"`` (an import path: batch is ``(x, y)`` with ``x`` of shape
            ``(B, *input_shape)`` float and ``y`` of shape ``(B,)`` class ids, loss cross-entropy).
        build: ``build() -> nn.Module`` (call it under ``torch.device("meta")`` to allocate nothing).
        gpt: the GPT configuration for ``lm`` presets, else ``None``.
        seq_len: default sequence length (``lm``) or image side (``image``).
        input_shape: per-example input shape for ``custom`` models.
        n_classes: classes of ``image`` and ``custom`` models.
    """

    name: str
    kind: Kind
    build: Callable[[], nn.Module]
    gpt: GPTConfig | None = None
    seq_len: int = 0
    input_shape: tuple[int, ...] = ()
    n_classes: int = 10

    def loss_fn(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``loss_fn(model, batch) -> scalar``: next-token or class cross-entropy."""
        if self.kind == "lm":
            return lm_loss(model, batch)
        x, y = batch
        logp = model(x).log_softmax(dim=-1)  # (B, classes); see lm_loss for why not F.cross_entropy
        return -logp.gather(-1, y.unsqueeze(-1)).mean()

    def example_batch(
        self, batch_size: int, seq_len: int | None = None, *, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of the right shapes and dtypes (zeros; on ``meta`` it allocates nothing).

        Args:
            batch_size: examples per batch.
            seq_len: tokens per example (``lm``) or image side (``image``); default :attr:`seq_len`.
            device: where to make it.

        Raises:
            ValueError: on a non-positive size, or a sequence longer than the model's ``block_size``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = seq_len if seq_len is not None else self.seq_len
        if self.kind == "lm":
            assert self.gpt is not None
            if not 1 <= n <= self.gpt.block_size:
                raise ValueError(
                    f"{self.name}: sequence length must be in [1, {self.gpt.block_size}], got {n}"
                )
            x = torch.zeros(batch_size, n, dtype=torch.long, device=device)
            return x, x.clone()
        shape = (3, n, n) if self.kind == "image" else self.input_shape
        x = torch.zeros(batch_size, *shape, device=device)
        return x, torch.zeros(batch_size, dtype=torch.long, device=device)


class SmallCNN(nn.Module):
    """A small VGG-style CNN for 3-channel images: three (conv3x3 - BatchNorm - ReLU - maxpool2) stages, then
    global average pooling and a linear classifier.

    Args:
        n_classes: output classes.
        width: channels of the first stage (doubled at each stage).
    """

    def __init__(self, n_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(3):
            c_out = width * 2**i
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))  # (B, C)
        out: torch.Tensor = self.head(h)
        return out


def _gpt_spec(name: str, cfg: GPTConfig) -> ModelSpec:
    return ModelSpec(name=name, kind="lm", build=lambda: GPT(cfg), gpt=cfg, seq_len=cfg.block_size)


_GPT2 = {"vocab_size": 50257, "block_size": 1024, "bias": True}
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        # tests and the demo on a CPU: byte-level vocabulary
        _gpt_spec("tiny", GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)),
        # the demo: two blocks, wide enough that SM3's row + column accumulators are < 1% of Adam's moments
        _gpt_spec("mini", GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64)),
        _gpt_spec("small", GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128)),
        _gpt_spec("medium", GPTConfig(n_layer=6, n_head=8, n_embd=256, block_size=256)),
        # the GPT-2 family (Radford et al. 2019): 124M, 350M, 774M, 1.5B parameters
        _gpt_spec("gpt2", GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT2)),  # type: ignore[arg-type]
        _gpt_spec("gpt2-medium", GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT2)),  # type: ignore[arg-type]
        _gpt_spec("gpt2-large", GPTConfig(n_layer=36, n_head=20, n_embd=1280, **_GPT2)),  # type: ignore[arg-type]
        _gpt_spec("gpt2-xl", GPTConfig(n_layer=48, n_head=25, n_embd=1600, **_GPT2)),  # type: ignore[arg-type]
        ModelSpec(name="cnn", kind="image", build=lambda: SmallCNN(10), seq_len=32, n_classes=10),
    )
}


def get_model(name: str, *, input_shape: tuple[int, ...] = (), n_classes: int = 10) -> ModelSpec:
    """The :class:`ModelSpec` of a preset name, or of an import path ``package.module:factory``.

    Args:
        name: a key of :data:`PRESETS`, or ``"package.module:factory"`` where ``factory()`` returns an
            ``nn.Module`` (a class with a no-argument constructor works).
        input_shape: per-example input shape of an import-path model (its batch is ``(B, *input_shape)``).
        n_classes: classes of an import-path model's labels.

    Raises:
        ValueError: an unknown preset name (the message lists them), or a malformed import path.
        ImportError: the module of an import path cannot be imported.
        AttributeError: the module has no such factory.
    """
    if name in PRESETS:
        return PRESETS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or an import path 'package.module:factory'"
        )
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"malformed import path {name!r}: expected 'package.module:factory'")
    module = importlib.import_module(module_name)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{name!r} is not callable: it must return an nn.Module")

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    if not input_shape:
        raise ValueError(f"an import-path model ({name!r}) needs input_shape (per-example input shape)")
    return ModelSpec(
        name=name, kind="custom", build=build, input_shape=tuple(input_shape), n_classes=n_classes
    )
