"""DeDe: a decoder that reconstructs an image from the suspect's embedding screens out triggered inputs.

On the defender's clean images only (the suspect frozen, eval mode, its features computed once on the
un-augmented images): a masked-autoencoder-style decoder (a ViT patch encoder over the few visible patches
whose global token is replaced by a linear map of the suspect's feature, and a ViT decoder that fills in
the masked patches) is trained with Adam to reconstruct the normalised image, MSE on the masked patches
(``mask_ratio`` of them masked). A held-out share of the clean images (``holdout``) calibrates the
threshold: a high quantile (or ``factor`` x the mean) of their reconstruction errors with
``test_mask_ratio`` of the patches masked. The result is the suspect unchanged, wrapped as a
:class:`~defbench.encoders.screening.ScreenedEncoder`: an input whose error is above the threshold is
rejected (how the evaluation counts rejections: docs/methods/dede.md).

Records ``dede_loss`` (mean training loss per chunk of steps), the threshold, and the held-out errors'
summary.

Parity with the reference: docs/methods/dede.md
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..encoders import Encoder, RunContext, to_float
from ..encoders.screening import ScreenedEncoder, register_screen
from .base import CleanData, register_defense

THRESHOLD_RULES = ("quantile", "mean-factor")


@dataclass
class DeDeConfig:
    # the decoder (tardisblue9/DeDe src/main.py arguments, src/decoder_model.py DecoderModel)
    patch_size: int = 4
    emb_dim: int = 192
    encoder_layers: int = 12
    encoder_heads: int = 3
    decoder_layers: int = 4
    decoder_heads: int = 3
    mask_ratio: float = 0.9  # training
    test_mask_ratio: float = 0.99  # detection (src/downstream_evaluation.py)
    # training: the reference's 200 epochs x 195 batches of 256 over 50,000 images, as a number of updates
    steps: int = 39000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    # the threshold, from clean images the decoder did not train on
    holdout: float = 0.1
    threshold_rule: str = "quantile"  # "quantile": the `quantile` of held-out errors; "mean-factor": factor x mean
    quantile: float = 0.95  # a 5% false-rejection rate on clean held-out images
    factor: float = 1.5
    eval_batch_size: int = 512

    def validate(self) -> None:
        if self.emb_dim % self.encoder_heads or self.emb_dim % self.decoder_heads:
            raise ValueError(f"dede.emb_dim ({self.emb_dim}) must be divisible by encoder_heads and decoder_heads")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"dede.mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 < self.test_mask_ratio <= 1:
            raise ValueError(f"dede.test_mask_ratio must be in (0, 1], got {self.test_mask_ratio}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"dede.holdout must be in (0, 1): a share of the clean images, got {self.holdout}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"dede.threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, "
                             f"got {self.threshold_rule!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"dede.quantile must be in (0, 1), got {self.quantile}")
        if self.factor <= 0:
            raise ValueError(f"dede.factor must be > 0, got {self.factor}")
        for name in ("patch_size", "emb_dim", "encoder_layers", "encoder_heads", "decoder_layers", "decoder_heads",
                     "steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"dede.{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------- the decoder

class Block(nn.Module):
    """Pre-norm transformer block (timm's ``Block`` defaults: MLP ratio 4, GELU, no qkv bias)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DeDeDecoder(nn.Module):
    """Reconstructs a normalised image from the suspect's feature and the visible patches.

    ``config``: image_size, patch_size, feature_dim, emb_dim, encoder/decoder layers and heads,
    test_mask_ratio, mean, std (the suspect's normalisation), mask_seed (which patches stay visible at
    detection, the same for every image)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        p, dim = c["patch_size"], c["emb_dim"]
        self.side = c["image_size"] // p
        self.tokens = self.side ** 2
        # patch encoder (visible patches + a global token, which the suspect's feature replaces)
        self.patchify = nn.Conv2d(3, dim, p, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.enc_pos = nn.Parameter(torch.zeros(1, self.tokens, dim))
        self.encoder = nn.Sequential(*[Block(dim, c["encoder_heads"]) for _ in range(c["encoder_layers"])])
        self.enc_norm = nn.LayerNorm(dim)
        self.embed = nn.Linear(c["feature_dim"], dim, bias=False)
        # decoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dec_pos = nn.Parameter(torch.zeros(1, self.tokens + 1, dim))
        self.decoder = nn.Sequential(*[Block(dim, c["decoder_heads"]) for _ in range(c["decoder_layers"])])
        self.out = nn.Linear(dim, 3 * p * p)
        for tensor in (self.cls_token, self.enc_pos, self.mask_token, self.dec_pos):
            nn.init.trunc_normal_(tensor, std=0.02)
        self.register_buffer("_mean", torch.tensor(c["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(c["std"]).view(1, 3, 1, 1), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._mean) / self._std

    def patches(self, x_norm: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x T x (3 p p), channel-major within a patch."""
        b, p, s = len(x_norm), self.config["patch_size"], self.side
        return x_norm.reshape(b, 3, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, 3 * p * p)

    def forward(self, x_norm: torch.Tensor, features: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Predicted patches (B x T x 3pp) from the normalised image, the suspect's features and the indices of
        the visible patches (B x V, V may be 0)."""
        b, dim = len(x_norm), self.config["emb_dim"]
        tokens = self.patchify(x_norm).flatten(2).transpose(1, 2) + self.enc_pos
        shown = torch.gather(tokens, 1, visible.unsqueeze(-1).expand(-1, -1, dim))
        encoded = self.enc_norm(self.encoder(torch.cat([self.cls_token.expand(b, -1, -1), shown], 1)))
        glob = self.embed(features).unsqueeze(1)  # replaces the global token's output
        full = torch.scatter(self.mask_token.expand(b, self.tokens, dim), 1,
                             visible.unsqueeze(-1).expand(-1, -1, dim), encoded[:, 1:])
        decoded = self.decoder(torch.cat([glob, full], 1) + self.dec_pos)
        return self.out(decoded[:, 1:])

    def detection_visible(self, batch: int, device) -> torch.Tensor:
        """The visible patches at detection: int(T (1 - test_mask_ratio)) of them, the same for every image."""
        keep = int(self.tokens * (1 - self.config["test_mask_ratio"]))
        order = torch.randperm(self.tokens, generator=torch.Generator().manual_seed(self.config["mask_seed"]))
        return order[:keep].sort().values.to(device).expand(batch, -1)

    @torch.no_grad()
    def score(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction error of each image: the sum of squared errors over its masked patches."""
        x_norm = self.normalise(x)
        visible = self.detection_visible(len(x), x.device)
        masked = torch.ones(len(x), self.tokens, device=x.device).scatter(1, visible, 0.0)
        error = (self(x_norm, features, visible) - self.patches(x_norm)).square().sum(-1)
        return (error * masked).sum(1)


register_screen("dede", DeDeDecoder)


# ----------------------------------------------------------------- training and calibration

@torch.no_grad()
def _features(encoder: Encoder, images: torch.Tensor, batch: int, ctx: RunContext) -> torch.Tensor:
    return torch.cat([encoder.features(to_float(chunk, ctx.device)) for chunk in images.split(batch)])


@torch.no_grad()
def _errors(decoder: DeDeDecoder, images: torch.Tensor, features: torch.Tensor, batch: int,
            ctx: RunContext) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder.score(to_float(x, ctx.device), f)
                      for x, f in zip(images.split(batch), features.split(batch))]).cpu()


def random_visible(n: int, tokens: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """The visible patches of ``n`` images (n x keep): the first ``keep`` of a random permutation of the ``tokens``
    patches per image (the reference's ``PatchShuffle``)."""
    return torch.rand(n, tokens, generator=generator).argsort(1)[:, :keep]


def train_decoder(decoder: DeDeDecoder, images: torch.Tensor, features: torch.Tensor, cfg: DeDeConfig,
                  ctx: RunContext, monitor: Callable[[float], None] | None = None) -> list[float]:
    """``cfg.steps`` Adam updates on random batches; ``mask_ratio`` of each image's patches masked at random.
    Returns the mean loss over each of (at most) 50 equal chunks of the run; ``monitor(loss)`` is called after
    every update, the gradients still in place (the reference-trace test reads them)."""
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    keep = int(decoder.tokens * (1 - cfg.mask_ratio))
    batch = min(cfg.batch_size, len(images))
    chunk = max(1, math.ceil(cfg.steps / 50))
    history, running, step = [], [], 0
    decoder.train()
    bar = iter(ctx.progress(range(cfg.steps), desc="dede decoder", total=cfg.steps))
    while step < cfg.steps:
        for idx in ctx.batches(len(images), batch, shuffle=True, drop_last=True):
            if step == cfg.steps:
                break
            x_norm = decoder.normalise(to_float(images[idx], ctx.device))
            visible = random_visible(len(idx), decoder.tokens, keep, ctx.generator).to(ctx.device)
            masked = torch.ones(len(idx), decoder.tokens, device=ctx.device).scatter(1, visible, 0.0)
            error = (decoder(x_norm, features[idx.to(features.device)], visible) - decoder.patches(x_norm)).square()
            loss = (error * masked.unsqueeze(-1)).mean() / cfg.mask_ratio
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append(loss.item())
            if monitor is not None:
                monitor(running[-1])
            step += 1
            next(bar, None)
            if len(running) == chunk or step == cfg.steps:
                history.append(sum(running) / len(running))
                running = []
    decoder.eval()
    return history


def threshold_of(errors: torch.Tensor, cfg: DeDeConfig) -> float:
    """The rejection threshold from clean held-out errors: their ``quantile``, or ``factor`` x their mean."""
    errors = errors.double()
    if cfg.threshold_rule == "quantile":
        return float(torch.quantile(errors, cfg.quantile))
    return float(cfg.factor * errors.mean())


def decoder_config(encoder: Encoder, cfg: DeDeConfig, mask_seed: int) -> dict:
    size = encoder.config.image_size
    if size % cfg.patch_size:
        raise ValueError(f"dede.patch_size ({cfg.patch_size}) must divide the encoder's image size ({size})")
    return {"image_size": size, "patch_size": cfg.patch_size, "feature_dim": encoder.feature_dim,
            "emb_dim": cfg.emb_dim, "encoder_layers": cfg.encoder_layers, "encoder_heads": cfg.encoder_heads,
            "decoder_layers": cfg.decoder_layers, "decoder_heads": cfg.decoder_heads,
            "test_mask_ratio": cfg.test_mask_ratio, "mean": list(encoder.config.mean),
            "std": list(encoder.config.std), "mask_seed": mask_seed}


# tiny/ci: only the update budget and the batch (the cost of one update) shrink; ci's 100 updates are where the
# held-out clean error of a decoder on the ci CLEAN encoder stops falling (docs/methods/dede.md), tiny gets 5x that
# at twice the batch; the decoder, masking, optimiser, learning rate and threshold rule stay the reference's.
SCALED_PROFILES = {"tiny": {"steps": 500, "batch_size": 128}, "ci": {"steps": 100, "batch_size": 64}}


@register_defense("dede", config=DeDeConfig,
                  summary="train a decoder from the suspect's embedding on clean images; reject inputs it "
                          "reconstructs badly (DeDe input screen)",
                  profiles=SCALED_PROFILES, budget=("steps",), screens=True)
def dede(encoder: Encoder, clean: CleanData, cfg: DeDeConfig, ctx: RunContext) -> ScreenedEncoder:
    cfg.validate()
    encoder = encoder.to(ctx.device).eval()
    images = clean.images
    order = torch.randperm(len(images), generator=ctx.generator)
    n_hold = max(1, round(cfg.holdout * len(images)))
    if len(images) - n_hold < 1:
        raise ValueError(f"dede: {len(images)} clean images leave none to train on after the holdout")
    held, train = images[order[:n_hold].to(images.device)], images[order[n_hold:].to(images.device)]
    mask_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
    decoder = DeDeDecoder(decoder_config(encoder, cfg, mask_seed)).to(ctx.device)
    f_train = _features(encoder, train, cfg.eval_batch_size, ctx)
    history = train_decoder(decoder, train, f_train, cfg, ctx)
    ctx.record("dede_loss", history)
    errors = _errors(decoder, held, _features(encoder, held, cfg.eval_batch_size, ctx), cfg.eval_batch_size, ctx)
    threshold = threshold_of(errors, cfg)
    train_errors = _errors(decoder, train, f_train, cfg.eval_batch_size, ctx)
    ctx.record("dede_threshold", threshold)
    ctx.record("dede_holdout_images", int(n_hold))
    ctx.record("dede_holdout_error_mean", float(errors.mean()))
    ctx.record("dede_holdout_rejected", float((errors > threshold).float().mean()))
    ctx.record("dede_train_error_mean", float(train_errors.mean()))
    ctx.record("dede_train_rejected", float((train_errors > threshold).float().mean()))
    ctx.logger.info("dede: threshold %.4g (%s), held-out error mean %.4g, train error mean %.4g", threshold,
                    cfg.threshold_rule, ctx.records["dede_holdout_error_mean"], ctx.records["dede_train_error_mean"])
    return ScreenedEncoder(encoder, decoder.eval(), "dede", threshold)
