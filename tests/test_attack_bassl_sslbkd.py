"""``bassl-sslbkd``: BASSL with the settings of UMBCvision/SSL-Backdoor's poison generator.

The variant registers with the reference's values; its poisoned set has the reference's properties (every
target-class image poisoned, an opaque HTBA-style patch, a random place inside the central half for poisons and
inside [0.10, 0.90] for test images), found here by searching the images for the patch rather than by asking the
code where it put it; and it plans and runs at the ci profile (micro settings) through the pipeline.
"""
from __future__ import annotations

import pytest
import torch

from conftest import MICRO, PRETRAIN, TASK
from defbench.attacks import ATTACKS, AttackInputs, trigger_from_description
from defbench.attacks import bassl as bassl_module
from defbench.attacks.bassl_sslbkd import HTBATrigger
from defbench.benchmark.pipeline.inputs import attack_inputs
from defbench.benchmark.pipeline.plan import cell_stages
from defbench.benchmark.pipeline.results import ResultsDB
from defbench.benchmark.pipeline.scheduler import run_grid
from defbench.benchmark.pipeline.settings import load_profile, parse_sets
from defbench.benchmark.pipeline.stages import Env
from defbench.benchmark.pipeline.store import ArtifactStore
from defbench.encoders import SimCLRConfig, build_encoder

SIZE = 32


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def find_patch(image: torch.Tensor, patch: torch.Tensor) -> list[tuple[int, int]]:
    """Every top-left (row, col) where ``patch`` stands in ``image`` pixel for pixel."""
    size = patch.shape[-1]
    return [(r, c) for r in range(SIZE - size + 1) for c in range(SIZE - size + 1)
            if torch.equal(image[:, r:r + size, c:c + size], patch)]


def test_registered_with_the_reference_settings():
    component = ATTACKS.get("bassl-sslbkd")
    assert component.options["needs_clean_encoder"] is False  # data poisoning, pre-trains from scratch
    cfg = component.make_config("paper")
    assert cfg.poison_fraction == 1.0  # every released cfg: poison_injection_rate=1.0
    assert cfg.train_region == (0.25, 0.75) and cfg.test_region == (0.10, 0.90)
    trigger = cfg.make_trigger(SIZE)
    assert isinstance(trigger, HTBATrigger) and (trigger.low, trigger.high) == (0.10, 0.90)
    assert trigger_from_description(trigger.describe()) == trigger  # stored results rebuild it
    for profile in ("tiny", "ci"):
        assert component.make_config(profile) == cfg  # nothing of the attack shrinks


def test_the_patch_is_an_htba_style_colour_grid():
    patch = HTBATrigger(size=40, image_size=64).pattern()  # 4 x 4 cells of 10 px: their centres keep the grid's colours
    centres = patch[:, 5::10, 5::10].int()
    assert centres.shape == (3, 4, 4)
    assert ((centres <= 40) | (centres >= 215)).all(), centres  # each channel of a cell is 0 or 255
    assert len({tuple(centres[:, i, j].tolist()) for i in range(4) for j in range(4)}) >= 3  # several colours
    assert not torch.equal(HTBATrigger(pattern_seed=10).pattern(), HTBATrigger(pattern_seed=11).pattern())


def test_every_target_image_is_poisoned_with_the_patch_at_a_random_central_place(monkeypatch, ctx):
    seen = {}

    def fake_train(encoder, images, cfg, ctx, desc=""):
        seen["images"] = images
        return [0.0]
    monkeypatch.setattr(bassl_module, "train_simclr", fake_train)  # the victim's training, shared with bassl
    pretrain, targets = _images(40, 1), _images(60, 2)
    component = ATTACKS.get("bassl-sslbkd")
    cfg = component.make_config("paper")
    inputs = AttackInputs(build_encoder(width=8).config, pretrain, targets, cfg.make_trigger(SIZE),
                          SimCLRConfig(epochs=1))
    component.fn(inputs, cfg, ctx)
    data = seen["images"]
    assert len(data) == 40 + 60 and torch.equal(data[:40], pretrain)  # rate 1.0: all 60 target images added
    assert ctx.records["n_poison"] == 60
    patch = inputs.trigger.pattern()
    corners, sources = [], set()
    for poison in data[40:]:
        found = find_patch(poison, patch)
        assert len(found) == 1, found  # one opaque patch
        r, c = found[0]
        assert 8 <= r <= 14 and 8 <= c <= 14  # whole patch inside [0.25, 0.75] of 32 px: corner in [8, 32*0.75-10]
        keep = torch.ones(SIZE, SIZE, dtype=torch.bool)
        keep[r:r + 10, c:c + 10] = False
        match = [i for i, t in enumerate(targets) if torch.equal(t[:, keep], poison[:, keep])]
        assert len(match) == 1  # the rest of the poison is one target image, untouched
        sources.add(match[0])
        corners.append((r, c))
    assert sources == set(range(60))  # each target image once
    rows, cols = {r for r, _ in corners}, {c for _, c in corners}
    assert rows == set(range(8, 15)) and cols == set(range(8, 15))  # random places: every allowed row and column


def test_test_images_get_the_patch_anywhere_in_the_wider_region_the_same_way_every_time():
    trigger = ATTACKS.get("bassl-sslbkd").make_config("paper").make_trigger(SIZE)
    images = _images(300, 3)
    stamped = trigger.apply(images)
    corners = [find_patch(image, trigger.pattern()) for image in stamped]
    assert all(len(found) == 1 for found in corners)
    rows = {found[0][0] for found in corners}
    assert min(rows) == 3 and max(rows) == 18  # int(0.10 * 32) .. int(0.90 * 32 - 10)
    halves = torch.cat([trigger.apply(images[:120]), trigger.apply(images[120:])])
    assert torch.equal(halves, stamped)  # a test image's place does not depend on its batch
    floats = trigger.apply(images.float() / 255)  # the evaluation stamps [0, 1] floats
    assert torch.equal((floats * 255).round().to(torch.uint8), stamped)


@pytest.mark.slow
def test_it_plans_and_runs_at_the_ci_profile(tmp_path):
    profile = load_profile("ci", parse_sets(MICRO))
    env = Env(ArtifactStore(tmp_path / "artifacts"), ResultsDB(tmp_path / "results.sqlite"), tmp_path / "data",
              torch.device("cpu"))
    cell = cell_stages(profile, "bassl-sslbkd", "ft", PRETRAIN, TASK)
    stages = list(cell.values())
    outcomes = run_grid(stages, env, show_progress=False)
    assert all(o.status == "ran" for o in outcomes), [(o.stage.label, o.error) for o in outcomes if o.error]
    attack = cell["undefended"].deps[0]
    assert attack.kind == "attack" and attack.spec["trigger"]["type"] == "htba"
    n_targets = len(attack_inputs(env.data_dir, attack.spec, None).target_images)
    records = env.store.read_meta("attack", attack.key)["records"]
    assert records["n_poison"] == n_targets > 0  # rate 1.0 of the downstream task's target class
    for role in ("clean", "undefended", "defended"):
        result = env.store.read_meta("evaluate", cell[role].key)["result"]
        assert 0 <= result["acc"] <= 100 and 0 <= result["asr_all"] <= 100, (role, result)
