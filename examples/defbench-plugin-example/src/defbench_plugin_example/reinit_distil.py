"""Re-initialise the last stage and distil: a defense contributed from outside defbench.

A backdoored encoder maps triggered inputs to the target's embedding, and
much of that mapping lives in the deepest stage (BadEncoder fine-tunes it the
most; a trigger is a local pattern that only the late, wide receptive fields
turn into a whole-image embedding). This defense throws that stage away and
re-learns it from clean data only:

1. student = the suspect encoder with its last ``stages`` stage(s) (layer4
   of ResNet-18 by default) re-initialised at random; the earlier stages
   keep their weights and stay frozen unless ``train_all``;
2. distil: on two augmented views of every clean image, the student's
   backbone feature is pulled towards the suspect's (frozen teacher, eval
   mode, no gradients) with ``1 - cos``, plus ``lambda_contrastive`` times
   the student's own NT-Xent on the two views (keeps the representation
   spread out where the teacher is poor).

The clean images only ever show the re-initialised stage how the suspect
treats clean inputs, so the trigger -> target mapping is not re-learnt.
Label-free; every hyper-parameter is fixed (no selection by ASR).

Reference defaults ("paper" column): 100 epochs of Adam lr 1e-3, weight
decay 1e-6, batch 256 (the MIMIC-style distillation recipe), one stage
re-initialised, NT-Xent weight 1, temperature 0.5.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defbench.defenses import register_defense
from defbench.defenses.losses import cosine_distance, nt_xent
from defbench.encoders import freeze_batchnorm, frozen_copy, to_float
from defbench.encoders.augment import SimCLRAugment


@dataclass
class ReinitDistilConfig:
    stages: int = 1  # how many of the last stages to re-initialise
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    lambda_contrastive: float = 1.0
    temperature: float = 0.5
    train_all: bool = False  # also fine-tune the earlier stages (else they stay frozen)


def last_stage_modules(encoder, n: int):
    """The backbone submodules of the last ``n`` stages (stage names are module names in ResNet-18)."""
    names = list(encoder.stage_names)
    if not 1 <= n <= len(names):
        raise ValueError(f"reinit-distil: stages must be between 1 and {len(names)}, got {n}")
    modules = []
    for name in names[-n:]:
        module = getattr(encoder.backbone, name, None)
        if module is None:
            raise ValueError(f"reinit-distil: the backbone has no submodule named after stage {name!r}")
        modules.append(module)
    return modules


def reinitialise(modules) -> int:
    """Fresh random weights (and BatchNorm statistics) for every layer in ``modules``; returns the count."""
    count = 0
    for module in modules:
        for layer in module.modules():
            if layer is not module and hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
                count += 1
    return count


@register_defense("reinit-distil", config=ReinitDistilConfig,
                  summary="re-initialise the last stage, then distil the suspect's clean features into it",
                  profiles={"paper": {},
                            "tiny": {"epochs": 20, "batch_size": 128},
                            "ci": {"epochs": 5, "batch_size": 128}})
def reinit_distil(encoder, clean, cfg: ReinitDistilConfig, ctx):
    teacher = frozen_copy(encoder).to(ctx.device)
    student = encoder.to(ctx.device)
    fresh = last_stage_modules(student, cfg.stages)
    ctx.record("reinitialised_layers", reinitialise(fresh))
    student.train()
    if not cfg.train_all:
        for p in student.backbone.parameters():
            p.requires_grad_(False)
        freeze_batchnorm(student.backbone)  # the kept stages: eval-mode BatchNorm too
        for module in fresh:
            module.train()
            for p in module.parameters():
                p.requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = SimCLRAugment()
    batch_size = min(cfg.batch_size, len(clean))
    history = []
    for _ in ctx.progress(range(cfg.epochs), desc="reinit-distil", total=cfg.epochs):
        total, batches = 0.0, ctx.batches(len(clean), batch_size)
        for idx in batches:
            x = to_float(clean.images[idx], ctx.device)
            views = torch.cat([augment(x), augment(x)])
            feats = student.features(views)
            with torch.no_grad():
                target = teacher.features(views)
            loss = cosine_distance(feats, target)
            if cfg.lambda_contrastive:
                loss = loss + cfg.lambda_contrastive * nt_xent(*student.head(feats).chunk(2), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total / max(1, len(batches)))
    ctx.record("distil_loss", history)
    with torch.no_grad():  # how close the student ends to the suspect on clean images (label-free)
        x = to_float(clean.images[:512], ctx.device)
        student.eval()
        cosine = F.cosine_similarity(student.features(x), teacher.features(x)).mean().item()
        ctx.record("clean_cosine_to_suspect", cosine)
    for p in student.parameters():
        p.requires_grad_(True)
    return student.eval()
