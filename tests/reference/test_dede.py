"""DeDe against its authors' code (tardisblue9/DeDe ``src/main.py`` ``train_decoder``, ``src/decoder_model.py``
``DecoderModel``, ``src/utils.py`` ``MAE_error``): four Adam updates of ``defenses/dede.py`` ``train_decoder`` on
the trace's encoder, images, decoder weights and masks, then the detection errors of ``DeDeDecoder.score``
(``dede.json``; how it was recorded: there).

Tolerance: both sides run fp32 on the CPU with the same visible patches in the same order, but the reference
computes the suspect's features per batch inside the training loop and defbench once for all images, and its
timm blocks and einops rearrangements order the same operations differently from defbench's written-out
blocks. Measured over the four updates: losses to 1e-7 relative, gradient norms and updates to 6e-6 relative,
the detection errors to 2e-7 relative. The test allows 1e-5 relative on losses and errors and 1e-3 on
gradient norms and updates (Adam divides by sqrt(v) + eps, so an entry with a gradient near eps moves by a
rounding-sized difference times lr); a change of the method (mean taken as a sum, the mask's normalisation
dropped, a different LayerNorm eps, the global token kept instead of replaced) moves them by far more.
"""
from __future__ import annotations

import re

import torch

from defbench.defenses import dede
from defbench.encoders import RunContext

from ._ssl_common import (compare, compare_params, load_inputs, load_release, load_trace, param_record,
                          release_shapes, release_state, small_init_state, state_checksum)

LOSS_RTOL, RTOL = 1e-5, 1e-3

# defbench DeDeDecoder key -> the reference DecoderModel's key (blocks: timm's attn.* / mlp.* submodules)
_PREFIX = {"cls_token": "encoder.cls_token", "enc_pos": "encoder.pos_embedding", "patchify.": "encoder.patchify.",
           "enc_norm.": "encoder.layer_norm.", "embed.weight": "mlp.0.weight", "mask_token": "decoder.mask_token",
           "dec_pos": "decoder.pos_embedding", "out.": "decoder.head."}
_BLOCK = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2", "norm1": "norm1",
          "norm2": "norm2"}


def reference_name(key: str) -> str:
    block = re.fullmatch(r"(encoder|decoder)\.(\d+)\.(\w+)\.(weight|bias)", key)
    if block:
        side, i, layer, leaf = block.groups()
        return f"{side}.transformer.{i}.{_BLOCK[layer]}.{leaf}"
    for ours, theirs in _PREFIX.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(key)


def build_decoder(trace: dict, feature_dim: int, mean, std) -> tuple[dede.DeDeDecoder, float]:
    """defbench's decoder at the trace's settings holding the reference's initial weights (mapped by name)."""
    s = trace["settings"]
    config = {key: s[key] for key in ("image_size", "patch_size", "emb_dim", "encoder_layers", "decoder_layers",
                                      "test_mask_ratio")}
    config.update(feature_dim=feature_dim, encoder_heads=s["heads"], decoder_heads=s["heads"], mean=list(mean),
                  std=list(std), mask_seed=0)
    decoder = dede.DeDeDecoder(config)
    ours = decoder.state_dict()
    shapes = {reference_name(k): tuple(v.shape) for k, v in ours.items()}
    shapes = {k: (v[1], 1, v[2]) if k.endswith("pos_embedding") else v for k, v in shapes.items()}  # theirs: T x 1 x C
    init = small_init_state("dede", shapes)
    decoder.load_state_dict({k: init[reference_name(k)].reshape(v.shape) for k, v in ours.items()})
    return decoder, state_checksum(init)


def run_defbench(trace: dict, monkeypatch):
    """train_decoder and score on the trace's inputs: per-update records, the losses, the errors, the checksums."""
    encoder, _ = load_release(release_state("suspect", release_shapes()))
    encoder.eval()
    images = torch.from_numpy(load_inputs()["images"]).permute(0, 3, 1, 2).contiguous()
    x = images.float().div(255.0)
    with torch.no_grad():
        features = encoder.features(x)
    decoder, decoder_checksum = build_decoder(trace, encoder.feature_dim, encoder.config.mean, encoder.config.std)
    steps = trace["trace"]["steps"]
    draws = iter(torch.tensor(step["visible"]) for step in steps)
    monkeypatch.setattr(dede, "random_visible", lambda n, tokens, keep, generator: next(draws))
    s = trace["settings"]
    cfg = dede.DeDeConfig(steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
                          mask_ratio=s["mask_ratio"])
    ctx = RunContext(device=torch.device("cpu"), seed=0)
    batches = [torch.tensor(b) for b in trace["inputs"]["batches"]]
    ctx.batches = lambda n, batch_size, **k: list(batches)  # the reference's loader: shuffle=False, drop_last
    named = {reference_name(k): p for k, p in decoder.named_parameters()}
    start = {k: p.detach().clone() for k, p in named.items()}
    records, losses = [], []

    def monitor(loss):
        losses.append(loss)
        records.append(param_record(named, start))

    dede.train_decoder(decoder, images, features, cfg, ctx, monitor=monitor)
    errors = decoder.score(x, features)
    return records, losses, errors.tolist(), decoder_checksum


def test_dede_decoder_training_and_errors_match_the_reference(monkeypatch):
    trace = load_trace("dede")
    records, losses, errors, decoder_checksum = run_defbench(trace, monkeypatch)
    want_inputs = trace["inputs"]["weights"]
    compare("suspect weights from the shared generator", state_checksum(release_state("suspect", release_shapes())),
            want_inputs["suspect"], 1e-9, 0)
    compare("decoder weights from the shared generator", decoder_checksum, want_inputs["decoder"], 1e-9, 0)
    steps = trace["trace"]["steps"]
    assert len(records) == len(steps)
    for k, (rec, loss, want) in enumerate(zip(records, losses, steps)):
        compare(f"update {k + 1}: loss", loss, want["terms"]["loss"], LOSS_RTOL, 0.0)
        compare_params(f"update {k + 1}", rec, want["params"], RTOL)
    compare("detection errors (test_mask_ratio 0.99)", errors, trace["trace"]["errors"], LOSS_RTOL, 0.0)

