"""Plain and residual networks of He et al. (2015) as flax.linen modules."""

from resflax.models.blocks import BasicBlock, BottleneckBlock, Shortcut
from resflax.models.registry import available_models, get_model, model_spec
from resflax.models.resnet import ResNet, pack_blocks, unpack_blocks

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ResNet",
    "Shortcut",
    "available_models",
    "get_model",
    "model_spec",
    "pack_blocks",
    "unpack_blocks",
]
