"""The traces call NAD's and MEDIC's per-batch ``step`` on a student the test put in train mode; this checks that
the defenses' own entry points do the same before their first step (student in train mode, so BatchNorm uses the
batch's statistics as the references' ``model.train()``; teacher in eval mode), which the traces do not cover."""
from __future__ import annotations

import pytest
import torch

from defbench.defenses import DEFENSES
from defbench.defenses import medic as medic_module
from defbench.defenses import nad as nad_module
from defbench.defenses.base import CleanData
from defbench.encoders import RunContext

from . import _classic_common as C


class _Stop(Exception):
    """Raised by the recording step: the first step's modes are all the test needs."""


@pytest.mark.parametrize("name, module", [("nad", nad_module), ("medic", medic_module)])
def test_the_entry_point_trains_the_student_and_keeps_the_teacher_in_eval(name, module, monkeypatch):
    seen = {}

    def recording_step(student, teacher, *args, **kwargs):
        seen.update(student=student.training, teacher=None if teacher is None else teacher.training)
        raise _Stop

    monkeypatch.setattr(module, "step", recording_step)
    component = DEFENSES.get(name)
    ctx = RunContext(device=torch.device("cpu"), show_progress=False).reseed(0)
    images = C.uint8("view1")
    with pytest.raises(_Stop):
        component.fn(C.encoder("suspect"), CleanData(images), component.make_config("ci", {}), ctx)
    assert seen["student"] is True, f"{name} stepped a student in eval mode"
    assert seen["teacher"] in (False, None), f"{name} stepped with its teacher in train mode"
