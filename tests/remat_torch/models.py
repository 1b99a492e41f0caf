"""Small models for the remat-for-PyTorch tests."""

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def cnn(c: int = 8, blocks: int = 3, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        *[ResBlock(c) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * c, classes),
    )


def mlp(width: int = 64, depth: int = 6, dropout: float = 0.0, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(width, classes))


def xent(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def image_batch(n: int = 4, size: int = 8, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def vector_batch(n: int = 32, width: int = 64, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randint(0, classes, (n,), generator=g)
