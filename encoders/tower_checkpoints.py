"""Reading and writing ViT / CLIP tower checkpoints in their libraries' own layouts.

Layouts recognised (``plan_tower``), each read safely by :func:`.checkpoints.read_checkpoint`:

- ``timm``: a timm ViT state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.weight``,
  ``blocks.N.attn.qkv.weight``, ``norm.weight``, optionally a classifier ``head.*``, kept unchanged);
- ``open_clip``: an open_clip or OpenAI CLIP model (``visual.conv1.weight``, ``visual.class_embedding``,
  ``visual.positional_embedding``, ``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.proj``,
  and the text tower ``token_embedding.weight``, ``transformer.resblocks.N.*``, ``ln_final.*``,
  ``text_projection``, ``logit_scale``), or its visual tower alone (the same keys without ``visual.``);
- ``hf-clip``: a Hugging Face ``CLIPModel`` / ``CLIPVisionModel(WithProjection)``
  (``vision_model.embeddings.patch_embedding.weight``, ``vision_model.encoder.layers.N.self_attn.q_proj.weight``,
  ``vision_model.post_layernorm.weight``, ``visual_projection.weight``; ``text_model.*`` and
  ``text_projection.weight`` for the text tower).

The architecture is read from the tensors' shapes (as OpenAI's ``build_model`` does); what they do not pin
follows the releases (64-wide heads, QuickGELU for CLIP towers) unless the file records ``num_heads`` /
``quick_gelu`` at its top level or in safetensors metadata. Input size: the position embedding's grid times the
patch size; normalisation: CLIP's statistics for CLIP towers, ImageNet's for timm (``--mean/--std`` override).
Every other layout goes to :mod:`.checkpoints` (the ResNet layouts); a file of none of them is a one-line error
listing all. A text tower in the file is what zero-shot evaluation uses (:func:`save_text_tower`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoints as ck
from .checkpoints import CheckpointError, RawCheckpoint, read_checkpoint
from .towers import CLIP_MEAN, CLIP_STD, TOWER_ARCHS, TextTower, TowerConfig, TowerEncoder, heads_for, tower_config

TOWER_EXPECTED = {
    "timm": "a timm ViT ('cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', ...)",
    "open_clip": "an open_clip / OpenAI CLIP model or visual tower ('visual.conv1.weight', "
                 "'visual.transformer.resblocks.0.attn.in_proj_weight', 'visual.proj', ...)",
    "hf-clip": "a Hugging Face CLIPModel / CLIPVisionModel ('vision_model.embeddings.patch_embedding.weight', "
               "'vision_model.encoder.layers.0.self_attn.q_proj.weight', ...)",
}
TEXT_FILE = "text_tower.pt"
STORED = "defbench-tower"  # a tower in defbench's own format (what the pipeline stores)
TOWER_LAYOUTS = (*TOWER_EXPECTED, STORED)


@dataclass
class TowerPlan:
    """How a file's tensors become a tower encoder (and, when it has one, a text tower)."""
    layout: str
    arch: str
    params: dict
    mapping: dict[str, str]  # encoder key -> file key
    defaults: dict  # image_size / mean / std when nothing else says
    text_kind: str = ""  # "openclip" / "hf" when the file holds a text tower
    text_params: dict = field(default_factory=dict)
    text_mapping: dict[str, str] = field(default_factory=dict)  # text tower key -> file key

    def carried(self, raw: RawCheckpoint) -> list[str]:
        used = set(self.mapping.values())
        return [k for k in raw.state if k not in used]


def _count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _grid(tokens: int, prefix: int) -> int | None:
    side = round((tokens - prefix) ** 0.5) if tokens > prefix else 0
    return side if side and side * side == tokens - prefix else None


def _recorded(raw: RawCheckpoint, key: str):
    source = raw.metadata if raw.container == "safetensors" else raw.payload
    value = source.get(key)
    if isinstance(value, str):
        value = json.loads(value) if value.strip().lower() in ("true", "false") or value.strip().isdigit() else value
    return value


def _shape(raw: RawCheckpoint, key: str) -> tuple[int, ...]:
    if key not in raw.keys:
        raise CheckpointError(f"{raw.path} lacks {key!r}, which its tower layout needs; is the file complete?")
    return tuple(raw.tensor(key).shape)


def _mapped(raw: RawCheckpoint, prefix: str, target_prefix: str, skip=lambda key: False) -> dict[str, str]:
    return {target_prefix + k[len(prefix):]: file_key for k, file_key in raw.keys.items()
            if k.startswith(prefix) and not skip(k)}


def _plan_timm(raw: RawCheckpoint) -> TowerPlan:
    keys = raw.keys
    dim, _, _, patch = _shape(raw, "patch_embed.proj.weight")
    class_token = "cls_token" in keys
    reg_tokens = _shape(raw, "reg_token")[1] if "reg_token" in keys else 0
    tokens = _shape(raw, "pos_embed")[1]
    prefix = int(class_token) + reg_tokens
    grid, no_embed_class = _grid(tokens, prefix), False
    if grid is None:
        grid, no_embed_class = _grid(tokens, 0), True
    if grid is None:
        raise CheckpointError(f"{raw.path}: pos_embed holds {tokens} positions, not a square patch grid")
    fc_norm = "fc_norm.weight" in keys
    params = {"patch_size": patch, "embed_dim": dim, "depth": _count(keys, r"blocks\.(\d+)\."),
              "num_heads": int(_recorded(raw, "num_heads") or heads_for(dim)),
              "mlp_ratio": _shape(raw, "blocks.0.mlp.fc1.weight")[0] / dim,
              "qkv_bias": "blocks.0.attn.qkv.bias" in keys, "class_token": class_token, "reg_tokens": reg_tokens,
              "no_embed_class": no_embed_class, "global_pool": "avg" if fc_norm or not class_token else "token",
              "fc_norm": fc_norm, "pre_norm": "norm_pre.weight" in keys,
              "init_values": 1e-5 if "blocks.0.ls1.gamma" in keys else None}
    mapping = _mapped(raw, "", "backbone.model.", skip=lambda k: k.startswith("head."))
    return TowerPlan("timm", "timm-vit", params, mapping,
                     {"image_size": grid * patch, "mean": ck.IMAGENET_MEAN, "std": ck.IMAGENET_STD})


def _plan_open_clip(raw: RawCheckpoint, visual: str) -> TowerPlan:
    keys = raw.keys
    width, _, _, patch = _shape(raw, f"{visual}conv1.weight")
    grid = _grid(_shape(raw, f"{visual}positional_embedding")[0], 1)
    quick_gelu = _recorded(raw, "quick_gelu")
    quick_gelu = True if quick_gelu is None else bool(quick_gelu)
    params = {"patch_size": patch, "width": width, "heads": heads_for(width),
              "layers": _count(keys, re.escape(visual) + r"transformer\.resblocks\.(\d+)\."),
              "mlp_ratio": _shape(raw, f"{visual}transformer.resblocks.0.mlp.c_fc.weight")[0] / width,
              "output_dim": _shape(raw, f"{visual}proj")[1], "quick_gelu": quick_gelu}
    plan = TowerPlan("open_clip", "openclip-vit", params, _mapped(raw, visual, "backbone.model."),
                     {"image_size": grid * patch, "mean": CLIP_MEAN, "std": CLIP_STD})
    if visual and "token_embedding.weight" in keys:  # the text tower of a whole CLIP model
        text_width = _shape(raw, "ln_final.weight")[0]
        plan.text_kind = "openclip"
        plan.text_params = {"context_length": _shape(raw, "positional_embedding")[0],
                            "vocab_size": _shape(raw, "token_embedding.weight")[0], "width": text_width,
                            "heads": heads_for(text_width), "layers": _count(keys, r"transformer\.resblocks\.(\d+)\."),
                            "output_dim": _shape(raw, "text_projection")[1], "quick_gelu": quick_gelu}
        plan.text_mapping = {f"model.{k}": file_key for k, file_key in keys.items()
                             if not k.startswith(visual) and k != "logit_scale"}
    return plan


def _plan_hf(raw: RawCheckpoint) -> TowerPlan:
    keys = raw.keys
    v = "vision_model."
    hidden, _, _, patch = _shape(raw, f"{v}embeddings.patch_embedding.weight")
    grid = _grid(_shape(raw, f"{v}embeddings.position_embedding.weight")[0], 1)
    projection = _shape(raw, "visual_projection.weight")[0] if "visual_projection.weight" in keys else 0
    params = {"patch_size": patch, "hidden_size": hidden, "num_attention_heads": heads_for(hidden),
              "num_hidden_layers": _count(keys, r"vision_model\.encoder\.layers\.(\d+)\."),
              "intermediate_size": _shape(raw, f"{v}encoder.layers.0.mlp.fc1.weight")[0],
              "projection_dim": projection, "hidden_act": "quick_gelu"}
    skip = lambda k: k.endswith("position_ids")  # noqa: E731  (a buffer older files kept)
    mapping = {**_mapped(raw, v, f"backbone.model.{v}", skip),
               **({"backbone.model.visual_projection.weight": keys["visual_projection.weight"]} if projection else {})}
    plan = TowerPlan("hf-clip", "hf-clip-vit", params, mapping,
                     {"image_size": grid * patch, "mean": CLIP_MEAN, "std": CLIP_STD})
    t = "text_model."
    if f"{t}embeddings.token_embedding.weight" in keys and "text_projection.weight" in keys:
        width = _shape(raw, f"{t}final_layer_norm.weight")[0]
        plan.text_kind = "hf"
        plan.text_params = {"vocab_size": _shape(raw, f"{t}embeddings.token_embedding.weight")[0], "hidden_size": width,
                            "intermediate_size": _shape(raw, f"{t}encoder.layers.0.mlp.fc1.weight")[0],
                            "num_hidden_layers": _count(keys, r"text_model\.encoder\.layers\.(\d+)\."),
                            "num_attention_heads": heads_for(width), "hidden_act": "quick_gelu",
                            "max_position_embeddings": _shape(raw, f"{t}embeddings.position_embedding.weight")[0],
                            "projection_dim": _shape(raw, "text_projection.weight")[0]}
        plan.text_mapping = {**_mapped(raw, t, f"model.{t}", skip),
                             "model.text_projection.weight": keys["text_projection.weight"]}
    return plan


def plan_tower(raw: RawCheckpoint) -> TowerPlan | None:
    """The tower layout of ``raw`` (None: not a tower; the ResNet layouts may still read it)."""
    keys = raw.keys
    if "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys:
        return _plan_timm(raw)
    for visual in ("visual.", ""):
        if f"{visual}conv1.weight" in keys and f"{visual}transformer.resblocks.0.attn.in_proj_weight" in keys:
            return _plan_open_clip(raw, visual)
    if "visual.attnpool.c_proj.weight" in keys or "attnpool.c_proj.weight" in keys:
        raise CheckpointError(f"{raw.path} is a CLIP ModifiedResNet (RN50-style) image tower; defbench reads CLIP "
                              "ViT towers, not CLIP's ResNets")
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return _plan_hf(raw)
    return None


def _is_resnet_layout(raw: RawCheckpoint) -> bool:
    """What :func:`.checkpoints.plan_checkpoint` recognises (a defbench ResNet file, the BadEncoder release, a
    torchvision ResNet)."""
    keys = raw.keys
    return ck._is_defbench(raw) or any(k.startswith("f.f.") for k in keys) or \
        ("conv1.weight" in keys and "layer1.0.conv1.weight" in keys)


def _stored_tower_config(raw: RawCheckpoint) -> dict | None:
    """The config of a defbench-format file holding a tower (what the pipeline's stages store), else None."""
    if not ck._is_defbench(raw):
        return None
    config = raw.payload.get("config") if raw.container == "torch" else raw.metadata.get("config")
    if isinstance(config, str):
        config = json.loads(config)
    return config if isinstance(config, dict) and config.get("arch") in TOWER_ARCHS else None


def unknown_layout(raw: RawCheckpoint) -> str:
    """One line: the ResNet layouts' message (what each looks like, the closest key found), and the towers'."""
    return f"{ck._unknown_layout(raw)}; nor a ViT / CLIP tower: {'; or '.join(TOWER_EXPECTED.values())}"


# ----------------------------------------------------------------- building

def _load_state(module: torch.nn.Module, raw: RawCheckpoint, mapping: dict[str, str], what: str,
                optional=lambda key: False) -> None:
    target = module.state_dict()
    state = {}
    for key, file_key in mapping.items():
        if key not in target:
            raise CheckpointError(f"{raw.path}: {file_key} has no place in {what}; the file holds another "
                                  "architecture or is damaged")
        tensor = raw.state[file_key]
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise CheckpointError(f"{raw.path}: {file_key} has shape {tuple(tensor.shape)} but {what} expects "
                                  f"{tuple(target[key].shape)} (another input size? pass --image-size)")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{raw.path}: {file_key} holds NaN or inf; the checkpoint is broken")
        state[key] = tensor.to(target[key].dtype)
    missing = [k for k in target if k not in state and not optional(k)]
    if missing:
        raise CheckpointError(f"{raw.path} does not match {what}: missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}")
    module.load_state_dict(state, strict=False)


def _fresh_head(raw: RawCheckpoint, config: TowerConfig) -> TowerEncoder:
    """The tower with a projection head that is the same for the same file, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(raw.sha256[:8], 16))
        return TowerEncoder(config)


def load_any_checkpoint(path: str | os.PathLike, *, image_size: int | None = None, mean=None,
                        std=None) -> tuple:
    """:func:`.checkpoints.load_checkpoint` for every layout, towers included: (encoder, what was read)."""
    raw = read_checkpoint(path)
    stored = _stored_tower_config(raw)
    if stored is not None:
        encoder = _stored_encoder(raw, stored)
        c = encoder.config
        values = {"image_size": c.image_size, "mean": c.mean, "std": c.std}
        given = {"image_size": image_size, "mean": None if mean is None else tuple(mean),
                 "std": None if std is None else tuple(std)}
        if any(v is not None and v != values[k] for k, v in given.items()):
            raise CheckpointError(f"{path} records its input size and normalisation; rebuild it to change them")
        return encoder, _info(raw, STORED, encoder, values, dict.fromkeys(values, "file"), [], False)
    plan = plan_tower(raw)
    if plan is None:
        if not _is_resnet_layout(raw):
            raise CheckpointError(unknown_layout(raw))
        return ck.load_checkpoint(path, image_size=image_size, mean=mean, std=std)
    resolved, sources = ck._resolve(ck.Plan(plan.layout, {}, {}, defaults=plan.defaults), raw, image_size, mean, std)
    try:
        config = tower_config(plan.arch, plan.params, **resolved)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{raw.path}: {ck._one_line(err)}") from None
    encoder = _fresh_head(raw, config)
    _load_state(encoder, raw, plan.mapping, f"a {plan.arch} of width {config.width}",
                optional=lambda k: k.startswith("head."))
    return encoder, _info(raw, plan.layout, encoder, resolved, sources, plan.carried(raw), bool(plan.text_kind))


def _info(raw, layout, encoder, resolved, sources, carried, text) -> dict:
    c = encoder.config
    return {"path": str(raw.path), "sha256": raw.sha256, "container": raw.container, "layout": layout,
            "arch": c.arch, "width": c.width, "image_size": resolved["image_size"], "mean": list(resolved["mean"]),
            "std": list(resolved["std"]), "sources": sources,
            "head": "from the file" if layout == STORED else "fresh (the layout has no projection head)",
            "carried": carried, "prefix": raw.prefix, "note": "", "tower": True, "text_tower": text}


def _stored_encoder(raw: RawCheckpoint, config: dict) -> TowerEncoder:
    try:
        encoder = TowerEncoder(TowerConfig.from_dict(config))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{raw.path}: its tower config is invalid ({ck._one_line(err)})") from None
    _load_state(encoder, raw, {k: k for k in raw.state}, f"a {encoder.config.arch}")
    return encoder


def load_any_encoder(path: str | os.PathLike) -> torch.nn.Module:
    """:func:`.checkpoints.load_encoder` for the pipeline's stored files, tower encoders included."""
    raw = read_checkpoint(path)
    stored = _stored_tower_config(raw)
    if stored is not None:
        return _stored_encoder(raw, stored)
    try:  # what ck.load_encoder does, on the file already read (a stage's encoder is read once, not twice)
        plan = ck.plan_checkpoint(raw)
        return ck._build(raw, plan, ck._resolve(plan, raw, None, None, None)[0])
    except (RuntimeError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{raw.path} is not a valid encoder checkpoint: {ck._one_line(err, 200)}") from None


# ----------------------------------------------------------------- writing back, text towers

def save_like_any(encoder, source: str | os.PathLike, out: str | os.PathLike, sha256: str | None = None) -> dict:
    """:func:`.checkpoints.save_like` for every layout: a tower goes back into its library's layout, every
    tensor of the file that is not the image tower (the text tower, a classifier head) unchanged."""
    raw = read_checkpoint(source)
    if _stored_tower_config(raw) is not None:
        return _save_stored(encoder, raw, Path(out))
    plan = plan_tower(raw)
    if plan is None:
        return ck.save_like(encoder, source, out, sha256=sha256)
    if sha256 is not None and raw.sha256 != sha256:
        raise CheckpointError(f"{source} changed since it was read (sha256 {raw.sha256[:12]}, expected "
                              f"{sha256[:12]}); rerun on the current file")
    if encoder.config.arch != plan.arch or encoder.config.params != plan.params:
        raise CheckpointError(f"the encoder ({encoder.config.arch}) is not the architecture of {source}; cannot "
                              "write it in that file's layout")
    current = encoder.state_dict()
    state = dict(raw.state)
    for key, file_key in plan.mapping.items():
        state[file_key] = current[key].detach().cpu().to(raw.state[file_key].dtype).clone()
    out = Path(out)
    if raw.container == "safetensors":
        ck.save_safetensors(state, out, raw.metadata)
    else:
        payload = dict(raw.payload)
        if raw.state_key is None:
            payload.update(state)
        else:
            payload[raw.state_key] = {**raw.payload[raw.state_key], **state}
        ck._atomic_write(out, ck._torch_bytes(payload))
    return {"path": str(out), "layout": plan.layout, "container": raw.container, "sha256": ck.file_sha256(out),
            "carried_unchanged": plan.carried(raw)}


def _save_stored(encoder, raw: RawCheckpoint, out: Path) -> dict:
    """A tower in defbench's format written back in that format (same container)."""
    if raw.container == "torch":
        ck.save_encoder(encoder, out, meta=raw.payload.get("meta") or {})
    else:
        state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        ck.save_safetensors(state, out, {**raw.metadata, "format": ck.FORMAT,
                                         "config": json.dumps(encoder.config.to_dict())})
    return {"path": str(out), "layout": STORED, "container": raw.container, "sha256": ck.file_sha256(out)}


def save_text_tower(source: str | os.PathLike, out: str | os.PathLike) -> bool:
    """Write the text tower of checkpoint ``source`` (kind, params, weights) to ``out``; False when it has none."""
    raw = read_checkpoint(source)
    plan = plan_tower(raw)
    if plan is None or not plan.text_kind:
        return False
    state = {key: raw.state[file_key] for key, file_key in plan.text_mapping.items()}
    ck._atomic_write(Path(out), ck._torch_bytes({"kind": plan.text_kind, "params": plan.text_params,
                                                 "state_dict": state}))
    return True


def load_text_tower(path: str | os.PathLike) -> TextTower:
    payload = ck._safe_load(Path(path))
    tower = TextTower(payload["kind"], payload["params"])
    target = tower.state_dict()
    state = {k: v.to(target[k].dtype) for k, v in payload["state_dict"].items() if k in target}
    missing = [k for k in target if k not in state]
    if missing:
        raise CheckpointError(f"{path}: the text tower lacks {missing[:3]}")
    tower.load_state_dict(state, strict=False)
    return tower.eval()
