"""What sits on top of a backbone: the projection head of contrastive pretraining and the
classifier of a transfer run."""
from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .blocks import BlockNet


class ProjectionHead(nn.Sequential):
    """Fully-connected projection of a block's (flattened) output map to an embedding.

    ``hidden=0`` gives a linear head, otherwise Linear -> BatchNorm -> ReLU -> Linear.
    """

    def __init__(self, in_features: int, out_dim: int = 128, hidden: int = 0) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        if hidden:
            layers += [nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        layers.append(nn.Linear(in_features, out_dim))
        super().__init__(*layers)

    def output_basis(self) -> torch.Tensor | None:
        """An orthonormal basis, out_dim x (in_features + 1), of the space a linear head's outputs
        lie in (spanned by its weight's columns and its bias) when that space is smaller than the
        embedding, else None. Distances and similarities of the outputs equal those of their
        coordinates in this basis, and so do a loss of them and its gradient (the gradient with
        respect to each output is a combination of outputs: it lies in the space too); a loss that
        compares all pairs of the batch costs fewer FLOPs on the coordinates. The greedy block-1 head
        (64 -> 128) has 65 of them: its InfoNCE step ~1.2-1.3x faster at batch 512 (docs/PERFORMANCE.md)."""
        linear, hidden = self[-1], len(self) > 2  # Flatten, [Linear, BatchNorm, ReLU,] Linear
        if hidden or linear.in_features + (linear.bias is not None) >= linear.out_features:
            return None
        with torch.no_grad():
            columns = linear.weight if linear.bias is None else torch.cat([linear.weight, linear.bias[:, None]], 1)
            return torch.linalg.qr(columns).Q


class Classifier(nn.Module):
    """A transferred backbone (blocks 1..k) -> new conv blocks -> fc -> fc: the paper's downstream net.

    New blocks are conv 3x3 (padding 1) -> BatchNorm -> ReLU -> max-pool 2x2 (no pooling once the
    map is 1x1), so they fit above any backbone; ``hidden=0`` drops the middle fc layer. They pool
    before the ReLU, as :class:`~contrastive_lw.model.ConvBlock` does: the same map, the ReLU on a 4x smaller one.

    Example:
        >>> from contrastive_lw.model import LayerwiseNet
        >>> clf = Classifier(LayerwiseNet().prefix(1), num_classes=10, new_widths=(512,), hidden=512)
        >>> clf(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, backbone: BlockNet, num_classes: int, new_widths: tuple[int, ...] = (512,),
                 hidden: int = 512, image_size: int = 32) -> None:
        super().__init__()
        self.backbone = backbone
        side = backbone.output_size(image_size)
        if side < 1:
            raise ConfigError(f"{image_size}x{image_size} images are smaller than the backbone's "
                              f"receptive field {backbone.receptive_field()}: transfer fewer layers")
        channels, layers = backbone.out_channels(), []
        for width in new_widths:
            pool = 2 if side >= 2 else 1
            layers.append(nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                        nn.MaxPool2d(pool), nn.ReLU(inplace=True)))
            channels, side = width, side // pool
        self.new_blocks = nn.Sequential(*layers)
        fc: list[nn.Module] = [nn.Flatten()]
        features = channels * side * side
        if hidden:
            fc += [nn.Linear(features, hidden), nn.ReLU(inplace=True)]
            features = hidden
        self.fc = nn.Sequential(*fc, nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.new_blocks(self.backbone(x)))
