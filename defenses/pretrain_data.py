"""The opt-in second input of a defense: the suspect's pre-training data.

Most defenses see only the defender's small clean set. A defense whose threat model gives the
defender the (unlabelled) data the suspect was pre-trained on -- PatchSearch: the victim trained
the model itself on data it scraped, some of it poisoned -- declares it at registration::

    @register_defense("mydefense", config=..., summary=..., needs_pretrain_data=True)
    def mydefense(encoder, clean, cfg, ctx, *, pretrain: PretrainData):
        ...

and only such a defense is called with ``pretrain=``. For a suspect made by a data-poisoning
attack (BASSL, CTRL, CorruptEncoder) it holds the *poisoned* pre-training set the suspect was
trained on; for a model-poisoning attack (BadEncoder), a clean encoder or an imported checkpoint,
the clean pre-training split. The images come in a seeded random order, with no labels and nothing
saying which are poisoned. ``recipe`` is the victim's pre-training recipe (the profile's SimCLR
settings), for a defense that re-trains.

A defense that filters the set records the indices (into ``pretrain.images``) it removed as
``ctx.record(REMOVED_RECORD, [...])``; the harness then adds to the stage's result how many of
them were poisons, a number the defense itself never sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..encoders import SimCLRConfig

OPTION = "needs_pretrain_data"  # the register_defense(...) flag
REMOVED_RECORD = "pretrain_removed"  # ctx.record key: indices of the pre-training images a defense removed


@dataclass(frozen=True)
class PretrainData:
    """The suspect's pre-training set as the defender holds it: unlabelled uint8 images, N x 3 x H x W, in a
    random order, and the victim's pre-training recipe."""
    images: torch.Tensor
    recipe: SimCLRConfig

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError("PretrainData.images must be uint8 N x 3 x H x W")

    def __len__(self) -> int:
        return len(self.images)


def needs_pretrain_data(component) -> bool:
    """Whether a registered defense asked for the suspect's pre-training data."""
    return bool(component.options.get(OPTION, False))
