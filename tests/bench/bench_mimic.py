"""MIMIC cost benchmark (run as a script: ``python tests/bench/bench_mimic.py``; pytest does not collect it).

Prints, measured in one run:

1. the cost of one MIMIC distillation step divided by the unavoidable work of
   that step -- one plain student forward+backward on both augmented views
   plus one teacher forward without gradients -- on the same batch
   (target <= 1.3). Two numerators: the loss+backward alone (same
   pre-computed views as the baseline), and the full training step
   (augmentation, loss, backward, Adam step);
2. the MINE estimation time per layer relative to one distillation epoch, with
   the profile's MI settings and, per MINE epoch, with the reference settings
   (flattened input, hidden 512).

Timings are medians of interleaved repeats; on a shared CPU they are noisy.
Weights are random: the cost does not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from defbench.benchmark.pipeline.settings import load_profile
from defbench.defenses import get_defense
from defbench.defenses.mimic import distill, mimic_loss, stage_table, uniform_weights
from defbench.defenses.mutual_information import estimate_mi
from defbench.encoders import RunContext, build_encoder, frozen_copy, to_float
from defbench.encoders.augment import SimCLRAugment


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--images", type=int, default=1000, help="clean-set size for the epoch / MINE timings")
    parser.add_argument("--skip-mi", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    profile = load_profile(args.profile)
    cfg = get_defense("mimic").make_config(args.profile)
    device = torch.device("cpu")
    ctx = RunContext(device=device, show_progress=False).reseed(0)
    teacher = frozen_copy(build_encoder(profile.encoder))
    student = build_encoder(profile.encoder).train()
    beta = uniform_weights(teacher.stage_names, cfg.alpha0, cfg.alpha1)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = SimCLRAugment()
    images = torch.randint(0, 256, (args.images, 3, profile.encoder.image_size, profile.encoder.image_size),
                           dtype=torch.uint8)
    x = to_float(images[:cfg.batch_size], device)
    v1, v2 = augment(x), augment(x)
    print(f"profile {args.profile}: width {profile.encoder.width}, batch {cfg.batch_size}, "
          f"threads {torch.get_num_threads()}, {args.repeats} interleaved repeats")

    def baseline():
        student.zero_grad(set_to_none=True)
        student.project(torch.cat([v1, v2])).sum().backward()
        with torch.no_grad():
            teacher.features(v1)

    def loss_backward():
        student.zero_grad(set_to_none=True)
        loss, _ = mimic_loss(student, teacher, v1, v2, beta, cfg, x)
        loss.backward()

    def full_step():
        loss, _ = mimic_loss(student, teacher, augment(x), augment(x), beta, cfg, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def augment_only():
        augment(x), augment(x)

    fns = {"baseline": baseline, "loss+backward": loss_backward, "full step": full_step,
           "augmentation": augment_only}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n== step cost (median seconds) ==")
    for k, v in med.items():
        print(f"  {k:14s} {v:.4f}  (min {min(times[k]):.4f})")
    print(f"  ratio loss+backward / baseline: {med['loss+backward'] / med['baseline']:.3f}   (target <= 1.3)")
    print(f"  ratio full step     / baseline: {med['full step'] / med['baseline']:.3f}   "
          "(includes augmentation and the Adam step)")

    if args.skip_mi:
        return
    one_epoch = cfg.__class__(**{**cfg.__dict__, "epochs": 1})
    epoch_s = _timed(lambda: distill(build_encoder(profile.encoder), teacher, images, beta, one_epoch, ctx))
    steps = len(images) // min(cfg.batch_size, len(images))
    print(f"\n== MI estimation vs one distillation epoch ({len(images)} images, {steps} steps) ==")
    print(f"  one distillation epoch: {epoch_s:.2f} s; the profile runs {cfg.epochs} epochs")
    from dataclasses import replace
    profile_mine = cfg.mine()
    reference = replace(profile_mine, hidden=512, epochs=2)  # timed over 2 epochs, reported per epoch
    rows = ((f"profile setting (mi_pool={cfg.mi_pool}, mi_hidden={cfg.mi_hidden}, {cfg.mi_epochs} epochs)",
             cfg.mi_pool, profile_mine, 1),
            ("reference (flattened, hidden 512), per MINE epoch", 0, reference, reference.epochs))
    for label, pool, mine, per in rows:
        table, z = stage_table(teacher, images, device, pool)
        print(f"  {label}:")
        total = 0.0
        for name, a in table.items():
            gen = torch.Generator().manual_seed(0)
            s = _timed(lambda: estimate_mi(a, z, mine, generator=gen)) / per
            total += s
            print(f"    {name}: input {a.shape[1]:6d}-d  {s:7.2f} s  = {s / epoch_s:6.2f} distillation epochs")
        print(f"    all layers: {total:.2f} s = {total / epoch_s:.2f} distillation epochs")
        if per > 1:
            print(f"    x 200 MINE epochs (the paper's setting): {total * 200:.0f} s "
                  f"= {total * 200 / epoch_s:.0f} distillation epochs")

if __name__ == "__main__":
    main()
