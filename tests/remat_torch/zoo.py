"""A model zoo as users write them: HF transformers models from small configs (random weights, no download) and a
torchvision-style ResNet-18, each with the loss and the batch a user would pass.

Every builder returns ``(model, loss_fn, batch)`` with ``loss_fn(model, batch) -> scalar loss`` and takes
``size="tiny"`` (the fast tests) or ``size="small"`` (slow tests and ``benchmarks/remat_zoo.py``); nothing in a
model is edited for memfit: attention masks with padding, tied embeddings, dropout as the config sets it.

ResNet-18 is written here to torchvision's definition (``torchvision/models/resnet.py``: ``BasicBlock`` with
3x3 convolutions, BatchNorm, a 1x1 projection shortcut when the shape changes, stages of 2 blocks at widths
64/128/256/512, a 7x7 stride-2 stem and a 3x3 max-pool): torchvision from PyPI does not load against this
project's CPU torch 2.13.0 (its compiled extension is built for another torch), so the tests cannot import it.
The layer structure and hyperparameters carry over; ``width`` scales the stage widths for tiny tests.

Each builder also names its *blocks* (``blocks(model)``), the modules per-block ``torch.utils.checkpoint`` wraps
in the benchmark when the model has no ``gradient_checkpointing_enable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import transformers
from torch import nn

Size = Literal["tiny", "small"]
Built = tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]

VOCAB = {"tiny": 128, "small": 1024}


def _ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """1 for tokens, 0 for right padding: row i is padded by i tokens (row 0 not at all)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(1, batch):
        mask[i, seq - i :] = 0
    return mask


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a user writes for a HF model: ``model(**batch).loss``."""
    loss: torch.Tensor = model(**batch).loss
    return loss


def _lm_batch(size: Size, seq: int | None = None) -> dict[str, torch.Tensor]:
    b, s = (2, seq or 16) if size == "tiny" else (4, seq or 128)
    ids = _ids(b, s, VOCAB[size])
    return {"input_ids": ids, "labels": ids}


def _dims(size: Size) -> dict[str, int]:
    if size == "tiny":
        return {"hidden": 32, "layers": 2, "heads": 4, "ffn": 64}
    return {"hidden": 128, "layers": 4, "heads": 4, "ffn": 512}


def bert(size: Size = "tiny") -> Built:
    """``BertForMaskedLM`` with dropout 0.1 (the config's default), a padding attention mask and MLM labels
    (-100 on unmasked and padded tokens); its ``cls.predictions.bias`` is tied to ``decoder.bias``."""
    d = _dims(size)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB[size], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], intermediate_size=d["ffn"], max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    b, s = (2, 16) if size == "tiny" else (4, 128)
    ids = _ids(b, s, VOCAB[size])
    mask = _padding_mask(b, s)
    labels = torch.where((torch.arange(s) % 3 == 0) & (mask == 1), ids, torch.full_like(ids, -100))
    return model, hf_loss, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def llama(size: Size = "tiny") -> Built:
    """``LlamaForCausalLM`` (untied head), causal LM loss."""
    d = _dims(size)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB[size], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], num_key_value_heads=d["heads"] // 2, intermediate_size=d["ffn"],
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg), hf_loss, _lm_batch(size)


def t5(size: Size = "tiny") -> Built:
    """``T5ForConditionalGeneration``: the ``shared`` embedding tied to encoder, decoder and LM head, dropout 0.1
    (the config's default), a padded encoder attention mask."""
    d = _dims(size)
    cfg = transformers.T5Config(
        vocab_size=VOCAB[size], d_model=d["hidden"], d_kv=d["hidden"] // d["heads"], d_ff=d["ffn"],
        num_layers=d["layers"], num_decoder_layers=d["layers"], num_heads=d["heads"], decoder_start_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(cfg)
    b, s = (2, 16) if size == "tiny" else (4, 128)
    ids = _ids(b, s, VOCAB[size])
    labels = _ids(b, s // 2, VOCAB[size], seed=1)
    return model, hf_loss, {"input_ids": ids, "attention_mask": _padding_mask(b, s), "labels": labels}


def vit(size: Size = "tiny") -> Built:
    """``ViTForImageClassification`` on random images, cross-entropy on class labels."""
    d = _dims(size)
    image = 16 if size == "tiny" else 64
    cfg = transformers.ViTConfig(
        image_size=image, patch_size=4, num_channels=3, hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], intermediate_size=d["ffn"], num_labels=10,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    b = 2 if size == "tiny" else 8
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(b, 3, image, image, generator=g),
        "labels": torch.randint(0, 10, (b,), generator=g),
    }
    return model, hf_loss, batch


def gpt_neox(size: Size = "tiny") -> Built:
    """``GPTNeoXForCausalLM`` (parallel attention + MLP residual, partial rotary)."""
    d = _dims(size)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB[size], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], intermediate_size=d["ffn"], max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(cfg), hf_loss, _lm_batch(size)


def mixtral(size: Size = "tiny", experts: str = "grouped_mm") -> Built:
    """``MixtralForCausalLM`` with 4 experts, top-2 routing; ``experts`` picks HF's expert implementation
    (``"grouped_mm"``, the default, or ``"batched_mm"``)."""
    d = _dims(size)
    cfg = transformers.MixtralConfig(
        vocab_size=VOCAB[size], hidden_size=d["hidden"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], num_key_value_heads=d["heads"] // 2, intermediate_size=d["ffn"],
        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256, experts_implementation=experts,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg), hf_loss, _lm_batch(size)


def mamba(size: Size = "tiny") -> Built:
    """``MambaForCausalLM`` (HF's pure-PyTorch selective scan; no CUDA kernels on this machine)."""
    d = _dims(size)
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB[size], hidden_size=d["hidden"], state_size=8, num_hidden_layers=d["layers"],
        expand=2, conv_kernel=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg), hf_loss, _lm_batch(size, seq=16 if size == "tiny" else 64)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` (``ResNet(BasicBlock, [2, 2, 2, 2])``) with stage widths ``width * (1, 2, 4, 8)``
    (torchvision: ``width=64``) and torchvision's initialisation (Kaiming-normal convolutions, BN weight 1)."""

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        stages = []
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def xent(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def resnet18(size: Size = "tiny") -> Built:
    """ResNet-18 (train mode: BatchNorm batch statistics, running statistics updated), cross-entropy."""
    width, image, b = (8, 32, 2) if size == "tiny" else (64, 64, 16)
    torch.manual_seed(0)
    model = ResNet18(width=width, num_classes=10)
    g = torch.Generator().manual_seed(0)
    return (
        model,
        xent,
        (torch.randn(b, 3, image, image, generator=g), torch.randint(0, 10, (b,), generator=g)),
    )


def no_dropout(model: nn.Module) -> None:
    """Dropout off: every ``nn.Dropout``'s ``p``, and the attention dropout rates HF modules keep as floats (T5's
    ``T5Attention.dropout``, ViT's and GPT-NeoX's ``attention_dropout``), set to 0."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks a user would wrap in ``torch.utils.checkpoint`` (ResNet-18: its 8 basic blocks)."""
    if isinstance(model, ResNet18):
        return [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    raise ValueError(f"{type(model).__name__}: use HF's gradient_checkpointing_enable()")


BUILDERS: dict[str, Callable[..., Built]] = {
    "bert": bert,
    "llama": llama,
    "t5": t5,
    "vit": vit,
    "gpt_neox": gpt_neox,
    "mixtral_grouped_mm": lambda size="tiny": mixtral(size, "grouped_mm"),
    "mixtral_batched_mm": lambda size="tiny": mixtral(size, "batched_mm"),
    "mamba": mamba,
    "resnet18": resnet18,
}
