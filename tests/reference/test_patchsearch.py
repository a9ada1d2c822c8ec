"""PatchSearch against its authors' code (UCDvision/PatchSearch ``patch_search_iterative_search.py`` and
``patch_search_poison_classifier.py``, their ``main()`` run as ``run_pipeline.sh`` runs them; ``patchsearch.json``,
how it was recorded and every line changed to run it on CPU at 32 px: there).

Inputs: the 48 images of ``patchsearch_inputs.npz`` (8 with an HTBA patch) and the width-4 ``suspect`` encoder of
``classic_inputs.npz``, normalised with the reference's ImageNet constants. Where the two sides draw different random
numbers, the test feeds defbench the reference's: its faiss k-means centroids (defbench seeds k-means with k-means++,
a kept deviation), its per-cluster search order, its stream for the pasting positions, its classifier's initial
weights (a shared generator) and its augmented training batches (``patchsearch_batches.npz``). The search is
compared with the trace's run B, in which the reference normalises the pasted test images' features as defbench
does (a deviation the parity page keeps); run A, the reference as written, is recorded beside it.

Tolerances. Integers must be equal: cluster assignments, test images, each round's picks, every poison score and
the Grad-CAM window (where two windows' heat sums tie in exact arithmetic, the trace lists both and either is
accepted: which one argmax takes falls to rounding). Floats are fp32 on both sides and agree to rounding; measured:
features and prototypes bit for bit, squared distances to the centroid 4e-7 apart (faiss expands the square), the
heat maps 6e-7 relative (numpy's mean against torch's, cv2's resize against ``F.interpolate``) and their probes
8e-6 absolute, the classifier's losses, gradient norms and updates bit for bit with one thread (1e-5 apart with
two, which sum the convolutions in another order), the classifier's pasted squares 0.98 grey levels (PIL resizes
the uint8 patch in two passes, rounding each to 8 bits; defbench resizes floats). The test allows 1e-6 on
features, 1e-5 on prototypes, distances and heat maps, 1e-4 on the heat maps' probes and on the classifier's
losses, gradient norms and updates, and 1.5 grey levels on pasted pixels; a change of the method (no ReLU in the
heat map, the poison score on unnormalised features, BatchNorm in eval mode while the classifier trains, the
pruning rounded instead of truncated, a bilinear or aliasing resize of the pasted patch) moves them by far more.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from defbench.defenses import patchsearch as ps
from defbench.encoders import RunContext, build_encoder
from defbench.encoders.runtime import to_float

from . import _classic_common as C
from ._ssl_common import compare, compare_params, det_tensor, init_value, param_record, state_checksum

HERE = Path(__file__).parent
FILES = {"images": "patchsearch_inputs.npz", "encoder": "classic_inputs.npz", "batches": "patchsearch_batches.npz"}
CPU = torch.device("cpu")
FEATURE_RTOL, HEAT_RTOL, PROBE_ATOL = 1e-6, 1e-5, 1e-4
# the classifier's updates: bit-identical to the reference with 1 intra-op thread; with 2 (the test suite's setting)
# the convolutions sum in another order: a weight probe 1.02e-5 of its update's norm apart, the 4th loss 2.2e-6
CLASSIFIER_RTOL = 1e-4
PASTE_ATOL = 1.5  # grey levels: PIL resizes in two passes, rounding each to 8 bits


@lru_cache(maxsize=1)
def trace() -> dict:
    """The recorded trace, after checking it was made from the input files that are here."""
    recorded = json.loads((HERE / "patchsearch.json").read_text())
    for key, name in FILES.items():
        digest = hashlib.sha256((HERE / name).read_bytes()).hexdigest()
        assert recorded["inputs"][f"{key}_sha256"] == digest, f"patchsearch.json was recorded on another {name}"
    return recorded


def settings() -> dict:
    return trace()["settings"]


def images() -> torch.Tensor:
    with np.load(HERE / FILES["images"]) as data:
        return torch.from_numpy(data["images"])


def suspect():
    """The classic traces' width-4 suspect, normalising with the reference's constants."""
    s = settings()
    encoder = build_encoder(width=C.WIDTH, proj_dim=C.PROJ_DIM, mean=tuple(s["mean"]), std=tuple(s["std"]))
    state = {k[len("suspect/"):]: torch.from_numpy(v) for k, v in C.inputs().items() if k.startswith("suspect/")}
    encoder.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return encoder.eval()


def config() -> ps.PatchSearchConfig:
    s = settings()
    cfg = ps.PatchSearchConfig(clusters=s["clusters"], test_images=s["test_images"],
                               samples_per_iteration=s["samples_per_iteration"], remove_fraction=s["remove_fraction"],
                               prune_clusters=s["prune_clusters"], topk_poisons=s["topk_poisons"],
                               top_fraction=s["top_fraction"], model_count=s["model_count"],
                               max_iterations=s["max_iterations"], batch_size=s["batch_size"], lr=s["lr"],
                               momentum=s["momentum"], weight_decay=s["weight_decay"], eval_freq=s["eval_freq"],
                               search_batch_size=s["search_batch_size"], retrain=False)
    assert ps.pixels(cfg.window_fraction, s["image_size"]) == s["window"], "the default window is the reference's"
    return cfg


def feed_centroids(monkeypatch) -> int:
    """defbench's k-means returns the reference's faiss centroids (k-means itself is fed, not compared)."""
    centroids = torch.tensor(trace()["trace"]["kmeans"]["centroids"], dtype=torch.float32)
    monkeypatch.setattr(ps, "kmeans", lambda x, k, iters, generator: (centroids.clone(), None))
    return len(centroids)


def reference_clusters(monkeypatch):
    """(features, defbench's clusters on the reference's centroids)."""
    k = feed_centroids(monkeypatch)
    features = ps.encode(suspect(), images(), CPU, settings()["search_batch_size"])
    return features, ps.cluster(features, k, 20, None)


def sums(t: torch.Tensor, tag: str) -> list[float]:
    """[sum, sum of squares, probe] of a tensor in float64, as the driver records them."""
    t = t.double()
    return [float(t.sum()), float(t.pow(2).sum()), float((t * det_tensor(tag, t.shape, -1, 1).double()).sum())]


def test_features_clusters_and_test_images_match_the_reference(monkeypatch):
    want = trace()["trace"]
    features, clusters = reference_clusters(monkeypatch)
    got = dict(zip(("sum", "sq", "probe"), sums(features, "probe/features")))
    compare("features (L2-normalised)", got, want["features"], FEATURE_RTOL, FEATURE_RTOL * len(features))
    assert clusters.labels.tolist() == want["kmeans"]["assignment"], "nearest-centroid assignment"
    compare("squared distance to the centroid", clusters.distance.pow(2).tolist(), want["kmeans"]["sq_distance"],
            1e-5, 1e-6)
    compare("prototypes (KMeansLinear: each cluster's mean feature)", clusters.prototypes.tolist(),
            want["prototypes"], 1e-5, 1e-6)
    test = ps.test_set(clusters, settings()["test_images"], torch.Generator())
    assert test.tolist() == want["test_images"], "test images: the closest to each centroid"


def test_grad_cam_heat_maps_and_windows_match_the_reference(monkeypatch):
    want = trace()["trace"]["search"]["gradcam_all"]
    _, clusters = reference_clusters(monkeypatch)
    order = torch.tensor(want["order"])
    cam = ps.grad_cam(suspect(), to_float(images()[order], CPU), clusters.prototypes)
    heat = [sums(c, "probe/heat") for c in cam]
    compare("Grad-CAM heat maps [sum, sum of squares]", [h[:2] for h in heat], [h[:2] for h in want["heat"]],
            HEAT_RTOL, 0.0)
    compare("Grad-CAM heat map probes", [h[2] for h in heat], [h[2] for h in want["heat"]], 0.0, PROBE_ATOL)
    corners = ps.max_window(cam, settings()["window"]).tolist()
    allowed = [hits + want["ties"].get(str(int(i)), []) for i, hits in zip(order, want["boxes"])]
    wrong = [(int(i), got, ok) for i, got, ok in zip(order, corners, allowed) if got not in ok]
    assert not wrong, f"windows (image, defbench's corner, the reference's) differ: {wrong[:5]}"


def test_iterative_search_scores_match_the_reference(monkeypatch):
    want = trace()["trace"]["search"]
    queues = trace()["trace"]["queues"]
    monkeypatch.setattr(ps, "random_queues", lambda clusters, generator: [list(q) for q in queues])
    feed_centroids(monkeypatch)
    x = images()
    index = {x[i].numpy().tobytes(): i for i in range(len(x))}
    assert len(index) == len(x), "the inputs hold repeated images"
    picked, original = [], ps.candidate_patches

    def recording(encoder, chunk, *args):
        picked.append([index[im.numpy().tobytes()] for im in chunk])
        return original(encoder, chunk, *args)

    monkeypatch.setattr(ps, "candidate_patches", recording)
    ctx = RunContext(device=CPU, seed=0, show_progress=False)
    ctx.generator = torch.Generator().manual_seed(settings()["paste_seed"])  # the reference's paste stream
    scores, info = ps.search(suspect(), x, config(), ctx)
    assert picked == [r["picks"] for r in want["rounds"]], "images scored in each round"
    assert scores.tolist() == want["poison_scores"], "poison scores"
    assert info["rounds"] == len(want["rounds"])
    assert info["scored"] == sum(len(r["picks"]) for r in want["rounds"])


def test_poison_classifier_updates_match_the_reference(monkeypatch):
    want = trace()["trace"]["classifier"]
    cfg = config()
    with np.load(HERE / FILES["batches"]) as data:
        batches = [(torch.from_numpy(x).float().div(255.0), torch.from_numpy(y).bool())
                   for x, y in zip(data["x"], data["label"])]
    model = ps.classifier()
    init = {k: init_value("patchsearch-classifier", k, tuple(v.shape)) for k, v in model.state_dict().items()}
    model.load_state_dict(init)
    compare("classifier weights from the shared generator", state_checksum(init),
            trace()["inputs"]["classifier_init_checksum"], 1e-9, 0)
    monkeypatch.setattr(ps, "classifier", lambda: model)
    feed = iter(batches)
    monkeypatch.setattr(ps, "classifier_batch", lambda *args: next(feed))
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    records, losses = [], []

    def monitor(loss):
        losses.append(loss)
        records.append(param_record(named, start))

    val_idx = torch.tensor(want["pos"] + want["neg"])
    val_truth = torch.tensor([True] * len(want["pos"]) + [False] * len(want["neg"]))
    ctx = RunContext(device=CPU, seed=0, show_progress=False)
    _, info = ps.train_classifier(images(), torch.tensor(want["train"]), val_idx, val_truth, torch.empty(0),
                                  suspect(), cfg, ctx, monitor=monitor)
    # the reference lets one update more through (`it > max_iterations`), at the schedule's lr of 0
    steps = want["steps"][:cfg.max_iterations]
    assert len(records) == len(steps) == cfg.max_iterations
    for k, (rec, loss, step) in enumerate(zip(records, losses, steps)):
        compare(f"update {k + 1}: loss", loss, want["losses"][k], CLASSIFIER_RTOL, 0.0)
        compare_params(f"update {k + 1}", rec, step["params"], CLASSIFIER_RTOL)
    compare("validation F1 after the first update", info["val_f1"], want["val"][0][2], 1e-9, 1e-9)


def unhex(text: str, side: int) -> torch.Tensor:
    """A uint8 3 x side x side square stored as the hex string of its bytes."""
    return torch.from_numpy(np.frombuffer(bytes.fromhex(text), dtype=np.uint8).copy()).reshape(3, side, side)


def test_training_paste_matches_the_reference(monkeypatch):
    want = trace()["trace"]["training_paste"]
    patches = torch.stack([unhex(p, settings()["window"]) for p in want["patches"]]).float().div(255.0)
    x = images()
    worst = 0.0
    for paste in want["pastes"]:
        index, side, col, row = paste["draws"]
        draws = iter([torch.tensor([index]), torch.tensor([side]), torch.tensor([row, col])])
        with monkeypatch.context() as m:  # defbench's three draws: the patch, its side, its (row, column)
            m.setattr(torch, "randint", lambda *args, **kwargs: next(draws))
            out = ps.paste_poisons(x[paste["image"]][None].float().div(255.0), patches, config(), None)[0]
        square = unhex(paste["square"], side).float()
        outside = torch.ones(x.shape[-2:], dtype=torch.bool)
        outside[row:row + side, col:col + side] = False
        assert torch.equal(out[:, outside], x[paste["image"]][:, outside].float().div(255.0)), "pixels off the square"
        worst = max(worst, float((out[:, row:row + side, col:col + side] * 255 - square).abs().max()))
    assert worst <= PASTE_ATOL, f"pasted squares differ by up to {worst:.3f} grey levels (allowed {PASTE_ATOL})"
