"""Downstream protocols: how the downstream task uses the encoder, and so how ACC and ASR are measured.

- ``mlp`` (the default, the papers' reference probe): :mod:`.evaluate`. Its evaluate stages are planned
  exactly as before (no ``protocol`` entry in their spec), so their keys and numbers do not move.
- ``linear``: one linear layer on the frozen L2-normalised features, trained as the MLP probe is (the
  profile's ``evaluate`` epochs, lr, batch size and seed rule): only the probe's capacity differs.
- ``knn``: no training. Each test feature (L2-normalised) takes the ``knn_k`` = 200 training features of
  highest cosine; each votes ``exp(cos / knn_temperature)`` for its label; the class with the largest vote
  wins. This is the weighted kNN monitor of InstDisc that SimCLR/MoCo code and BadEncoder's
  ``knn_predict`` use during training, with BadEncoder's temperature 0.5 (``--knn-t``).
- ``finetune``: the whole encoder and a linear head on its L2-normalised feature trained together on the
  task's training images (cross-entropy, Adam at ``finetune_lr``, random horizontal flips, batch
  ``finetune_batch_size``) for ``finetune_epochs``: a short schedule, what a user who fine-tunes does.
- ``zeroshot``: a CLIP tower whose file holds its text tower: class c is the text embedding of
  ``prompt.format(name of c)``, an image the class of highest cosine with its image embedding. No training;
  needs the dataset's class names.

ASR is measured as for the MLP probe: trigger-stamped test images classified as the target, over all test
images and excluding the target class's own. Every result row records its protocol.
"""
from __future__ import annotations

import dataclasses
import torch
import torch.nn.functional as F
from torch import nn

from ...core import UserError
from ...encoders import to_float
from ...encoders.augment import horizontal_flip
from . import evaluate as evaluation
from .settings import DEFAULT_PROTOCOL as DEFAULT, PROTOCOLS, ProtocolSettings


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; use one of {', '.join(PROTOCOLS)}")
    return name


def spec_entry(name: str, settings: ProtocolSettings) -> dict | None:
    """What an evaluate stage's spec records of its protocol: None for ``mlp`` (its keys stay as they were),
    else the name and the settings that protocol uses."""
    check_protocol(name)
    fields = {"mlp": (), "linear": (), "knn": ("knn_k", "knn_temperature"),
              "finetune": ("finetune_epochs", "finetune_lr", "finetune_batch_size"), "zeroshot": ("prompt",)}[name]
    if name == DEFAULT:
        return None
    values = dataclasses.asdict(settings)
    return {"name": name, **{f: values[f] for f in fields}}


# ----------------------------------------------------------------- the protocols

def knn_predict(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, classes: int, k: int,
                temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN vote on L2-normalised features (InstDisc / BadEncoder's monitor): the top-k cosine
    neighbours each add ``exp(cos / temperature)`` to their class; the highest total wins."""
    k = min(k, len(train))
    out = []
    for part in test.split(chunk):
        sims, index = (part @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(part), classes, dtype=sims.dtype)
        votes.scatter_add_(1, labels[index], (sims / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out)


def train_linear(features: torch.Tensor, labels: torch.Tensor, classes: int, cfg, ctx) -> nn.Module:
    """A linear probe trained exactly as the MLP probe (:func:`.evaluate.train_probe`: Adam, epochs, batches)."""
    probe = nn.Linear(features.shape[1], classes).to(ctx.device)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr)
    x, y = features.to(ctx.device), labels.to(ctx.device)
    for _ in ctx.progress(range(cfg.epochs), desc="linear probe", total=cfg.epochs):
        for idx in ctx.batches(len(x), cfg.batch_size, shuffle=True, drop_last=False):
            loss = F.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return probe.eval()


class FineTuned(nn.Module):
    """The encoder with a linear head on its L2-normalised feature: the whole classifier a user fine-tunes."""

    def __init__(self, encoder, classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.feature_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.encoder.features(x), dim=1))


def finetune(encoder, train, classes: int, entry: dict, ctx) -> FineTuned:
    model = FineTuned(encoder, classes).to(ctx.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=entry["finetune_lr"])
    batch = min(entry["finetune_batch_size"], len(train.images))
    labels = train.labels.to(ctx.device)
    for _ in ctx.progress(range(entry["finetune_epochs"]), desc="finetune", total=entry["finetune_epochs"]):
        for idx in ctx.batches(len(train.images), batch, shuffle=True, drop_last=len(train.images) > batch):
            x = horizontal_flip(to_float(train.images[idx.to(train.images.device)], ctx.device))
            loss = F.cross_entropy(model(x), labels[idx.to(labels.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, ctx, batch: int, trigger=None) -> torch.Tensor:
    out = []
    for chunk in images.split(batch):
        x = to_float(chunk, ctx.device)
        out.append(model(trigger.apply(x) if trigger is not None else x).argmax(1).cpu())
    return torch.cat(out)


def class_prompts(dataset, prompt: str) -> list[str]:
    if not dataset.classes:
        raise UserError(f"zero-shot evaluation needs class names, and {dataset.name} has none; use another protocol")
    return [prompt.format(name.replace("_", " ")) for name in dataset.classes]


def run(entry: dict, encoder, train, test, trigger, target, cfg, ctx, features, text_tower=None) -> dict:
    """ACC/ASR of ``encoder`` on one task under protocol ``entry`` (:func:`spec_entry`).

    ``features(which)`` gives the cached L2-normalised features of ``"train"``, ``"test"`` or ``"triggered"``
    (the stamped test images);
    ``text_tower`` is the CLIP text tower (zero-shot only)."""
    name = entry["name"]
    classes = max(train.num_classes, test.num_classes)
    if name == "finetune":
        model = finetune(encoder, train, classes, entry, ctx)
        pred = classify(model, test.images, ctx, cfg.feature_batch)
        pred_trig = classify(model, test.images, ctx, cfg.feature_batch, trigger) if trigger is not None else None
        return evaluation.score(pred, pred_trig, test.labels, target)
    f_test = features("test")
    f_trig = features("triggered") if trigger is not None else None
    if name == "zeroshot":
        if text_tower is None:
            raise UserError("zero-shot evaluation needs a CLIP tower whose file holds its text tower (an open_clip / "
                            "OpenAI CLIP or Hugging Face CLIPModel file); this encoder has none")
        text = text_tower.to(ctx.device).encode(class_prompts(test, entry["prompt"])).cpu()
        if text.shape[1] != f_test.shape[1]:
            raise UserError(f"the text tower embeds into {text.shape[1]} dimensions, the image feature has "
                            f"{f_test.shape[1]}; zero-shot needs the tower's image projection")
        nearest = lambda f: (f @ text.t()).argmax(1)  # noqa: E731
        return evaluation.score(nearest(f_test), None if f_trig is None else nearest(f_trig), test.labels, target)
    f_train = features("train")
    if name == "knn":
        predict = lambda f: knn_predict(f_train, train.labels, f, classes, entry["knn_k"],  # noqa: E731
                                        entry["knn_temperature"])
    elif name == "linear":
        probe = train_linear(f_train, train.labels, classes, cfg, ctx)
        predict = lambda f: evaluation.predict(probe, f, ctx.device)  # noqa: E731
    else:
        raise UserError(f"protocol {name!r} has no runner here")
    return evaluation.score(predict(f_test), None if f_trig is None else predict(f_trig), test.labels, target)
