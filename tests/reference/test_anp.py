"""ANP's mask optimisation and pruning against csdongxian/ANP_backdoor's own code (trace in anp.json).

The reference ran ``mask_train`` with its ``NoisyBatchNorm2d`` and the encoder adaptation's loss
(1 - cos to the unmasked network's features, train mode, same batch) injected as its criterion, so the
perturbation step, the mask update and the pruning rule are compared: per iteration the loss at the
random start, both loss terms, the perturbations after the signed ascent, each layer's mask-gradient
norm and every mask; then the channels the reference's threshold pruning zeroes on given masks.

The random start U(-eps, eps) is drawn by the reference and recorded; the test hands the same values
to ``NeuronPerturbation`` (its ``reset`` replaced for the test), everything else is defbench's code.
Tolerance: ``1e-5`` relative (fp32; ``functional_call`` with scaled BatchNorm parameters against the
reference's modified BatchNorm: same operations, other order, ~1e-7 apart) plus 10 x the recorded
envelope (the reference rerun with its weights nudged by 1e-7: the loss at m = 1 is ~1e-8 of pure
rounding, which only the envelope can allow for).
"""
from __future__ import annotations

import torch

from . import _classic_common as C
from defbench.defenses import anp

RTOL, SPREAD = 1e-5, 10.0
REF = C.load_trace("anp")
CFG = anp.ANPConfig()


def _given_start(pert: anp.NeuronPerturbation, start: dict):
    """A ``reset`` that installs the reference's recorded random start instead of drawing one."""
    def reset(generator=None):
        pert.delta = [torch.tensor(start["delta"][name]).requires_grad_(True) for name, _ in pert.layers]
        pert.xi = [torch.tensor(start["xi"][name]).requires_grad_(True) for name, _ in pert.layers]
    return reset


def _per_layer(pert: anp.NeuronPerturbation, tensors) -> dict:
    return {name: t.detach().tolist() for (name, _), t in zip(pert.layers, tensors)}


def test_mask_optimisation_matches_the_reference():
    model = anp.mask_model(C.encoder("suspect"))
    pert = anp.NeuronPerturbation(model, CFG.eps)
    assert [name for name, _ in pert.layers] == REF["layers"]  # same neurons, same order
    base_loss = anp._loss_fn(CFG, model)
    losses = []

    def loss_fn(*args, **kwargs):
        value = base_loss(*args, **kwargs)
        losses.append(value.item())
        return value

    opt = anp.mask_optimizer(pert, CFG)
    grads = {}
    original_step = opt.step

    def recording_step(*args, **kwargs):
        grads.update({name: float(m.grad.norm()) for (name, _), m in zip(pert.layers, pert.masks)})
        return original_step(*args, **kwargs)

    opt.step = recording_step
    ours = []
    for (lo, hi), ref in zip(REF["batch_slices"], REF["trace"]):
        x = C.floats("images")[lo:hi]
        with torch.no_grad():
            target = model.features(x)
        pert.reset = _given_start(pert, ref["start"])
        losses.clear()
        loss, loss_nat, loss_rob = anp.mask_step(pert, opt, loss_fn, x, target, CFG, None)
        ours.append({"loss_at_random_start": losses[0], "loss_rob": loss_rob.item(), "loss_nat": loss_nat.item(),
                     "loss": loss.item(), "start": ref["start"],
                     "after_ascent": {"delta": _per_layer(pert, pert.delta), "xi": _per_layer(pert, pert.xi)},
                     "mask_grad_norms": dict(grads), "masks": _per_layer(pert, pert.masks)})
    C.assert_trace(ours, REF["trace"], REF["envelope"], RTOL, SPREAD, "anp")


def test_pruning_rule_matches_the_reference():
    ref = REF["pruning"]
    encoder = C.encoder("suspect")
    pruned = anp.prune_neurons(encoder, torch.tensor(ref["masks"]), ref["threshold"], prune_beta=False)
    zeroed = {name: (bn.weight == 0).nonzero().flatten().tolist() for name, bn in anp.neuron_layers(encoder)}
    assert {k: v for k, v in zeroed.items() if v} == ref["zeroed_gamma"]
    assert pruned == {k: len(v) for k, v in ref["zeroed_gamma"].items()}
    bns = [bn for _, bn in anp.neuron_layers(encoder)]
    # the untouched values are the stored fp32 weights on both sides; the JSON keeps 9 significant digits
    C.assert_close(C.checksum(bn.weight for bn in bns), ref["bn_weight_checksum"], 1e-8, 0, "gamma checksum")
    C.assert_close(C.checksum(bn.bias for bn in bns), ref["bn_bias_checksum"], 1e-8, 0, "beta checksum")
