"""Encoders: the one interface, architectures, SimCLR, checkpoints."""
from .base import (CIFAR10_MEAN, CIFAR10_STD, Encoder, EncoderConfig, build_encoder,
                   freeze_batchnorm, frozen_copy)
from .checkpoints import CheckpointError, load_encoder, save_encoder
from .runtime import RunContext, pick_device, seed_everything, to_float
from .simclr import SimCLRConfig, contrastive_loss, nt_xent, train_simclr

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "Encoder", "EncoderConfig", "build_encoder", "freeze_batchnorm",
    "frozen_copy", "CheckpointError", "load_encoder", "save_encoder", "RunContext", "pick_device",
    "seed_everything", "to_float", "SimCLRConfig", "contrastive_loss", "nt_xent", "train_simclr",
]
