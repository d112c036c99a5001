"""Plain and residual networks of He et al. (2015) as flax.linen modules."""

from resflax.models.blocks import BasicBlock, BottleneckBlock, Shortcut
from resflax.models.registry import ModelName, available_models, get_model, model_fields, model_spec, parse_model_name
from resflax.models.resnet import ResNet, pack_blocks, unpack_blocks
from resflax.models.vgg import VGG

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "ModelName",
    "ResNet",
    "VGG",
    "Shortcut",
    "available_models",
    "get_model",
    "model_fields",
    "model_spec",
    "pack_blocks",
    "parse_model_name",
    "unpack_blocks",
]
