"""Kept importable: saved checkpoints, models and recipes name ``ghostify.reference:resnet20`` (and
``vgg_small``, ``resnet56``, ``vgg16_cifar``). The definitions live in :mod:`ghostify.zoo.reference`;
the training script that made ``checkpoints/`` is ``benchmarks/train_reference.py``.
"""
from .zoo.reference import (ARCHS, BUILDERS, BasicBlock, CifarResNet, VGGSmall, resnet20, resnet56,  # noqa: F401
                            vgg16_cifar, vgg_small)

__all__ = ["CifarResNet", "BasicBlock", "VGGSmall", "resnet20", "vgg_small", "resnet56", "vgg16_cifar", "ARCHS",
           "BUILDERS"]
