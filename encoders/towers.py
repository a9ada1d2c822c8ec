"""ViT and CLIP image towers behind the one encoder interface (the optional extra ``defbench[clip]``).

The models are the libraries' own (timm's ``VisionTransformer``, open_clip's ``VisionTransformer``,
Hugging Face's ``CLIPVisionModel``); this module only wraps them so that they offer what every attack and
defense uses (:mod:`.base`): ``features``, ``project``, ``stages``, ``empty_like`` and a config that
rebuilds them. Architectures:

- ``timm-vit``: a timm ViT; the feature is timm's pooled pre-logits output (class token or average);
- ``openclip-vit``: an open_clip / OpenAI-CLIP image tower; the feature is the CLIP image embedding
  (the pooled token times ``proj``), the space the text tower embeds into;
- ``hf-clip-vit``: a Hugging Face ``CLIPVisionModel`` (``...WithProjection`` when the file has
  ``visual_projection``); the feature is the image embedding, or the pooled output without a projection.

``stages(x)`` gives the output of every transformer block (``block0``, ``block1``, ...) from one forward
pass, as its patch tokens laid out on the patch grid (B x C x H/p x W/p; the class and register tokens
are left out), so what the defenses compute on a ResNet stage (attention maps, MINE inputs, channel means)
is defined on a block the same way. The projection head used by contrastive losses is defbench's SimCLR
head, fresh (the towers' files have none).

The hyper-parameters the weights do not pin (the number of heads, the activation) follow the releases:
64-wide heads (every released ViT and CLIP tower) and QuickGELU for CLIP towers (OpenAI's).

These modules are imported only where a tower is met (``tower_checkpoints``), never by the ResNet path.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..core import ConfigError, UserError
from .base import PRECISIONS, Encoder
from .resnet import projection_head

TOWER_ARCHS = ("timm-vit", "openclip-vit", "hf-clip-vit")
EXTRA = "pip install 'defbench[clip]'"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64


def library(name: str):
    """Import one of the extra's libraries, or say in one line how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"ViT and CLIP towers need {name.split('.')[0]}, which is not installed; {EXTRA}") from None


def heads_for(width: int) -> int:
    """The releases' head count for a width: 64-wide heads (at least one)."""
    return max(1, width // HEAD_WIDTH)


@dataclass(frozen=True)
class TowerConfig:
    """Everything that rebuilds a tower encoder: ``tower`` holds the library's hyper-parameters as JSON."""
    arch: str
    tower: str
    image_size: int = 224
    proj_hidden: int = 0
    proj_dim: int = 128
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    channels_last: bool = False
    precision: str = "fp32"

    def __post_init__(self):
        if self.arch not in TOWER_ARCHS:
            raise ConfigError(f"unknown tower {self.arch!r}; known: {', '.join(TOWER_ARCHS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"encoder.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        patch = self.params["patch_size"]
        if self.image_size % patch:
            raise ConfigError(f"a {self.arch} with {patch}-pixel patches needs an image size divisible by {patch}, "
                              f"got {self.image_size}")

    @property
    def params(self) -> dict:
        return json.loads(self.tower)

    @property
    def width(self) -> int:
        p = self.params
        return int(p.get("embed_dim") or p.get("width") or p.get("hidden_size"))

    def to_dict(self) -> dict:
        return {"arch": self.arch, "tower": self.params, "image_size": self.image_size,
                "proj_hidden": self.proj_hidden, "proj_dim": self.proj_dim, "mean": list(self.mean),
                "std": list(self.std), "channels_last": self.channels_last, "precision": self.precision}

    @classmethod
    def from_dict(cls, d: dict) -> "TowerConfig":
        d = dict(d)
        if isinstance(d.get("tower"), dict):
            d["tower"] = json.dumps(d["tower"], sort_keys=True)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown tower config fields {sorted(unknown)}")
        return cls(**d)


def tower_config(arch: str, params: dict, **fields) -> TowerConfig:
    return TowerConfig(arch, json.dumps(params, sort_keys=True), **fields)


def patch_grid(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """B x (prefix + h*w) x C tokens -> B x C x h x w: the patch tokens on their grid (square grids)."""
    patches = tokens[:, prefix:]
    b, n, c = patches.shape
    side = int(round(n ** 0.5))
    return patches.transpose(1, 2).reshape(b, c, side, n // side)


class Tower(nn.Module):
    """A library's image model as a backbone: ``forward_stages`` gives ``block<i>`` maps and ``feature``."""
    is_transformer = True

    def __init__(self, model: nn.Module, blocks: int, feature_dim: int):
        super().__init__()
        self.model = model
        self.stage_names = tuple(f"block{i}" for i in range(blocks))
        self.feature_dim = feature_dim

    def block_index(self, stage: str) -> int:
        if stage not in self.stage_names:
            raise ValueError(f"unknown stage {stage!r}; this tower has {', '.join(self.stage_names)}")
        return self.stage_names.index(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)["feature"]

    def run_blocks(self, x: torch.Tensor, blocks, prefix: int, call=None) -> tuple[torch.Tensor, dict]:
        """Tokens through ``blocks``; each block's map is taken on the way and the next block reads its tokens
        back from that map (the same numbers), so every map lies on the feature's graph (MEDIC differentiates
        the teacher's loss with respect to them)."""
        stages = {}
        for name, block in zip(self.stage_names, blocks):
            x = call(block, x) if call else block(x)
            stages[name] = grid = patch_grid(x, prefix)
            x = torch.cat([x[:, :prefix], grid.flatten(2).transpose(1, 2)], 1)
        return x, stages


class TimmViT(Tower):
    def __init__(self, params: dict, image_size: int):
        vit = library("timm.models.vision_transformer")
        model = vit.VisionTransformer(img_size=image_size, num_classes=0, **params)
        super().__init__(model, len(model.blocks), model.num_features)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        x, stages = self.run_blocks(x, m.blocks, m.num_prefix_tokens)
        stages["feature"] = m.forward_head(m.norm(x), pre_logits=True)
        return stages

    def mlp(self, stage: str) -> tuple[nn.Linear, nn.Linear]:
        """(the layer into the block's MLP hidden units, the layer out of them)."""
        block = self.model.blocks[self.block_index(stage)]
        return block.mlp.fc1, block.mlp.fc2


class OpenClipViT(Tower):
    def __init__(self, params: dict, image_size: int):
        oc = library("open_clip.transformer")
        model = oc.VisionTransformer(
            image_size=image_size, patch_size=params["patch_size"], width=params["width"], layers=params["layers"],
            heads=params["heads"], mlp_ratio=params["mlp_ratio"], output_dim=params["output_dim"],
            act_layer=oc.QuickGELU if params.get("quick_gelu", True) else nn.GELU, norm_layer=oc.LayerNorm)
        super().__init__(model, params["layers"], params["output_dim"])

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        batch_first = getattr(m.transformer, "batch_first", True)  # older open_clip runs blocks sequence-first
        call = None if batch_first else (lambda block, t: block(t.transpose(0, 1)).transpose(0, 1))
        x, stages = self.run_blocks(m._embeds(x), m.transformer.resblocks, 1, call)
        pooled, _ = m._pool(x)
        stages["feature"] = pooled @ m.proj
        return stages

    def mlp(self, stage: str) -> tuple[nn.Linear, nn.Linear]:
        block = self.model.transformer.resblocks[self.block_index(stage)]
        return block.mlp.c_fc, block.mlp.c_proj


class HFClipViT(Tower):
    def __init__(self, params: dict, image_size: int):
        tf = library("transformers")
        params = dict(params)
        projection = params.pop("projection_dim", 0)
        config = tf.CLIPVisionConfig(image_size=image_size, projection_dim=projection or 512, **params)
        model = tf.CLIPVisionModelWithProjection(config) if projection else tf.CLIPVisionModel(config)
        super().__init__(model, config.num_hidden_layers, projection or config.hidden_size)
        self.projected = bool(projection)

    def forward_stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        vm = self.model.vision_model
        x, stages = self.run_blocks(vm.pre_layrnorm(vm.embeddings(x)), vm.encoder.layers, 1, _hf_layer)
        pooled = vm.post_layernorm(x[:, 0])
        stages["feature"] = self.model.visual_projection(pooled) if self.projected else pooled
        return stages

    def mlp(self, stage: str) -> tuple[nn.Linear, nn.Linear]:
        layer = self.model.vision_model.encoder.layers[self.block_index(stage)]
        return layer.mlp.fc1, layer.mlp.fc2


def _hf_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = layer(x, None)  # no attention mask; older transformers return a tuple
    return out[0] if isinstance(out, tuple) else out


BACKBONES = {"timm-vit": TimmViT, "openclip-vit": OpenClipViT, "hf-clip-vit": HFClipViT}


class TowerEncoder(Encoder):
    """:class:`~.base.Encoder` around a tower: same normalisation, stages, features and projection head."""

    def __init__(self, config: TowerConfig):
        nn.Module.__init__(self)  # Encoder.__init__ builds ResNets from its registry; the tower is built here
        self.config = config
        self.backbone = BACKBONES[config.arch](config.params, config.image_size)
        dim = self.backbone.feature_dim
        self.head = projection_head(dim, config.proj_hidden or dim, config.proj_dim)
        self.register_buffer("_mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def empty_like(self) -> "TowerEncoder":
        """Same tower, fresh random weights (the library's initialisation), on the same device."""
        device = next(self.parameters()).device
        return TowerEncoder(self.config).to(device)


def is_transformer(encoder) -> bool:
    """Whether ``encoder`` (or the encoder a screen wraps) is a transformer tower."""
    return bool(getattr(getattr(encoder, "backbone", None), "is_transformer", False))


def build_tower(config: TowerConfig | dict) -> TowerEncoder:
    return TowerEncoder(config if isinstance(config, TowerConfig) else TowerConfig.from_dict(config))


# ----------------------------------------------------------------- text towers (zero-shot)

class TextTower(nn.Module):
    """A CLIP text tower: ``encode(prompts)`` -> L2-normalised text embeddings (the image feature's space).

    ``kind``: ``openclip`` (open_clip's / OpenAI's ``TextTransformer``, keys ``token_embedding.weight``,
    ``transformer.resblocks.*``, ``ln_final.*``, ``text_projection``) or ``hf`` (Hugging Face's
    ``CLIPTextModelWithProjection``, keys ``text_model.*`` and ``text_projection.weight``). Prompts are
    tokenised with OpenAI CLIP's BPE (shipped inside open_clip; Hugging Face's CLIP tokenizer has the same
    vocabulary)."""

    def __init__(self, kind: str, params: dict):
        super().__init__()
        self.kind, self.params = kind, dict(params)
        if kind == "openclip":
            oc = library("open_clip.transformer")
            self.model = oc.TextTransformer(
                context_length=params["context_length"], vocab_size=params["vocab_size"], width=params["width"],
                heads=params["heads"], layers=params["layers"], output_dim=params["output_dim"],
                act_layer=oc.QuickGELU if params.get("quick_gelu", True) else nn.GELU, norm_layer=oc.LayerNorm)
            self.context = params["context_length"]
        elif kind == "hf":
            tf = library("transformers")
            config = tf.CLIPTextConfig(**{k: v for k, v in params.items()})
            self.model = tf.CLIPTextModelWithProjection(config)
            self.context = params["max_position_embeddings"]
        else:
            raise ValueError(f"unknown text tower kind {kind!r}")

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = library("open_clip.tokenizer").tokenize(prompts, context_length=self.context)
        tokens = tokens.to(next(self.parameters()).device)
        if self.kind == "openclip":
            out = self.model(tokens)
        else:
            out = self.model(input_ids=tokens, attention_mask=(tokens != 0).long()).text_embeds
        return torch.nn.functional.normalize(out.float(), dim=1)
