"""MIMIC (the seed paper): mutual-information-guided distillation into a fresh student.

On the defender's clean set only:

1. for each stage l (layer1..layer4) a MINE statistics network (``defenses/mutual_information.py``) estimates the
   Donsker-Varadhan bound of ``I(f_l(x); f(x))`` (stage output vs L2-normalised feature, test
   transform, eval mode) on the network ``mi_source`` names: ``"student"`` (default, every profile), the
   freshly initialised student before any training, where the authors' code measures it (``MIMIC.py``
   ``scheduler.estimate_mi(student, ...)``); ``"teacher"``, the suspect, as the paper's text describes;
   ``MI_l`` = mean of the last ``mi_last`` epochs, negative/NaN -> 0;
2. ``beta_l = alpha0 + alpha1 * MI_l / sum_k MI_k`` once (uniform shares if every MI is 0;
   ``use_mi=False``: ``alpha0 + alpha1 / L``);
3. distillation into ``encoder.empty_like()`` with the suspect frozen as teacher (eval, no grad):
   ``lambda0*L0 + lambda1*L1 + lambda2*sum_l beta_l*AT_l``, ``L0 = -mean cos(f_S(v1), f_T(v1))``,
   ``L1 = NT-Xent(g_S(v1), g_S(v2))``, ``AT_l`` the attention loss of ``defenses/losses.py`` in the
   form ``attention_form`` ("code": the authors' MSE, default; "eq6": the paper's Eq. 6).
   The student runs once per view (each view its own BatchNorm batch, as the reference); the teacher runs
   once on ``v1`` (``distill_input="clean"``: on the un-augmented image).

Records ``mi``, ``mi_raw``, ``beta``, ``loss_history`` (per epoch [L0, L1, L2], null for a term switched
off) and ``seconds``.

Parity with the reference: docs/methods/mimic.md
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..encoders import Encoder, RunContext, frozen_copy, to_float
from ..encoders.augment import SimCLRAugment
from .base import CleanData, Measurement, register_defense, register_measurement
from .losses import ATTENTION_FORMS, attention_loss, nt_xent
from .mutual_information import MINEConfig, estimate_mi, mine_input


@dataclass
class MIMICConfig:
    # distillation
    epochs: int = 1000
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-6
    temperature: float = 0.5
    lambda0: float = 1.0  # clone (L0)
    lambda1: float = 1.0  # contrastive (L1)
    lambda2: float = 1.0  # attention (L2), multiplies the beta-weighted sum
    p: float = 2.0  # attention-map exponent
    attention_form: str = "code"  # "code": MSE of the normalised maps (authors' AT); "eq6": the paper's L2 norm
    distill_input: str = "view"  # "view": L0/L2 on the first augmented view (authors' code); "clean": un-augmented
    # ablation switches (the paper's Figure 8)
    use_clone: bool = True
    use_contrastive: bool = True
    use_attention: bool = True
    use_mi: bool = True  # False: uniform beta_l = alpha0 + alpha1 / L
    # weight scheduler
    alpha0: float = 1000.0
    alpha1: float = 10000.0
    # MI localisation (MINE)
    mi_source: str = "student"  # "student": the fresh student (the authors' code); "teacher": the suspect (paper text)
    mi_epochs: int = 200
    mi_batch_size: int = 128
    mi_lr: float = 1e-3
    mi_weight_decay: float = 1e-5
    mi_hidden: int = 512
    mi_last: int = 10
    mi_pool: int = 0  # 0: flattened stage output (reference); k > 0: adaptive avg-pool to k x k first
    mi_eval_pass: bool = True  # per-epoch estimate from a separate pass (reference); False: the training batches'

    def validate(self) -> None:
        if self.distill_input not in ("view", "clean"):
            raise ValueError(f"mimic.distill_input must be 'view' or 'clean', got {self.distill_input!r}")
        if self.mi_source not in ("teacher", "student"):
            raise ValueError(f"mimic.mi_source must be 'teacher' or 'student', got {self.mi_source!r}")
        if not (self.use_clone or self.use_contrastive or self.use_attention):
            raise ValueError("mimic: every loss term is switched off (use_clone/use_contrastive/use_attention)")
        if self.attention_form not in ATTENTION_FORMS:
            raise ValueError(f"mimic.attention_form must be one of {ATTENTION_FORMS}, got {self.attention_form!r}")
        if self.mi_pool < 0:
            raise ValueError("mimic.mi_pool must be >= 0 (0: flattened stage output)")

    def mine(self) -> MINEConfig:
        return MINEConfig(epochs=self.mi_epochs, batch_size=self.mi_batch_size, lr=self.mi_lr,
                          weight_decay=self.mi_weight_decay, hidden=self.mi_hidden, last=self.mi_last,
                          eval_pass=self.mi_eval_pass)


# ----------------------------------------------------------------- MI localisation

@torch.no_grad()
def stage_table(encoder: Encoder, images: torch.Tensor, device, pool: int = 0,
                batch_size: int = 256) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every stage output (flattened, optionally pooled to ``pool x pool``) and the L2-normalised
    feature of ``encoder`` in eval mode on uint8 ``images``; one forward pass per batch."""
    was_training = encoder.training
    encoder.eval()
    stages: dict[str, list[torch.Tensor]] = {name: [] for name in encoder.stage_names}
    feats = []
    for chunk in images.split(batch_size):
        out = encoder.stages(to_float(chunk, device))
        for name in stages:
            stages[name].append(mine_input(out[name], pool))
        feats.append(F.normalize(out["feature"].float(), dim=1))
    encoder.train(was_training)
    return {k: torch.cat(v) for k, v in stages.items()}, torch.cat(feats)


def estimate_stage_mi(encoder: Encoder, images: torch.Tensor, cfg: MIMICConfig,
                      ctx: RunContext, tag: str = "") -> dict[str, dict]:
    """MINE estimate of I(stage output; feature) for every stage: {layer: {"mi", "raw", "history"}}.
    Layer i's MINE batches come from the same seed on every call (e.g. clean and triggered images)."""
    table, feature = stage_table(encoder, images, ctx.device, cfg.mi_pool)
    out = {}
    for i, (name, a) in enumerate(table.items()):
        gen = torch.Generator().manual_seed(ctx.seed * 1009 + i + 1)
        res = estimate_mi(a, feature, cfg.mine(), generator=gen, progress=ctx.progress,
                          desc=" ".join(filter(None, ("mine", tag, name))))
        out[name] = {"mi": res.mi, "raw": res.raw, "history": res.history}
        ctx.logger.debug("mimic: MI(%s; feature) = %.4f (raw %.4f, input %d-d)", name, res.mi, res.raw, a.shape[1])
    return out


def mi_weights(mi: dict[str, float], alpha0: float, alpha1: float) -> dict[str, float]:
    """beta_l = alpha0 + alpha1 * MI_l / sum MI; uniform shares when every MI is 0."""
    total = sum(mi.values())
    if not total > 0:
        return uniform_weights(list(mi), alpha0, alpha1)
    return {k: alpha0 + alpha1 * v / total for k, v in mi.items()}


def uniform_weights(layers, alpha0: float, alpha1: float) -> dict[str, float]:
    layers = list(layers)
    return {k: alpha0 + alpha1 / len(layers) for k in layers}


# ----------------------------------------------------------------- distillation

def mimic_loss(student: Encoder, teacher: Encoder, v1: torch.Tensor, v2: torch.Tensor,
               beta: dict[str, float], cfg: MIMICConfig, x: torch.Tensor | None = None):
    """One step's loss. Returns (total, parts) with parts = {"l0", "l1", "l2", "at_<layer>"} (detached;
    ``l2`` is the beta-weighted attention sum, absent terms are missing). The student runs once per input it
    needs, so in train mode each view is its own BatchNorm batch (the reference's ``snet(im_1)``,
    ``snet(im_2)``; one pass over both views would normalise over 2B images); the teacher runs once (no grad)
    on the distillation input."""
    needs_teacher = cfg.use_clone or cfg.use_attention
    on_clean = cfg.distill_input == "clean" and needs_teacher
    if on_clean and x is None:
        raise ValueError("distill_input='clean' needs the un-augmented batch x")
    inputs = {"x": x, "v1": v1, "v2": v2}
    names = (["x"] if on_clean else []) + (["v1"] if cfg.use_contrastive or (needs_teacher and not on_clean) else [])
    names += ["v2"] if cfg.use_contrastive else []
    s = {name: student.stages(inputs[name]) for name in names}

    total = v1.new_zeros(())
    parts: dict[str, torch.Tensor] = {}
    if cfg.use_contrastive:
        l1 = nt_xent(student.head(s["v1"]["feature"]), student.head(s["v2"]["feature"]), cfg.temperature)
        total = total + cfg.lambda1 * l1
        parts["l1"] = l1.detach()
    if needs_teacher:
        d = s["x" if on_clean else "v1"]
        with torch.no_grad():
            t = teacher.stages(x if on_clean else v1)
        if cfg.use_clone:
            l0 = -F.cosine_similarity(d["feature"], t["feature"], dim=1).mean()
            total = total + cfg.lambda0 * l0
            parts["l0"] = l0.detach()
        if cfg.use_attention:
            l2 = v1.new_zeros(())
            for name, weight in beta.items():
                at = attention_loss(d[name], t[name], cfg.p, cfg.attention_form)
                l2 = l2 + weight * at
                parts[f"at_{name}"] = at.detach()
            total = total + cfg.lambda2 * l2
            parts["l2"] = l2.detach()
    return total, parts


def distill_optimizer(student: Encoder, cfg: MIMICConfig) -> torch.optim.Optimizer:
    """Adam over every parameter of the student (backbone and head), as the reference."""
    return torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def _forked_rng(device: torch.device):
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def distill(student: Encoder, teacher: Encoder, images: torch.Tensor, beta: dict[str, float],
            cfg: MIMICConfig, ctx: RunContext) -> list[list[float]]:
    """Train ``student`` in place; returns per-epoch means of [L0, L1, L2] (None for a switched-off term:
    a NaN there would read as a diverged training)."""
    student.train()
    teacher.eval()
    opt = distill_optimizer(student, cfg)
    augment = SimCLRAugment()
    batch_size = min(cfg.batch_size, len(images))
    history = []
    for epoch in ctx.progress(range(cfg.epochs), desc="mimic", total=cfg.epochs):
        sums: dict[str, float] = {}
        batches = ctx.batches(len(images), batch_size)
        for idx in batches:
            x = to_float(images[idx], ctx.device)
            loss, parts = mimic_loss(student, teacher, augment(x), augment(x), beta, cfg, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        n = max(1, len(batches))
        history.append([sums[k] / n if k in sums else None for k in ("l0", "l1", "l2")])
        ctx.logger.debug("mimic epoch %d %s", epoch, {k: round(v / n, 5) for k, v in sums.items()})
    return history


@register_defense(
    "mimic", config=MIMICConfig,
    summary="MI-guided distillation of the suspect encoder into a fresh student (clone + NT-Xent + attention)",
    profiles={"tiny": {"epochs": 40, "lr": 1e-3, "mi_epochs": 50, "mi_hidden": 128},
              "ci": {"epochs": 4, "lr": 1e-3, "mi_epochs": 10, "mi_hidden": 128}},
    budget=("epochs",), cost=("mi_epochs",))
def mimic(encoder: Encoder, clean: CleanData, cfg: MIMICConfig, ctx: RunContext) -> Encoder:
    cfg.validate()
    encoder = encoder.to(ctx.device)
    student = encoder.empty_like()  # random init before anything else touches the RNG
    teacher = frozen_copy(encoder)
    layers = list(teacher.stage_names)
    seconds = {"mi": 0.0}

    if cfg.use_attention and cfg.use_mi:
        started = time.perf_counter()
        source = teacher if cfg.mi_source == "teacher" else student
        with _forked_rng(ctx.device):
            est = estimate_stage_mi(source, clean.images, cfg, ctx)
        student.train()
        mi = {k: v["mi"] for k, v in est.items()}
        ctx.record("mi", mi)
        ctx.record("mi_raw", {k: v["raw"] for k, v in est.items()})
        beta = mi_weights(mi, cfg.alpha0, cfg.alpha1)
        seconds["mi"] = time.perf_counter() - started
    elif cfg.use_attention:
        beta = uniform_weights(layers, cfg.alpha0, cfg.alpha1)
    else:
        beta = {}
    if beta:
        ctx.record("beta", beta)
        ctx.logger.info("mimic: beta %s", {k: round(v, 1) for k, v in beta.items()})

    started = time.perf_counter()
    history = distill(student, teacher, clean.images, beta, cfg, ctx)
    seconds["distill"] = time.perf_counter() - started
    ctx.record("loss_history", history)
    ctx.record("seconds", seconds)
    return student.eval()


# ----------------------------------------------------------------- the studies' measurement (Fig. 4)

def _mi_settings(cfg: MIMICConfig) -> dict:
    """The MINE fields of MIMIC's config: what the measurement's result depends on."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("mi_") and k != "mi_source"}


def _stage_mi(encoder: Encoder, inputs: dict[str, torch.Tensor], settings: dict, ctx: RunContext) -> dict:
    """MIMIC's estimate of I(stage; feature) per stage, for each named set of images (clean, triggered)."""
    cfg = MIMICConfig(**settings)
    result = {name: {layer: est["mi"] for layer, est in estimate_stage_mi(encoder, images, cfg, ctx, name).items()}
              for name, images in inputs.items()}
    ctx.record("mi", result)
    return {"mi": result, "n_images": len(next(iter(inputs.values())))}


register_measurement(Measurement(
    "stage-mi", _stage_mi, defense="mimic", settings_of=_mi_settings,
    summary="MINE estimate of I(stage output; feature) per stage, on clean and on triggered images (Fig. 4)"))
