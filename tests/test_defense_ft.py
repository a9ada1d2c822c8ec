"""FT: the paper profile is the reference recipe, scaled-down profiles only shrink the budget, and FP's
fine-tuning phase is FT's at every profile."""
from __future__ import annotations

import dataclasses

import pytest

from defbench.defenses import get_defense


def test_ft_paper_profile_is_the_reference_recipe():
    cfg = get_defense("ft").make_config("paper")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.cosine) == \
        (100, 256, 0.01, 0.9, 5e-4, True)
    recipe = cfg.recipe()
    assert (recipe.optimizer, recipe.lr, recipe.momentum, recipe.weight_decay, recipe.cosine, recipe.epochs) == \
        ("sgd", 0.01, 0.9, 5e-4, True, 100)


@pytest.mark.parametrize("profile", ["tiny", "ci"])
def test_ft_scaled_profiles_shrink_only_the_budget(profile):
    paper = get_defense("ft").make_config("paper")
    cfg = get_defense("ft").make_config(profile)
    assert cfg.epochs < paper.epochs and cfg.batch_size <= paper.batch_size
    budget = {"epochs", "batch_size"}
    assert {k: v for k, v in vars(cfg).items() if k not in budget} == \
        {k: v for k, v in vars(paper).items() if k not in budget}


@pytest.mark.parametrize("profile", ["paper", "tiny", "ci"])
def test_fp_fine_tuning_is_ft_at_every_profile(profile):
    ft = get_defense("ft").make_config(profile)
    fp = get_defense("fp").make_config(profile)
    assert dataclasses.asdict(fp.fine_tuning()) == dataclasses.asdict(ft)
