"""A user's own model, loss and batch functions, named by import path in the ``memfit plan`` CLI tests."""

import torch
from torch import nn


class Tagger(nn.Module):
    """Embedding, an MLP, per-token logits: a sequence output (B, T, V)."""

    def __init__(self, vocab: int = 64, width: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(ids))


def make_model() -> nn.Module:
    return Tagger()


def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["ids"])
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())


def make_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    return {"ids": ids, "targets": torch.roll(ids, -1, 1)}


def bad_batch() -> tuple[torch.Tensor, str]:
    return torch.zeros(2, 16, dtype=torch.long), "labels"


def raising_batch() -> None:
    raise OSError("dataset not found")


def vector_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["ids"]).sum(-1)  # (B, T): not a scalar


def raising_factory() -> nn.Module:
    raise RuntimeError("no weights here")


not_callable = 3
