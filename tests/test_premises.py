"""The data-premise measures: a spectrum estimator checked on fields of known slope, the near-white
counters on crafted images, and every embedded set meeting the premises."""
import dataclasses

import pytest
import torch

from defbench.benchmark.datasets import premises, synthetic


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("pad", [1, 4])
def test_spectrum_slope_recovers_a_known_exponent(alpha, pad):
    # pad=1: periodic fields; pad=4: 32 x 32 crops of a 128 x 128 field, with a frame like a photograph's
    field = premises.power_law_field(200, 32, alpha, torch.Generator().manual_seed(1), pad=pad)
    assert premises.spectrum_slope(field)["slope"] == pytest.approx(-alpha, abs=0.1)


def test_spectrum_slope_on_uint8_rgb_images():
    field = premises.power_law_field(200, 32, 1.2, torch.Generator().manual_seed(2), pad=4)
    grey = (128 + 30 * field).clamp(0, 255).round().to(torch.uint8)
    images = grey[:, None].expand(-1, 3, -1, -1).contiguous()
    result = premises.spectrum_slope(images)
    assert result["slope"] == pytest.approx(-1.2, abs=0.1)
    assert result["slope_iqr"][0] <= result["slope_median"] <= result["slope_iqr"][1]
    white = torch.randint(0, 256, (200, 3, 32, 32), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    assert abs(premises.spectrum_slope(white)["slope"]) < 0.15  # white noise: flat


def _black(n=1):
    return torch.zeros(n, 3, 32, 32, dtype=torch.uint8)


def test_white_window_on_crafted_images():
    x = _black(6)
    x[0, :, 2:12, 3:13] = 255  # a full 10x10 white square
    x[1, :, 2:12, 3:13] = 255
    x[1, :, 2, 3:12] = 0  # 9 of 100 pixels dark: still >= 90 % near-white
    x[2, :, 2:12, 3:13] = 255
    x[2, :, 2, 3:13] = 0
    x[2, :, 3, 3] = 0  # 11 dark: below 90 %
    x[3, :, 5:15, 5:15] = premises.NEAR_WHITE  # exactly the near-white level counts
    x[4, :, 5:15, 5:15] = premises.NEAR_WHITE - 1  # one grey level below does not
    x[5, :, 5:15, 5:15] = 255
    x[5, 2, 5:15, 5:15] = 200  # pale yellow: not every channel is near-white
    assert premises.white_window(x).tolist() == [True, True, False, True, False, False]
    # float images (augmented views) in 0..1 give the same answer
    assert premises.white_window(x.float() / 255).tolist() == [True, True, False, True, False, False]
    assert premises.near_white(x).shape == (6, 32, 32)


def test_trigger_box_half_white_on_crafted_images():
    x = _black(4)
    x[0, :, 21:31, 21:26] = 255  # left half of the trigger's box: exactly 50 %
    x[1, :, 21:31, 21:25] = 255  # 40 %
    x[2, :, 0:10, 0:10] = 255  # white, but elsewhere
    x[3, :, 21:31, 21:31] = 255
    assert premises.trigger_box_white(x).tolist() == [True, False, False, True]
    assert premises.white_window(x).tolist() == [False, False, True, True]


def test_augmented_views_are_seeded_and_leave_the_global_rng_alone():
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    state = torch.random.get_rng_state()
    a, b = premises.augmented_views(x, 2, seed=5), premises.augmented_views(x, 2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and a.shape == (16, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert not torch.equal(a, premises.augmented_views(x, 2, seed=6))


@pytest.mark.parametrize("name", list(synthetic.SETS))
def test_every_embedded_set_meets_the_data_premises(name):
    spec = synthetic.SETS[name]
    small = dataclasses.replace(spec, sizes=(300, 300))  # same generator, a few hundred images
    result = premises.image_premises(synthetic.generate(small, "test").images, views=2, seed=0)
    low, high = premises.TARGETS["spectrum_slope"]
    assert low <= result["slope"] <= high, result
    assert result["white_window_clean"] <= 0.01, result
    assert result["white_window_augmented"] <= 0.01, result
    assert result["trigger_box_half_white"] <= 0.01, result
    assert all(result["passes"].values())


def test_data_premises_reads_a_registered_set():
    result = premises.data_premises("synth-svhn", "test", n=200, views=1)
    assert result["name"] == "synth-svhn" and result["n"] == 200
    assert result["data_version"] == synthetic.SETS["synth-svhn"].version
    assert result["data_version"] == f"synthetic-v{synthetic.GENERATOR_VERSION}r1"
    assert set(result["passes"]) == {"spectrum_slope", "white_window_clean", "white_window_augmented",
                                     "trigger_box_half_white"}
