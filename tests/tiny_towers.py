"""Small randomly initialised ViT / CLIP towers saved in each library's own layout (nothing is downloaded).

Sizes: 32-pixel images, 8-pixel patches (a 4 x 4 grid), 2 blocks of width 64 (one 64-wide head), a 32-d CLIP
embedding; the CLIP text towers have one block of width 32 over OpenAI CLIP's 49,408-token vocabulary (what the
BPE tokenizer produces), so every file is a few megabytes at most.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE, PATCH, WIDTH, DEPTH, EMBED = 32, 8, 64, 2, 32


def timm_vit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=1,
                             num_classes=10)


def open_clip_model(seed: int = 0, text: bool = True):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=DEPTH, width=WIDTH, head_width=64, patch_size=PATCH, image_size=IMAGE)
    text_cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=1, layers=1)
    return CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text_cfg, quick_gelu=True)


def hf_clip_model(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=DEPTH,
                              num_attention_heads=1, image_size=IMAGE, patch_size=PATCH)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                          vocab_size=49408, max_position_embeddings=77)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=EMBED))


def save_timm(path: Path, seed: int = 0):
    model = timm_vit(seed)
    torch.save(model.state_dict(), path)
    return model


def save_open_clip(path: Path, seed: int = 0, visual_only: bool = False):
    """A whole CLIP model's state dict (OpenAI / open_clip release layout), or its visual tower's alone."""
    model = open_clip_model(seed)
    state = model.visual.state_dict() if visual_only else model.state_dict()
    torch.save(state, path)
    return model


def save_hf(path: Path, seed: int = 0):
    model = hf_clip_model(seed)
    torch.save(model.state_dict(), path)
    return model
