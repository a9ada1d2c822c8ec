import pytest
import torch

from defbench.attacks import PatchTrigger, trigger_from_description


def test_paper_trigger_is_a_white_square_at_rows_21_to_30():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    out = PatchTrigger().apply(images)
    changed = (out != images).any(1)[0]
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() == 21 and rows.max() == 30 and cols.min() == 21 and cols.max() == 30
    assert changed.sum() == 100 and (out[:, :, 21:31, 21:31] == 255).all()
    assert images.sum() == 0  # the input is not modified


def test_float_images_get_the_same_stamp():
    x = torch.rand(1, 3, 32, 32)
    t = PatchTrigger(size=5)
    y = t.apply(x)
    assert torch.equal(y[..., 26:31, 26:31], torch.ones(1, 3, 5, 5))
    assert torch.equal(y * (1 - t.mask()), x * (1 - t.mask()))


def test_size_and_position_are_parameters_and_checked():
    t = PatchTrigger(size=3, row=0, col=4)
    assert t.mask()[0:3, 4:7].sum() == 9 and t.mask().sum() == 9
    with pytest.raises(ValueError, match="does not fit"):
        PatchTrigger(size=40)


def test_description_round_trip():
    t = PatchTrigger(size=5, row=2, col=3)
    assert trigger_from_description(t.describe()) == t
