"""The vessel segmentation network: a small U-Net (Ronneberger et al. 2015) of about 0.5 M parameters.

Imported only by the network path of :mod:`model.analysis.vessels` and by the training script, so the
classical path and processes that do not infer never import torch.
"""

from __future__ import annotations

import torch
from torch import nn

IN_CHANNELS = 2
WIDTHS = (16, 32, 64, 128)


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class VesselUNet(nn.Module):
    """U-Net with ``len(WIDTHS) - 1`` poolings; input sides must be multiples of ``2 ** (len(WIDTHS) - 1)``.
    Output: one logit per pixel (vessel)."""

    def __init__(self, in_channels: int = IN_CHANNELS, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_Block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
            self.merge.append(_Block(2 * w, w))
            cin = w
        self.head = nn.Conv2d(cin, 1, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1]), strict=True):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


MULTIPLE = 2 ** (len(WIDTHS) - 1)
