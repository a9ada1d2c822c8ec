"""Shared by the reference-trace tests of the classifier-born defenses (NAD, ANP, MOTH, MEDIC).

Each ``<method>.json`` here was recorded by running the authors' code (outside this repository, on
CPU, fp32) on the fixed inputs in ``classic_inputs.npz``:

- ``images``, ``view1``, ``view2``: 24 uint8 32 x 32 images and two fixed SimCLR views of each
  (quantised to uint8, so both sides read the same pixels; no augmentation runs in a test);
- ``suspect/*``, ``teacher/*``, ``fresh/*``: three width-4 ResNet-18 encoders (projection head
  32 -> 32 -> 32) under defbench's state-dict names, stored as float16 and upcast to fp32 on both
  sides (the same fp32 values reach the reference and defbench).

The JSON holds the repository, its commit, the command, every change made to run it, the parts of
the method it covers (``parts``) and the trace itself. A test rebuilds the same situation with
defbench's own code and compares with :func:`assert_close`.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from defbench.encoders import Encoder, build_encoder

HERE = Path(__file__).parent
INPUTS = HERE / "classic_inputs.npz"
WIDTH, PROJ_DIM = 4, 32


@lru_cache(maxsize=2)
def inputs(path: Path = INPUTS) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_trace(method: str, inputs_file: Path = INPUTS) -> dict:
    """The recorded trace, after checking it was made from the inputs file that is here."""
    trace = json.loads((HERE / f"{method}.json").read_text())
    digest = hashlib.sha256(inputs_file.read_bytes()).hexdigest()
    assert trace["inputs"]["sha256"] == digest, f"{method}.json was recorded on other inputs than {inputs_file.name}"
    return trace


def encoder(which: str) -> Encoder:
    """Encoder ``which`` (suspect | teacher | fresh) with the stored weights, fp32, in eval mode."""
    enc = build_encoder(width=WIDTH, proj_dim=PROJ_DIM)
    prefix = which + "/"
    state = {k[len(prefix):]: torch.from_numpy(v) for k, v in inputs().items() if k.startswith(prefix)}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    enc.load_state_dict(state)
    return enc.eval()


def uint8(name: str) -> torch.Tensor:
    return torch.from_numpy(inputs()[name])


def floats(name: str) -> torch.Tensor:
    """A stored uint8 image array as floats in [0, 1] (what ``to_float`` gives)."""
    return uint8(name).float().div(255.0)


def views(step: int, batch: int) -> torch.Tensor:
    """Both fixed views of images ``step*batch .. (step+1)*batch``, stacked (2B x 3 x 32 x 32)."""
    sl = slice(step * batch, (step + 1) * batch)
    return torch.cat([floats("view1")[sl], floats("view2")[sl]])


def checksum(tensors) -> dict[str, float]:
    """(sum, sum of squares) over tensors, accumulated in float64 (as the drivers record it)."""
    tensors = list(tensors)
    return {"sum": sum(float(t.detach().double().sum()) for t in tensors),
            "sq": sum(float(t.detach().double().pow(2).sum()) for t in tensors)}


def record_grad_norms(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    """Wraps ``opt.step`` so that the returned dict holds, at each update, every gradient norm of ``model``'s
    parameters by name (read just before the update, as the drivers' recording optimisers do)."""
    names = {p: n for n, p in model.named_parameters()}
    grads: dict[str, float] = {}
    original_step = opt.step

    def recording_step(*args, **kwargs):
        grads.update({names[p]: float(p.grad.norm()) for p in model.parameters() if p.grad is not None})
        return original_step(*args, **kwargs)

    opt.step = recording_step
    return grads


def _nested(value) -> bool:
    """A list holding dicts somewhere (compared entry by entry), not a plain array of numbers."""
    return isinstance(value, list) and any(isinstance(v, dict) or _nested(v) for v in value)


def assert_close(actual, expected, rtol: float, atol: float, what: str) -> None:
    """Recursive comparison of numbers / lists / dicts; the message names the first mismatch."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), \
            f"{what}: keys differ ({sorted(set(actual) ^ set(expected))[:5]})"
        for key in expected:
            assert_close(actual[key], expected[key], rtol, atol, f"{what}.{key}")
        return
    if _nested(expected):
        assert len(actual) == len(expected), f"{what}: {len(actual)} entries, reference {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol, atol, f"{what}[{i}]")
        return
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    bad = ~np.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        i = np.unravel_index(np.argmax(bad), a.shape) if a.ndim else ()
        raise AssertionError(f"{what}{list(i) if i else ''}: defbench {a[i]!r} vs reference {e[i]!r} "
                             f"(rtol {rtol}, atol {atol}; {int(bad.sum())} of {bad.size} values differ)")


def assert_trace(actual, expected, envelope, rtol: float, spread: float, what: str) -> None:
    """Like :func:`assert_close`, with a per-value allowance: ``|a - e| <= rtol |e| + spread * envelope``.

    ``envelope`` (recorded beside the trace) is how far each value moved when the reference was rerun
    with every weight nudged by 1e-7 relative (two nudges, the larger move): the value's own
    sensitivity to fp32 rounding. Values at the first step barely move; later steps of a training
    loop amplify rounding (train-mode BatchNorm gradients cancel heavily), so their allowance grows
    exactly as much as the reference's own rerun shows.
    """
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), \
            f"{what}: keys differ ({sorted(set(actual) ^ set(expected))[:5]})"
        for key in expected:
            assert_trace(actual[key], expected[key], envelope[key], rtol, spread, f"{what}.{key}")
        return
    if _nested(expected):
        assert len(actual) == len(expected), f"{what}: {len(actual)} entries, reference {len(expected)}"
        for i, (a, e, env) in enumerate(zip(actual, expected, envelope)):
            assert_trace(a, e, env, rtol, spread, f"{what}[{i}]")
        return
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    env = np.asarray(envelope, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    allowed = rtol * np.abs(e) + spread * env
    bad = np.abs(a - e) > allowed
    if bad.any():
        i = np.unravel_index(np.argmax(bad), a.shape) if a.ndim else ()
        raise AssertionError(f"{what}{list(i) if i else ''}: defbench {a[i]!r} vs reference {e[i]!r}, allowed "
                             f"+-{allowed[i]:.3g} (rtol {rtol} + {spread} x envelope {env[i]:.3g}); "
                             f"{int(bad.sum())} of {bad.size} values out")


def worst_ratio(actual, expected, envelope, rtol: float) -> float:
    """max |a - e| / (rtol |e| + envelope): what ``spread`` a comparison needs (for calibrating tolerances)."""
    if isinstance(expected, dict):
        return max(worst_ratio(actual[k], expected[k], envelope[k], rtol) for k in expected)
    if _nested(expected):
        return max(worst_ratio(a, e, env, rtol) for a, e, env in zip(actual, expected, envelope))
    a, e = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    env = np.asarray(envelope, dtype=np.float64)
    return float(np.max(np.abs(a - e) / (rtol * np.abs(e) + env + 1e-300)))


def det_uniform(shape, salt: int) -> np.ndarray:
    """Values in [0, 1) from SplitMix64 of (index, salt) in exact uint64 arithmetic.

    The drivers used the same function for values the reference would otherwise draw from its own
    generator (MOTH's initial triggers and restart noise), so both sides get the same numbers on any machine.
    """
    n = int(np.prod(shape))
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) * golden + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03) + golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) / float(1 << 53)).reshape(shape)
