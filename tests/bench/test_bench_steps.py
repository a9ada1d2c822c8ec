"""Throughput of the stages that dominate the cost, as ratios to the plain encoder (see conftest).

Run with `make bench` (pytest --benchmark-only). Encoder width and batch follow
the `ci` profile unless DEFBENCH_BENCH_PROFILE says otherwise.
"""
import os
import subprocess
import sys

import pytest
import torch

from defbench.attacks import PatchTrigger
from defbench.attacks.badencoder import badencoder_loss
from defbench.benchmark.pipeline import evaluate as evaluation
from defbench.benchmark.pipeline.settings import load_profile
from defbench.defenses import DEFENSES, CleanData
from defbench.encoders import RunContext, build_encoder, contrastive_loss, frozen_copy
from defbench.encoders.augment import SimCLRAugment

PROFILE = load_profile(os.environ.get("DEFBENCH_BENCH_PROFILE", "ci"))
BATCH = 128


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    encoder = build_encoder(PROFILE.encoder).train()
    x = torch.rand(BATCH, 3, PROFILE.encoder.image_size, PROFILE.encoder.image_size)
    return encoder, x, RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)


@pytest.mark.benchmark(group="train")
def test_plain_forward_backward(benchmark, setup):
    encoder, x, _ = setup
    benchmark(lambda: encoder.features(x).sum().backward())


@pytest.mark.benchmark(group="infer")
def test_plain_forward(benchmark, setup):
    encoder, x, _ = setup
    with torch.no_grad():
        benchmark(lambda: encoder.features(x))


@pytest.mark.benchmark(group="train")
def test_simclr_step(benchmark, setup):
    encoder, x, _ = setup
    opt = torch.optim.Adam(encoder.parameters(), 1e-3)
    augment = SimCLRAugment()

    def step():
        loss = contrastive_loss(encoder, x, augment, 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    benchmark(step)


@pytest.mark.benchmark(group="train")
def test_badencoder_step(benchmark, setup):
    encoder, x, _ = setup
    clean = frozen_copy(encoder)
    trigger, refs = PatchTrigger(), x[:10]
    opt = torch.optim.SGD(encoder.backbone.parameters(), 1e-3, momentum=0.9)
    augment = SimCLRAugment(crop=False)

    def step():
        loss, *_ = badencoder_loss(encoder, clean, x, trigger.apply(x), refs, augment(refs.repeat(12, 1, 1, 1)), 1, 1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    benchmark(step)


@pytest.mark.benchmark(group="infer")
def test_feature_extraction(benchmark, setup):
    encoder, x, ctx = setup
    images = (x * 255).to(torch.uint8)
    benchmark(lambda: evaluation.extract_features(encoder, images, ctx, BATCH))


@pytest.mark.benchmark(group="infer")
def test_mlp_probe_epoch_on_batch_features(benchmark, setup):
    encoder, x, ctx = setup
    feats = torch.nn.functional.normalize(torch.randn(BATCH, encoder.feature_dim), dim=1)
    labels = torch.randint(0, 10, (BATCH,))
    cfg = PROFILE.evaluate.__class__(**{**PROFILE.evaluate.__dict__, "epochs": 1})
    benchmark(lambda: evaluation.train_probe(feats, labels, 10, cfg, ctx))


@pytest.mark.parametrize("name", [n for n in DEFENSES.names() if n != "none"])
@pytest.mark.benchmark(group="defense")
def test_defense_on_256_clean_images(benchmark, setup, name):
    """A whole defense at the profile's settings on 256 images, in plain fwd+bwd units (see summary)."""
    encoder, x, ctx = setup
    component = DEFENSES.get(name)
    cfg = component.make_config(PROFILE.name)
    clean = CleanData(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8))
    benchmark.pedantic(lambda: component.fn(encoder.clone().eval(), clean, cfg, ctx), rounds=1, iterations=1)


@pytest.mark.benchmark(group="grid")
def test_fully_cached_grid_rerun(benchmark, tmp_path_factory):
    """The harness overhead: a grid whose every stage is cached (the micro grid of test_grid)."""
    from test_grid import GRID, MICRO
    home = tmp_path_factory.mktemp("bench-grid")
    env = {**os.environ, "DEFBENCH_HOME": str(home), "DEFBENCH_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "defbench.benchmark.cli", "grid", *GRID, *[x for s in MICRO for x in ("--set", s)]]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    benchmark.pedantic(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True), rounds=2, iterations=1)
