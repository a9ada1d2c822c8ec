"""Shared by the SSL reference-trace tests (BadEncoder, DRUPE, DECREE, and MIMIC's statistics network).

The traces in this folder were recorded by running the authors' code (outside this repository) on
inputs that both sides can rebuild without sharing a random-number generator:

- **weights** come from :func:`det_uniform`, a table of SplitMix64 values read through an affine map
  keyed by the CRC-32 of a text tag, in exact integer arithmetic, so the same tag gives the same
  values with any numpy/torch on any machine; :func:`release_state` fills a ResNet-18
  in the BadEncoder/MIMIC release layout (``f.f.*``, ``g.*``) with them, and the test loads that
  file through defbench's own checkpoint loader (:func:`defbench.encoders.load_encoder`);
- **images and their fixed views** (uint8) are stored in ``ssl_inputs.npz`` beside this file.

A trace records, per step, the loss terms, the gradient norm of every parameter and two numbers per
parameter for the update so far, ``delta = w_t - w_0``: its L2 norm and a probe
``sum(delta * det_uniform(name))``, which moves with any change of the update's direction.
"""
from __future__ import annotations

import json
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def _splitmix(n: int, salt: int) -> np.ndarray:
    """SplitMix64 of the counter 0..n-1 plus ``salt``, as float64 in [0, 1) (exact uint64 arithmetic)."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (np.arange(n, dtype=np.uint64) + np.uint64(salt)) * golden + golden
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_PRIME = 1_000_003  # size of the value table; tensors index it through a tag-dependent affine map mod _PRIME
_TABLE: list[torch.Tensor] = []


def det_uniform(tag: str, n: int) -> torch.Tensor:
    """``n`` float64 values in [0, 1), a pure function of ``tag``: entry ``k`` is
    ``table[(a + b * (k mod P)) mod P]`` with ``a``, ``b`` from the CRC-32 of ``tag`` and ``table`` the
    SplitMix64 stream of length P = 1,000,003 (integer arithmetic only, so exact everywhere). The
    values repeat with period P, so a long tensor is its first P values tiled (cheap for the
    33-million-entry first layer of MIMIC's MINE network)."""
    if not _TABLE:
        _TABLE.append(torch.from_numpy(_splitmix(_PRIME, 12345)))
    a = zlib.crc32(tag.encode()) % _PRIME
    b = 1 + zlib.crc32(tag.encode() + b"/b") % (_PRIME - 1)
    base = _TABLE[0][(a + torch.arange(min(n, _PRIME), dtype=torch.int64) * b) % _PRIME]
    return base if n <= _PRIME else base.repeat(-(-n // _PRIME))[:n]


def det_tensor(tag: str, shape, low: float, high: float) -> torch.Tensor:
    """A float32 tensor of ``shape`` uniform in [low, high), from :func:`det_uniform` (period P, see there)."""
    n = int(np.prod(shape)) if len(shape) else 1
    base = (low + (high - low) * det_uniform(tag, min(n, _PRIME))).float()
    return (base if n <= _PRIME else base.repeat(-(-n // _PRIME))[:n]).reshape(tuple(shape))


def init_value(tag: str, key: str, shape) -> torch.Tensor:
    """The value of one state-dict entry: Kaiming-uniform-like weights, BatchNorm near identity."""
    name = f"{tag}/{key}"
    if key.endswith("num_batches_tracked"):
        return torch.zeros((), dtype=torch.long)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_mean":
        return det_tensor(name, shape, -0.1, 0.1)
    if leaf == "running_var":
        return det_tensor(name, shape, 0.5, 1.5)
    if len(shape) == 1 and leaf == "weight":  # BatchNorm scale
        return det_tensor(name, shape, 0.5, 1.0)
    if leaf == "bias":
        return det_tensor(name, shape, -0.05, 0.05)
    fan_in = int(np.prod(shape[1:]))
    bound = float(np.sqrt(6.0 / fan_in))
    return det_tensor(name, shape, -bound, bound)


def small_init_state(tag: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A state dict at the scale of torch's default initialisation (for the transformer decoders of the detection
    traces): matrices and their biases uniform in +-1/sqrt(fan_in), 1-D ``weight`` (LayerNorm) in [0.9, 1.1],
    other 1-D ``bias`` in +-0.05, anything else (tokens, position tables) in +-0.04 (about trunc_normal(0.02))."""
    state = {}
    weights = {k.rsplit(".", 1)[0]: shape for k, shape in shapes.items() if k.endswith(".weight") and len(shape) > 1}
    for key, shape in shapes.items():
        stem, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if leaf == "weight" and len(shape) > 1:
            bound = 1.0 / float(np.sqrt(np.prod(shape[1:])))
        elif leaf == "bias" and stem in weights:
            bound = 1.0 / float(np.sqrt(np.prod(weights[stem][1:])))
        elif leaf == "weight":
            state[key] = det_tensor(f"{tag}/{key}", shape, 0.9, 1.1)
            continue
        else:
            bound = 0.05 if leaf == "bias" else 0.04
        state[key] = det_tensor(f"{tag}/{key}", shape, -bound, bound)
    return state


def release_state(tag: str, shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """A state dict in the BadEncoder/MIMIC release layout, every entry from :func:`init_value`."""
    return {key: init_value(tag, key, shape) for key, shape in shapes.items()}


# ------------------------------------------------------------ defbench side (tests only)

# defbench encoder key prefix -> the release's (torchvision children inside nn.Sequential ``f.f``, head ``g``)
_TO_RELEASE = {"backbone.conv1.": "f.f.0.", "backbone.bn1.": "f.f.1.", "backbone.layer1.": "f.f.3.",
               "backbone.layer2.": "f.f.4.", "backbone.layer3.": "f.f.5.", "backbone.layer4.": "f.f.6.",
               "head.": "g."}


def release_name(key: str) -> str:
    for ours, theirs in _TO_RELEASE.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(key)


def release_shapes(width: int = 64) -> dict[str, tuple]:
    """Keys and shapes of a ResNet-18 encoder in the release layout (derived from defbench's encoder)."""
    from defbench.encoders import build_encoder
    return {release_name(k): tuple(v.shape) for k, v in build_encoder(width=width).state_dict().items()}


def load_release(state: dict[str, torch.Tensor]):
    """(encoder, release name of every encoder key) through defbench's checkpoint loader (a temp file)."""
    from defbench.encoders.checkpoints import load_encoder, plan_checkpoint, read_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "release.pth"
        torch.save({"state_dict": state}, path)
        encoder = load_encoder(path)
        mapping = plan_checkpoint(read_checkpoint(path)).mapping  # encoder key -> file key
    return encoder, mapping


def state_checksum(state: dict[str, torch.Tensor]) -> float:
    """A float that changes with any entry (used to check the generator reproduces the recorded weights)."""
    return float(sum(float((v.double() * det_tensor("probe/" + k, v.shape, -1, 1).double()).sum())
                     for k, v in state.items() if v.is_floating_point()))


# ------------------------------------------------------------ traces

def load_trace(method: str) -> dict:
    return json.loads((HERE / f"{method}.json").read_text())


def load_inputs() -> dict[str, np.ndarray]:
    with np.load(HERE / "ssl_inputs.npz") as data:
        return {k: data[k] for k in data.files}


def to_float_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [0, 1], as ToTensor does."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)


def param_record(named: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                 grads: dict[str, torch.Tensor | None] | None = None) -> dict[str, list]:
    """name -> [grad norm or None, |w - w0|, probe of w - w0] for the given parameters (names as given);
    the gradients are the parameters' ``.grad`` unless ``grads`` gives them."""
    out = {}
    for name, p in named.items():
        delta = (p.detach() - start[name]).double()
        probe = float((delta * det_tensor("probe/" + name, p.shape, -1, 1).double()).sum())
        grad = p.grad if grads is None else grads[name]
        out[name] = [None if grad is None else float(grad.detach().double().norm()), float(delta.norm()), probe]
    return out


def compare(what: str, got, want, rtol: float, atol: float) -> None:
    """Assert ``got`` matches ``want`` elementwise (nested lists/dicts of numbers, None for absent)."""
    if isinstance(want, dict):
        assert set(got) == set(want), f"{what}: keys {sorted(set(got) ^ set(want))[:5]} differ"
        for k in want:
            compare(f"{what}[{k}]", got[k], want[k], rtol, atol)
        return
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{what}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            compare(f"{what}[{i}]", g, w, rtol, atol)
        return
    if want is None or got is None:
        assert got is None and want is None, f"{what}: got {got}, the reference has {want}"
        return
    assert abs(float(got) - float(want)) <= atol + rtol * abs(float(want)), \
        f"{what}: got {float(got):.9g}, the reference has {float(want):.9g} (rtol {rtol}, atol {atol})"


def compare_params(what: str, got: dict[str, list], want: dict[str, list], rtol: float) -> None:
    """Per parameter ``[grad norm, |w - w0|, probe of w - w0]``: the norms within ``rtol`` relative, the
    probe within ``rtol`` of the update's norm (a probe is a sum of signed terms and may sit near 0)."""
    assert set(got) == set(want), f"{what}: parameters {sorted(set(got) ^ set(want))[:5]} differ"
    for name, (g_grad, g_norm, g_probe) in got.items():
        w_grad, w_norm, w_probe = want[name]
        compare(f"{what} grad norm of {name}", g_grad, w_grad, rtol, 1e-12)
        compare(f"{what} |w - w0| of {name}", g_norm, w_norm, rtol, 1e-12)
        compare(f"{what} probe of w - w0 of {name}", g_probe, w_probe, 0.0, rtol * w_norm + 1e-12)


def max_relative_gap(got: dict[str, list], want: dict[str, list]) -> float:
    """The largest relative difference over the parameter records (for choosing/justifying a tolerance)."""
    gap = 0.0
    for name in want:
        for i, (g, w) in enumerate(zip(got[name], want[name])):
            if w is None or g is None:
                continue
            scale = abs(want[name][1]) if i == 2 else abs(w)
            if scale > 0:
                gap = max(gap, abs(g - w) / scale)
    return gap


def poisoning_batch(inputs: dict, idx: list[int], n_ref: int, trigger):
    """(x, x_triggered, refs, refs_aug) of a BadEncoder/DRUPE trace step, as defbench's loss takes them.

    The reference gives each shadow image j of the batch one fixed view per reference i
    (``refs_aug[i][j]``); defbench's loss pairs ``refs_aug[k]`` with reference ``k mod n_ref``, so view j of
    reference i goes to position ``j * n_ref + i``."""
    x = to_float_nchw(inputs["images"][idx])
    refs = to_float_nchw(inputs["refs"][:n_ref])
    views = inputs["refs_aug"][:n_ref, :len(idx)].transpose(1, 0, 2, 3, 4).reshape(-1, *inputs["images"].shape[1:])
    return x, trigger.apply(x), refs, to_float_nchw(views)


def tnet_state(tag: str, a_dim: int, z_dim: int, hidden: int = 512) -> dict[str, torch.Tensor]:
    """MIMIC's MINE statistics network in its authors' layout (``estimator/TNet.py``: dense1 on the
    concatenation [a, z], dense2, dense3), every Linear uniform in +-1/sqrt(fan_in) like torch's default."""
    shapes = {"dense1": (hidden, a_dim + z_dim), "dense2": (hidden, hidden), "dense3": (1, hidden)}
    state = {}
    for name, (out, fan_in) in shapes.items():
        bound = 1.0 / float(np.sqrt(fan_in))
        state[f"{name}.weight"] = det_tensor(f"{tag}/{name}.weight", (out, fan_in), -bound, bound)
        state[f"{name}.bias"] = det_tensor(f"{tag}/{name}.bias", (out,), -bound, bound)
    return state


def tnet_to_defbench(state: dict[str, torch.Tensor], a_dim: int) -> dict[str, torch.Tensor]:
    """The same network as defbench's StatisticsNetwork state (first layer split into its a and z blocks)."""
    w1 = state["dense1.weight"]
    return {"w_a": w1[:, :a_dim].clone(), "w_z": w1[:, a_dim:].clone(), "b1": state["dense1.bias"],
            "tail.1.weight": state["dense2.weight"], "tail.1.bias": state["dense2.bias"],
            "tail.3.weight": state["dense3.weight"], "tail.3.bias": state["dense3.bias"]}
