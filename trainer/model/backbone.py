"""EfficientNet-Lite0 split into a frozen prefix and a trainable suffix for transfer learning.

``unfreeze_blocks = 0`` trains only a new linear head on the pooled 1280-d features; ``k > 0`` also
trains the last ``k`` MBConv blocks and the 1x1 head convolution. The prefix and the suffix share their
parameters with the full model, so training the suffix trains the model that is exported. BatchNorm
layers of the suffix keep their ImageNet statistics (eval mode): with a few hundred images, updating
them hurts more than it helps, and frozen statistics make the cached prefix activations valid.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NUM_BLOCKS = 16
"""MBConv blocks in EfficientNet-Lite0."""


class Prefix(nn.Module):
    """Stem and the first blocks (and, when nothing is unfrozen, head conv + pooling): the frozen part."""

    def __init__(self, model: nn.Module, unfreeze_blocks: int) -> None:
        super().__init__()
        self.m: Any = model
        self.stop = NUM_BLOCKS - unfreeze_blocks
        self.pooled = unfreeze_blocks == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[: self.stop]:
            x = block(x)
        if self.pooled:
            x = m._swish(m._bn1(m._conv_head(x)))
            x = torch.flatten(m._avg_pooling(x), 1)
        return x


class Suffix(nn.Module):
    """The trainable rest: last blocks (optional), head conv, pooling, dropout and the new classifier."""

    def __init__(self, model: nn.Module, unfreeze_blocks: int) -> None:
        super().__init__()
        self.m: Any = model
        self.start = NUM_BLOCKS - unfreeze_blocks
        self.pooled_input = unfreeze_blocks == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        if not self.pooled_input:
            for block in m._blocks[self.start :]:
                x = block(x)
            x = m._swish(m._bn1(m._conv_head(x)))
            x = torch.flatten(m._avg_pooling(x), 1)
        return m._fc(m._dropout(x))

    def parameters_to_train(self) -> list[nn.Parameter]:
        """Parameters of the unfrozen layers (BatchNorm affine parameters included)."""
        m = self.m
        mods: list[nn.Module] = [m._fc]
        if not self.pooled_input:
            mods += [*m._blocks[self.start :], m._conv_head, m._bn1]
        return [p for mod in mods for p in mod.parameters()]

    def train(self, mode: bool = True) -> Suffix:
        """Only dropout follows ``mode``; BatchNorm stays in eval mode (see module docstring)."""
        super().train(False)
        self.m._dropout.train(mode)
        self.training = mode
        return self


def build_classifier(num_classes: int, seed: int) -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights and a new, seeded ``num_classes`` head."""
    from trainer.model.pretrained import load_lite0

    model: Any = load_lite0(num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bound = 1.0 / model._fc.in_features**0.5
        model._fc.weight.uniform_(-bound, bound, generator=gen)
        model._fc.bias.zero_()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def split(model: nn.Module, unfreeze_blocks: int) -> tuple[Prefix, Suffix]:
    """Frozen prefix and trainable suffix sharing ``model``'s parameters."""
    if not 0 <= unfreeze_blocks <= NUM_BLOCKS:
        raise ValueError(f"unfreeze_blocks must be in 0..{NUM_BLOCKS}, got {unfreeze_blocks}")
    prefix, suffix = Prefix(model, unfreeze_blocks).eval(), Suffix(model, unfreeze_blocks)
    for p in suffix.parameters_to_train():
        p.requires_grad_(True)
    return prefix, suffix
