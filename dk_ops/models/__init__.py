"""The model zoo: the paper's bases and a small study net, each with a choice of operator.

>>> from dk_ops import models
>>> net = models.create("mobilenet_v2", op="dk", num_classes=10, width_mult=0.5)
>>> models.names()
['mobilenet_v2', 'resnet50_dw', 'study_net']
"""
from . import mobilenetv2, resnet, study  # noqa: F401  (registration)
from ._complexity import complexity
from ._layers import OPS, make_conv
from ._registry import TRAIN_HINTS, create, names, register_model, train_hints

__all__ = ["create", "names", "register_model", "train_hints", "TRAIN_HINTS", "complexity", "make_conv", "OPS"]
