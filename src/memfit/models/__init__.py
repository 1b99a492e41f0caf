"""Models memfit trains and plans for: a small readable GPT with presets from ``tiny`` to ``gpt2-xl``, a small
CNN, and any ``nn.Module`` by import path (``package.module:factory``).

Usage::

    spec = memfit.models.get_model("small")
    model = spec.build()
    loss = spec.loss_fn(model, spec.example_batch(8))
"""

from memfit.models._gpt import GPT, GPTConfig, lm_loss
from memfit.models._registry import PRESETS, ModelSpec, SmallCNN, get_model

__all__ = ["GPT", "PRESETS", "GPTConfig", "ModelSpec", "SmallCNN", "get_model", "lm_loss"]
