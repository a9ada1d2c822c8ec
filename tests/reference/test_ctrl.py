"""CTRL's poisons against meet-cjli/CTRL's own ``PoisonFre.Poison_Frequency_Diff`` (trace in ctrl.json).

The reference (README run: channels U and V, positions (15, 15) and (31, 31), window 32, magnitude 100)
stamped four clean-label poisons and every test image of the fixed inputs; defbench's ``CTRLTrigger``
stamps the same float images. One step differs on purpose: defbench returns to RGB through the exact
inverse of the YUV matrix, kornia (the reference's library) through rounded coefficients. So the
comparison is made twice:

- with kornia's inverse coefficients put in place of defbench's ``yuv_to_rgb`` (test-only), every other
  step must agree to ``ATOL`` = 1e-3 of a pixel level: values up to 255 pass a 32-point DCT with
  coefficients up to ~5e3 in fp32 (relative rounding ~6e-8), which leaves ~2e-4 of a level; 1e-3 is 5x that;
- as shipped, the difference must stay under half a level (``EXACT_INVERSE_BOUND``): kornia's coefficients
  (1.14 for 1.1398, 2.029 for 2.0321, ...) move a pixel by at most |(M^-1 - K) yuv| < 0.4 of a level.

The reference's choice of poisons (the first ``int(ratio * N)`` target-class images of the pre-training
set, in place) differs by design: defbench's pre-training sets carry no labels (docs/methods/ctrl.md).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from . import _poison_common as P
from defbench.attacks import ctrl

REF = P.load_trace("ctrl")
TRACE = REF["trace"]
ATOL = 1e-3  # pixel levels (0..255), see the module docstring
EXACT_INVERSE_BOUND = 0.5  # pixel levels
SUM_ATOL = 3072 * 3e-4  # an image's 3,072 values, each within fp32 rounding (~2e-4 of a level) of the reference
# kornia.color.yuv_to_rgb (0.6.5): r = y + 1.14 v; g = y - 0.396 u - 0.581 v; b = y + 2.029 u
KORNIA_YUV_TO_RGB = torch.tensor([[1.0, 0.0, 1.14], [1.0, -0.396, -0.581], [1.0, 2.029, 0.0]], dtype=torch.float64)


def _stamped(index: list[int]) -> torch.Tensor:
    """defbench's trigger (the config's defaults at 32 px) on images ``index`` as floats, in pixel scale."""
    trigger = ctrl.CTRLConfig().make_trigger(32)
    return trigger.apply(P.images()[index].float() / 255.0).double() * 255.0


def _reference(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(3, 32, 32)


def _checksum(image: torch.Tensor) -> list[float]:
    return [float(image.sum()), float(image.pow(2).sum())]


@pytest.fixture
def kornia_inverse(monkeypatch):
    monkeypatch.setattr(ctrl, "yuv_to_rgb", lambda x: ctrl._colour(x, KORNIA_YUV_TO_RGB))


def test_settings_are_the_readme_run():
    cfg, settings = ctrl.CTRLConfig(), REF["settings"]
    trigger = cfg.make_trigger(32)
    assert trigger.magnitude == settings["magnitude"]
    assert list(trigger.channels) == settings["channels"]
    assert [list(p) for p in trigger.positions] == [[p, p] for p in settings["trigger_position"]]


def test_yuv_dct_matches_the_reference():
    """rgb_to_yuv (kornia's forward matrix) then the orthonormal DCT-II, in pixel scale, on a smooth image."""
    ours = ctrl.dct2(ctrl.rgb_to_yuv(P.images()[16:17].float())).double().flatten()
    ref = torch.tensor(TRACE["yuv_dct_image16"], dtype=torch.float64)
    # ~1e-6 of the largest coefficient (|X| up to ~5e3): fp32 rounding of a 32-point transform
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=0, atol=5e-3)


def test_poisons_match_the_reference_given_kornia_inverse(kornia_inverse):
    for key, values in TRACE["train_poisons"].items():
        np.testing.assert_allclose(_stamped([int(key)])[0].numpy(), _reference(values).numpy(), rtol=0, atol=ATOL,
                                   err_msg=f"train poison {key}")
    np.testing.assert_allclose(_stamped([16])[0].numpy(), _reference(TRACE["test_poisons"]["16"]).numpy(),
                               rtol=0, atol=ATOL, err_msg="test image 16")


def _assert_checksums(images: torch.Tensor, refs: list[dict], what: str) -> None:
    """Sum within ``SUM_ATOL`` and sum of squares within ``2 * 255 * SUM_ATOL`` (values up to 255)."""
    for i, (image, ref) in enumerate(zip(images, refs)):
        s, sq = _checksum(image)
        assert abs(s - ref["sum"]) <= SUM_ATOL, f"{what}[{i}] sum: defbench {s} vs reference {ref['sum']}"
        assert abs(sq - ref["sq"]) <= 2 * 255 * SUM_ATOL, f"{what}[{i}] sum of squares: {sq} vs {ref['sq']}"


def test_poison_checksums_match_the_reference_given_kornia_inverse(kornia_inverse):
    """Sum and sum of squares of every stamped image (the four poisons and all 32 test images)."""
    train = sorted(TRACE["train_poisons_checksum"], key=int)
    _assert_checksums(_stamped([int(k) for k in train]), [TRACE["train_poisons_checksum"][k] for k in train],
                      "train poison")
    _assert_checksums(_stamped(list(range(32))), TRACE["test_poisons_checksum"], "test image")


def test_exact_inverse_stays_within_half_a_level():
    """As shipped (exact inverse): the documented deviation, below half a pixel level everywhere."""
    worst = 0.0
    for key, values in TRACE["train_poisons"].items():
        worst = max(worst, float((_stamped([int(key)])[0] - _reference(values)).abs().max()))
    assert 0.0 < worst < EXACT_INVERSE_BOUND, f"exact-inverse deviation {worst:.3f} levels"


def test_poison_count_and_labels_match_the_reference():
    """The reference poisons int(ratio * N) images and never touches a label; test images get the target label."""
    n = len(P.images())
    assert round(REF["settings"]["poison_ratio"] * n) == TRACE["poison_num"] == len(TRACE["poison_index"])
    assert TRACE["labels_unchanged"] and TRACE["test_labels"] == [REF["settings"]["target_class"]]
