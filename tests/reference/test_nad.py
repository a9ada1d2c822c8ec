"""NAD's distillation step against bboylyg/NAD's own ``train_step`` and ``AT`` (trace in nad.json).

The reference ran with an NT-Xent task loss injected through its ``criterionCls`` (the encoder
adaptation), so every other part of the step is compared: attention maps, the three attention terms,
the weighted total, every parameter's gradient norm and the weights after each of 3 SGD (Nesterov)
steps; also the teacher's fine-tuning loop (the reference's beta = 0 run) and the lr schedule.

Tolerance: ``1e-5`` relative (fp32: the same operations in a different order, e.g. ``F.mse_loss``
against ``pow(2).mean()``, agree to ~1e-6) plus 10 x the recorded envelope (how far each value moved
when the reference itself was rerun with its weights nudged by 1e-7; see ``_classic_common``).
"""
from __future__ import annotations

import torch

from . import _classic_common as C
from defbench.defenses import nad
from defbench.defenses.losses import attention_map
from defbench.encoders import frozen_copy

RTOL, SPREAD = 1e-5, 10.0
REF = C.load_trace("nad")


def _run(betas, steps: int) -> list[dict]:
    """defbench's ``nad.step`` over the fixed batches, recorded like the driver records the reference."""
    cfg = nad.NADConfig(betas=betas)
    student = C.encoder("suspect").train()
    teacher = frozen_copy(C.encoder("teacher")) if any(betas) else None
    opt = nad.make_optimizer(student, cfg)
    trace, grads = [], C.record_grad_norms(opt, student)
    start = [p.detach().clone() for p in student.parameters()]
    for i in range(steps):
        with torch.no_grad():  # each step from the stored weights, momentum carried over (nad.json: protocol)
            for p, w in zip(student.parameters(), start):
                p.copy_(w)
        views = C.views(i, 8)
        entry = {}
        if i == 0 and teacher is not None:
            s, t = student.clone().stages(views), teacher.stages(views)
            entry["attention_maps"] = {st: {"student": attention_map(s[st])[:2].tolist(),
                                            "teacher": attention_map(t[st])[:2].tolist()} for st in cfg.at_stages}
        l_con, l_at, terms = nad.step(student, teacher, views, cfg, opt)
        at = dict(zip(cfg.at_stages, [t.item() for t in terms])) if terms else \
            {st: None for st in cfg.at_stages}
        entry.update(nt_xent=l_con.item(), at=at, loss=l_con.item() + l_at.item(), lr=cfg.lr_at(0),
                     grad_norms=dict(grads), weights_after=C.checksum(student.parameters()))
        trace.append(entry)
    return trace


def test_distillation_steps_match_the_reference():
    ours = _run(nad.NADConfig.betas, len(REF["trace"]))
    C.assert_trace(ours, REF["trace"], REF["envelope"], RTOL, SPREAD, "nad")


def test_teacher_finetuning_steps_match_the_reference():
    ref = REF["teacher_finetune_trace"]
    ours = _run((0.0, 0.0, 0.0), len(ref))
    # with beta = 0 defbench computes no attention term; the reference computes them and weights them by 0
    skip = ("at", "attention_maps")
    for entry in ours:
        entry.pop("at")
    expected = [{k: v for k, v in e.items() if k not in skip} for e in ref]
    envelope = [{k: v for k, v in e.items() if k not in skip} for e in REF["teacher_finetune_envelope"]]
    C.assert_trace(ours, expected, envelope, RTOL, SPREAD, "nad teacher")


def test_learning_rate_schedule_matches_the_reference():
    cfg = nad.NADConfig()
    assert [cfg.lr_at(epoch) for epoch in range(cfg.epochs)] == REF["lr_schedule"]
