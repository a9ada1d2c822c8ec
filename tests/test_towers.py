"""ViT and CLIP image towers: read in their libraries' layouts, computing what their libraries compute, written
back in those layouts, and run through the defenses (`defend`), the protocols (`evaluate`) and `detect`.

The towers are tiny and random (tests/tiny_towers.py); nothing is downloaded.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import tiny_towers as tt
from conftest import PRETRAIN, TASK
from defbench.benchmark.cli import main
from defbench.defenses import DEFENSES, CleanData, on_transformers
from defbench.encoders import RunContext, save_encoder
from defbench.encoders.checkpoints import CheckpointError, read_checkpoint
from defbench.encoders.tower_checkpoints import (load_any_checkpoint, load_any_encoder, load_text_tower, plan_tower,
                                                 save_like_any, save_text_tower)
from defbench.encoders.towers import TowerEncoder, is_transformer

# Key names of the releases, as their own loaders read them: OpenAI CLIP's build_model (clip/model.py:
# visual.conv1.weight, visual.class_embedding, visual.positional_embedding, visual.transformer.resblocks.N.attn.
# in_proj_weight, visual.proj, text_projection, token_embedding.weight, ln_final.weight, positional_embedding),
# Hugging Face's CLIP checkpoints (vision_model.embeddings.patch_embedding.weight, ...self_attn.q_proj.weight,
# vision_model.post_layernorm.weight, visual_projection.weight) and timm's ViT (cls_token, pos_embed,
# patch_embed.proj.weight, blocks.N.attn.qkv.weight, norm.weight).
PUBLISHED = {
    "open_clip": ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                  "visual.transformer.resblocks.0.attn.in_proj_weight",
                  "visual.transformer.resblocks.1.mlp.c_fc.weight", "visual.ln_post.weight", "visual.proj",
                  "text_projection", "token_embedding.weight", "ln_final.weight", "positional_embedding",
                  "logit_scale"],
    "hf-clip": ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight",
                "vision_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.post_layernorm.weight",
                "visual_projection.weight", "text_model.embeddings.token_embedding.weight", "text_projection.weight"],
    "timm": ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight",
             "norm.weight", "head.weight"],
}
SAVERS = {"timm": tt.save_timm, "open_clip": tt.save_open_clip, "hf-clip": tt.save_hf}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("towers")
    files, models = {}, {}
    for layout, save in SAVERS.items():
        files[layout] = folder / f"{layout}.pt"
        models[layout] = save(files[layout]).eval()
    return files, models


def _library_feature(layout: str, model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if layout == "timm":
            return model.forward_head(model.forward_features(x), pre_logits=True)
        if layout == "open_clip":
            return model.encode_image(x)
        out = model.get_image_features(pixel_values=x)
        return out if torch.is_tensor(out) else out.pooler_output


@pytest.mark.parametrize("layout", list(SAVERS))
def test_each_tower_reads_its_published_keys_and_computes_what_its_library_computes(towers, layout):
    files, models = towers
    raw = read_checkpoint(files[layout])
    assert set(PUBLISHED[layout]) <= set(raw.keys), sorted(set(PUBLISHED[layout]) - set(raw.keys))
    assert plan_tower(raw).layout == layout
    encoder, info = load_any_checkpoint(files[layout])
    assert info["layout"] == layout and info["image_size"] == tt.IMAGE and is_transformer(encoder)
    assert info["text_tower"] == (layout != "timm")
    encoder.eval()
    x = torch.rand(3, 3, tt.IMAGE, tt.IMAGE)
    stages = encoder.stages(x)
    grid = tt.IMAGE // tt.PATCH
    assert list(stages) == ["block0", "block1", "feature"]
    assert all(stages[f"block{i}"].shape == (3, tt.WIDTH, grid, grid) for i in range(tt.DEPTH))
    expected = _library_feature(layout, models[layout], (x - encoder._mean) / encoder._std)
    torch.testing.assert_close(stages["feature"], expected)
    assert encoder.project(x).shape == (3, encoder.config.proj_dim)
    fresh = encoder.empty_like()
    assert isinstance(fresh, TowerEncoder) and fresh.config == encoder.config
    assert not torch.equal(fresh.backbone.state_dict()[next(iter(fresh.backbone.state_dict()))],
                           encoder.backbone.state_dict()[next(iter(encoder.backbone.state_dict()))])


@pytest.mark.parametrize("layout", list(SAVERS))
def test_a_tower_goes_back_into_its_layout_and_its_stored_form(towers, layout, tmp_path):
    files, _ = towers
    encoder, _ = load_any_checkpoint(files[layout])
    with torch.no_grad():
        for p in encoder.backbone.parameters():
            p.add_(0.01)
    written = save_like_any(encoder, files[layout], tmp_path / "out.pt")
    assert written["layout"] == layout
    before, after = read_checkpoint(files[layout]), read_checkpoint(tmp_path / "out.pt")
    assert set(before.state) == set(after.state)
    carried = written["carried_unchanged"]  # the classifier head / the text tower, untouched
    assert carried and all(torch.equal(before.state[k], after.state[k]) for k in carried)
    back, _ = load_any_checkpoint(tmp_path / "out.pt")
    x = torch.rand(2, 3, tt.IMAGE, tt.IMAGE)
    torch.testing.assert_close(back.eval().features(x), encoder.eval().features(x))
    save_encoder(encoder, tmp_path / "stored.pt")  # what a pipeline stage stores
    torch.testing.assert_close(load_any_encoder(tmp_path / "stored.pt").eval().features(x), encoder.features(x))


@pytest.mark.parametrize("layout", ["open_clip", "hf-clip"])
def test_the_text_tower_embeds_prompts_as_its_library_does(towers, layout, tmp_path):
    import open_clip
    files, models = towers
    assert save_text_tower(files[layout], tmp_path / "text.pt")
    prompts = ["a photo of a cat.", "a photo of a truck."]
    ours = load_text_tower(tmp_path / "text.pt").encode(prompts)
    tokens = open_clip.tokenize(prompts)
    with torch.no_grad():
        if layout == "open_clip":
            theirs = models[layout].encode_text(tokens)
        else:
            theirs = models[layout].get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())
            theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
    torch.testing.assert_close(ours, F.normalize(theirs, dim=1))


def test_other_layouts_and_clip_resnets_are_one_line_errors(tmp_path):
    torch.save({"visual.attnpool.c_proj.weight": torch.zeros(2, 2), "visual.layer1.0.conv1.weight": torch.zeros(1)},
               tmp_path / "rn50.pt")
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        load_any_checkpoint(tmp_path / "rn50.pt")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        load_any_checkpoint(tmp_path / "other.pt")
    message = str(err.value)
    assert "\n" not in message and "'f.f.0.weight'" in message and "'patch_embed.proj.weight'" in message
    assert "'visual.conv1.weight'" in message and "'vision_model.embeddings.patch_embedding.weight'" in message


# ----------------------------------------------------------------- every defense that makes sense on a ViT

MICRO = {  # budgets of a few steps: the mechanics, not the numbers
    "ft": {"epochs": 1, "batch_size": 32},
    "fp": {"epochs": 1, "batch_size": 32, "ratio_step": 0.1},
    "nad": {"teacher_epochs": 1, "epochs": 1, "batch_size": 32},
    "medic": {"epochs": 1, "batch_size": 32},
    "mimic": {"epochs": 1, "mi_epochs": 2, "mi_hidden": 16, "batch_size": 32},
    "decree": {"inv_max_steps": 8, "inv_batch_size": 16, "inv_epoch_steps": 4, "epochs": 1, "batch_size": 32},
    "decree-unlearn": {"inv_max_steps": 8, "inv_batch_size": 16, "inv_epoch_steps": 4, "epochs": 1,
                       "batch_size": 32},
    "ssl-cleanse": {"clusters": 3, "kmeans_restarts": 1, "inv_epochs": 1, "inv_batch_size": 16, "knn_images": 32,
                    "unlearn_steps": 2, "batch_size": 32},
    "dede": {"steps": 2, "batch_size": 16, "encoder_layers": 1, "decoder_layers": 1, "emb_dim": 24},
    "moth": {"clusters": 3, "steps": 3, "warmup_per_class": 4, "warmup_inv_steps": 2, "inv_steps": 2,
             "reuse_inv_steps": 1, "inv_batch_size": 16, "batch_size": 32, "improvement_ramp": 2},
}


@pytest.mark.parametrize("defense", list(MICRO))
def test_each_defense_runs_on_a_vit(towers, defense):
    encoder, _ = load_any_checkpoint(towers[0]["timm"])
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    component = DEFENSES.get(defense)
    cfg = component.make_config("ci", MICRO[defense])
    ctx = RunContext(device=torch.device("cpu")).reseed(0)
    images = torch.randint(0, 256, (64, 3, tt.IMAGE, tt.IMAGE), dtype=torch.uint8)
    out = on_transformers.runner(component, encoder)(encoder, CleanData(images), cfg, ctx)
    plain = out.plain() if hasattr(out, "plain") else out  # DeDe wraps the suspect with its screen
    assert is_transformer(plain) and plain.config == encoder.config
    state = plain.backbone.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    changed = any(not torch.equal(state[k], before[k]) for k in before)
    # DeDe screens inputs and leaves the encoder as it is; SSL-Cleanse unlearns only the triggers it found
    assert changed == (defense != "dede" and ctx.records.get("ssl_cleanse_unlearned_triggers", 1) > 0)
    if defense == "fp":  # the pruned MLP units of the last block stay zero after fine-tuning
        pruned = ctx.records["fp_pruned_channels"]
        fc1 = plain.backbone.model.blocks[-1].mlp.fc1
        assert ctx.records["fp_site"] == "mlp hidden units" and pruned
        assert fc1.weight[pruned].abs().sum() == 0 and fc1.bias[pruned].abs().sum() == 0
    if defense == "nad":
        assert ctx.records["nad_at_stages"] == ["block0", "block1"]
    if defense == "medic":
        assert ctx.records["medic_layers"] == "stages"


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


SETS = ["--profile", "ci", "--device", "cpu", "--set", "clean.max_images=64", "--set", "evaluate.epochs=2",
        "--set", "evaluate.max_train=200", "--set", "evaluate.max_test=100", "--set", "defense.ft.epochs=1",
        "--set", "defense.mimic.epochs=1", "--set", "defense.mimic.mi_epochs=2", "--set", "defense.medic.epochs=1",
        "--set", "protocols.finetune_epochs=1"]


@pytest.mark.parametrize("layout", ["timm", "open_clip"])
def test_defend_evaluate_and_detect_a_tower_from_the_command_line(towers, layout, tmp_path):
    source = towers[0][layout]
    for defense in ("ft", "mimic", "medic"):
        out = tmp_path / f"{defense}.pt"
        result = _cli("defend", "--encoder", source, "--defense", defense, "--clean", PRETRAIN, "-o", out, *SETS)
        assert result.exit_code == 0, result.output
        assert f"({layout} layout" in result.output and load_any_checkpoint(out)[1]["layout"] == layout
    protocols = ["mlp", "linear", "knn", "finetune"] + (["zeroshot"] if layout == "open_clip" else [])
    for protocol in protocols:
        result = _cli("evaluate", "--encoder", tmp_path / "mimic.pt", "--downstream", TASK, "--trigger", "patch:10",
                      "--protocol", protocol, "--json", *SETS)
        assert result.exit_code == 0, result.output
        row = json.loads(result.output)
        assert row["protocol"] == protocol and 0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100
    if layout == "timm":  # no text tower: zero-shot is refused up front, in one line
        result = _cli("evaluate", "--encoder", source, "--downstream", TASK, "--protocol", "zeroshot", *SETS)
        assert result.exit_code != 0 and "text tower" in result.output and len(result.output.splitlines()) == 1
    result = _cli("detect", "--encoder", source, "--profile", "ci", "--images", "32", "--restarts", "1",
                  "--set", "defense.decree.inv_max_steps=8", "--set", "defense.decree.inv_batch_size=16", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["checkpoint"]["layout"] == layout


@pytest.mark.parametrize("defense", ["anp", "patchsearch"])
def test_a_defense_that_cannot_run_on_a_vit_refuses_before_any_compute(towers, defense, tmp_path, monkeypatch):
    monkeypatch.setenv("DEFBENCH_HOME", str(tmp_path / "home"))
    result = _cli("defend", "--encoder", towers[0]["hf-clip"], "--defense", defense, "--clean", PRETRAIN,
                  "-o", tmp_path / "out.pt", "--profile", "ci")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and "cannot run on a transformer tower" in lines[0]
    assert not (tmp_path / "home").exists() and not (tmp_path / "out.pt").exists()
