import dataclasses
import hashlib

import pytest
import torch

from defbench.benchmark.datasets import FAMILIES, data_version, get_spec, load_dataset
from defbench.benchmark.datasets import synthetic


def _digest(data) -> str:
    return hashlib.sha256(data.images.numpy().tobytes() + data.labels.numpy().tobytes()).hexdigest()


def test_generation_is_deterministic_and_balanced():
    spec = synthetic.SETS["synth-svhn"]
    a, b = synthetic.generate(spec, "test"), synthetic.generate(spec, "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    counts = torch.bincount(a.labels)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    train = synthetic.generate(spec, "train")
    assert not torch.equal(train.images[:100], a.images[:100])


@pytest.mark.parametrize("name", list(synthetic.SETS))
def test_same_bytes_twice_even_with_a_fresh_texture_bank(name):
    small = dataclasses.replace(synthetic.SETS[name], sizes=(300, 300))
    first = _digest(synthetic.generate(small, "train"))
    synthetic.texture_bank.cache_clear()  # a new process draws the bank again, from the same seed
    assert _digest(synthetic.generate(small, "train")) == first
    assert _digest(synthetic.generate(small, "test")) != first


def test_version_classes_targets_and_sizes():
    assert synthetic.GENERATOR_VERSION == 5
    expected = {"synth-cifar10": (10, 0, (20000, 4000)), "synth-stl10": (10, 9, (20000, 4000)),
                "synth-gtsrb": (43, 12, (12900, 4300)), "synth-svhn": (10, 1, (12000, 4000))}
    for name, (classes, target, sizes) in expected.items():
        spec = synthetic.SETS[name]
        make_templates, _ = synthetic._RENDER[spec.kind]
        names, templates = make_templates()
        assert len(names) == classes and templates.shape == (classes, 3, synthetic.RES, synthetic.RES)
        assert spec.default_target == target and get_spec(name).default_target == target
        assert spec.sizes == sizes
        assert data_version(name) == ("synthetic-v5r1" if name == "synth-svhn" else "synthetic-v5")
    # the two object sets share their classes (pre-training on one transfers to the other)
    assert synthetic.object_templates()[0] == list(synthetic._OBJECT_PRIORS)
    small = dataclasses.replace(synthetic.SETS["synth-gtsrb"], sizes=(430, 86))
    counts = torch.bincount(synthetic.generate(small, "train").labels, minlength=43)
    assert counts.min() == counts.max() == 10


def test_family_mirrors_the_paper_roles(tmp_path):
    gtsrb = load_dataset("synth-gtsrb", "test", tmp_path, 32)
    assert gtsrb.num_classes == 43 and gtsrb.classes[12] == "priority"
    assert load_dataset("synth-svhn", "test", tmp_path, 32).num_classes == 10
    pretrain = load_dataset("synth-cifar10", "pretrain", tmp_path, 32)
    assert pretrain.images.shape[1:] == (3, 32, 32) and pretrain.images.dtype == torch.uint8
    assert [t for t, _ in FAMILIES["synth-cifar10"]] == ["synth-gtsrb", "synth-svhn", "synth-stl10"]
    assert dict(FAMILIES["synth-cifar10"]) == {"synth-gtsrb": 12, "synth-svhn": 1, "synth-stl10": 9}


def test_images_are_not_trivial():
    data = load_dataset("synth-cifar10", "test", "", 32)
    x = data.images[:500].float()
    assert x.std() > 30  # real contrast, not flat colour fields
    # classes differ on average, but no single pixel statistic separates them
    means = torch.stack([x[data.labels[:500] == c].mean(0) for c in range(10)])
    assert means.std(0).mean() < x.std(0).mean()


def test_resize_to_other_profile_sizes():
    small = load_dataset("synth-svhn", "test", "", 16)
    assert small.images.shape[-2:] == (16, 16)


def test_cache_file_is_written_and_reused(session_home):
    load_dataset("synth-stl10", "test", "", 32)
    cached = list((session_home / "cache" / "synthetic").glob("synth-stl10-*-test.pt"))
    assert cached
