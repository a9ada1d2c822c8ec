import torch

from defbench.benchmark.datasets import FAMILIES, load_dataset
from defbench.benchmark.datasets import synthetic


def test_generation_is_deterministic_and_balanced():
    spec = synthetic.SETS["synth-svhn"]
    a, b = synthetic.generate(spec, "test"), synthetic.generate(spec, "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    counts = torch.bincount(a.labels)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    train = synthetic.generate(spec, "train")
    assert not torch.equal(train.images[:100], a.images[:100])


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
