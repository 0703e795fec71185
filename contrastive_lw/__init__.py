"""contrastive-lw: layer-wise contrastive pretraining of convolutional networks, and transfer."""
from .checkpoint import load_backbone
from .model import ArchConfig, ConvBlock, LayerwiseNet, ProjectionHead

__all__ = ["ArchConfig", "ConvBlock", "LayerwiseNet", "ProjectionHead", "load_backbone"]
__version__ = "0.1.0"
