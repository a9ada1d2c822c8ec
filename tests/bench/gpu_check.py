"""``make gpu-check``: is the GPU path working, how fast is it, and what does the paper's grid cost on it?

Prints, on one CUDA GPU (meant to finish in under 8 minutes on an H100):

1. the result of the CUDA test subset (``pytest -m cuda``);
2. the step benchmark at width 64, batch 512: each training/inference step as a ratio to the plain
   forward+backward (or forward) of the same precision on the same GPU, fp32 and bf16 side by side, the bf16
   speed-up of each step, MIMIC's distillation step against its unavoidable work (student fwd+bwd on both views
   + teacher forward), and the input pipeline's share of a SimCLR step (index the resident uint8 batch,
   convert, augment two views); a third column with TF32 off ("fp32 strict": PyTorch's fp32 convolutions
   use TF32 tensor cores by default, which narrows bf16's gain);
3. the wall time of one ``tiny`` cell (``defbench run``, fresh store, synthetic data generated included);
4. for each stage kind of the ``paper`` profile (pre-training, each attack, each defense, evaluation): the real
   stage code run twice at small fractions s1 < s2 of its budget (all of its cost-bearing fields scaled by the
   same s; the data at the paper's image size), the time extrapolated linearly to s = 1, times the number of
   such stages in the full Table I grid (planned with the paper profile), as GPU-hours -- next to the MIMIC
   paper's reported costs (MIMIC 3,879 s, NAD 6,248 s per cell).

``--quick`` exercises every code path in minutes on a CPU (width 8, the ``ci`` profile, a few steps); its
numbers mean nothing. Without CUDA (and without ``--device cpu``) it refuses in one line.
Weights and images are random: the cost of a step does not depend on them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root (this file is tests/bench/gpu_check.py)
# the MIMIC paper's reported cost per cell (seconds), to compare with the estimated defend stages
PAPER_COST = {"mimic": 3879.0, "nad": 6248.0}
# image counts of the real datasets (pre-training split; downstream train/test), for the grid estimate
SIZES = {"cifar10": {"pretrain": 50000, "train": 50000, "test": 10000},
         "stl10": {"pretrain": 105000, "train": 5000, "test": 8000},
         "svhn": {"train": 73257, "test": 26032},
         "gtsrb": {"train": 39209, "test": 12630}}
SKIPPED = "skipped: over the time budget (--budget)"
FALLBACK_SIZE = 2000  # the synthetic sets of --quick (numbers meaningless there)


class Clock:
    def __init__(self, budget: float):
        self.started, self.budget = time.perf_counter(), budget

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed


class OverBudget(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OverBudget in this (main) thread once ``seconds`` have passed (no limit where SIGALRM is missing)."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        if seconds <= 0:
            raise OverBudget()
        yield
        return

    def alarm(signum, frame):
        raise OverBudget()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def size_of(dataset: str, split: str) -> int:
    return SIZES.get(dataset, {}).get(split, FALLBACK_SIZE)


# ----------------------------------------------------------------- 1. the CUDA test subset

def cuda_tests(timeout: int) -> str:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return "\n".join([*(f"    {ln}" for ln in failed), f"    {lines[-1] if lines else proc.stderr[-300:]}"])


# ----------------------------------------------------------------- 2. the step benchmark

def step_benchmark(device: torch.device, width: int, batch: int, repeats: int, profile_name: str) -> None:
    from defbench.attacks import PatchTrigger
    from defbench.attacks.badencoder import badencoder_loss
    from defbench.defenses import get_defense
    from defbench.defenses.mimic import mimic_loss, uniform_weights
    from defbench.encoders import build_encoder, contrastive_loss, frozen_copy, to_float
    from defbench.encoders.augment import SimCLRAugment
    from defbench.benchmark.pipeline.device import configure_backends, resident
    from defbench.benchmark.pipeline.settings import load_profile

    configure_backends(device)
    prof = load_profile(profile_name, {"encoder.width": width})
    mimic_cfg = get_defense("mimic").make_config(profile_name)
    size = prof.encoder.image_size
    images = resident(torch.randint(0, 256, (4 * batch, 3, size, size), dtype=torch.uint8), device)
    medians: dict[str, dict[str, float]] = {}
    # PyTorch runs fp32 convolutions as TF32 on tensor cores by default (cudnn.allow_tf32), so "fp32" is partly
    # tensor-core arithmetic already; "fp32 strict" turns TF32 off to show how much of bf16's gain that takes
    tf32_default = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    for mode, precision, tf32 in (("fp32", "fp32", tf32_default), ("bf16", "bf16", tf32_default),
                                  ("fp32 strict", "fp32", (False, False))):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.manual_seed(0)
        cfg = dataclasses.replace(prof.encoder, precision=precision)
        encoder = build_encoder(cfg).to(device).train()
        teacher = frozen_copy(build_encoder(cfg).to(device))
        clean = frozen_copy(encoder)
        x = to_float(images[:batch], device)
        augment, no_crop = SimCLRAugment(), SimCLRAugment(crop=False)
        v1, v2 = augment(x), augment(x)
        adam = torch.optim.Adam(encoder.parameters(), 1e-3)
        trigger, refs = PatchTrigger(image_size=size), x[:10]
        beta = uniform_weights(teacher.stage_names, mimic_cfg.alpha0, mimic_cfg.alpha1)
        index = torch.randperm(len(images))[:batch]

        def plain_fwd_bwd():
            encoder.zero_grad(set_to_none=True)
            encoder.features(x).sum().backward()

        def plain_fwd():
            with torch.no_grad():
                encoder.features(x)

        def simclr_step():
            loss = contrastive_loss(encoder, to_float(images[index], device), augment, 0.5)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()

        def badencoder_step():
            loss, *_ = badencoder_loss(encoder, clean, x, trigger.apply(x), refs, no_crop(refs.repeat(12, 1, 1, 1)),
                                       1, 1)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()

        def mimic_unavoidable():
            encoder.zero_grad(set_to_none=True)
            encoder.project(torch.cat([v1, v2])).sum().backward()
            with torch.no_grad():
                teacher.features(v1)

        def mimic_step():
            encoder.zero_grad(set_to_none=True)
            loss, _ = mimic_loss(encoder, teacher, v1, v2, beta, mimic_cfg, x)
            loss.backward()

        def input_pipeline():
            batch_x = to_float(images[index], device)
            augment(batch_x), augment(batch_x)

        def features():
            with torch.no_grad():
                torch.nn.functional.normalize(encoder.features(x), dim=1).float().cpu()

        fns = {"plain fwd+bwd": plain_fwd_bwd, "plain fwd": plain_fwd, "simclr step": simclr_step,
               "badencoder step": badencoder_step, "mimic fwd+bwd+teacher": mimic_unavoidable,
               "mimic loss+bwd": mimic_step, "input pipeline": input_pipeline, "feature extraction": features}
        for fn in fns.values():  # warm-up (and the cuDNN autotuner)
            fn(), fn()
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):  # interleaved
            for k, fn in fns.items():
                times[k].append(timed(fn, device))
        medians[mode] = {k: statistics.median(v) for k, v in times.items()}
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32_default
    base = {"plain fwd": "plain fwd", "feature extraction": "plain fwd", "input pipeline": "simclr step"}
    print(f"  width {width}, batch {batch}, channels_last {prof.encoder.channels_last}, {repeats} interleaved "
          f"repeats; ratio = median / the same precision's plain fwd+bwd (inference: plain fwd); TF32 by default "
          f"(cudnn {tf32_default[0]}, matmul {tf32_default[1]}), off in 'fp32 strict'")
    print(f"  {'step':<24}{'fp32 ms':>10}{'ratio':>8}{'bf16 ms':>10}{'ratio':>8}{'bf16 speed-up':>15}"
          f"{'strict ms':>11}{'vs strict':>11}")
    for k in medians["fp32"]:
        ref = base.get(k, "plain fwd+bwd")
        f, b, strict = medians["fp32"][k], medians["bf16"][k], medians["fp32 strict"][k]
        fr, br = f / medians["fp32"][ref], b / medians["bf16"][ref]
        label = k + (" *" if k == "input pipeline" else "")
        print(f"  {label:<24}{f * 1e3:10.2f}{fr:8.2f}{b * 1e3:10.2f}{br:8.2f}{f / b:14.2f}x"
              f"{strict * 1e3:11.2f}{strict / b:10.2f}x")
    print("  * input pipeline: its ratio is its share of the same precision's simclr step")
    for precision in ("fp32", "bf16"):
        m = medians[precision]
        print(f"  {precision}: MIMIC step / (student fwd+bwd on both views + teacher fwd) = "
              f"{m['mimic loss+bwd'] / m['mimic fwd+bwd+teacher']:.2f}  (target <= 1.3)")
    print(f"  bf16 training step speed-up (simclr step): "
          f"{medians['fp32']['simclr step'] / medians['bf16']['simclr step']:.2f}x  (target >= 1.8)")


# ----------------------------------------------------------------- 3. one tiny cell

def tiny_cell(device: str, quick: bool, timeout: int) -> None:
    args = ["run", "--attack", "badencoder", "--defense", "ft", "--downstream", "synth-stl10", "--device", device]
    if quick:
        args += ["--profile", "ci", *[x for s in QUICK_SETS for x in ("--set", s)]]
    else:
        args += ["--profile", "tiny"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as home:
        env = {**os.environ, "DEFBENCH_HOME": home, "DEFBENCH_PROGRESS": "0"}
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "defbench.benchmark.cli", *args], env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  timed out after {timeout} s")
            return
        wall = time.perf_counter() - started
    print(f"  defbench {' '.join(args)}")
    print(f"  wall time {wall:.1f} s (fresh store: synthetic data generated, every stage computed), "
          f"exit {proc.returncode}")
    for line in (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines()[-6:]:
        print(f"    {line}")


QUICK_SETS = ["encoder.width=8", "pretrain.epochs=1", "pretrain.max_images=256", "pretrain.batch_size=64",
              "attack.badencoder.epochs=1", "attack.badencoder.shadow_images=128", "attack.badencoder.batch_size=64",
              "defense.ft.epochs=1", "defense.ft.batch_size=64", "clean.max_images=128", "evaluate.epochs=2",
              "evaluate.max_train=300", "evaluate.max_test=200"]


# ----------------------------------------------------------------- 4. the paper grid's cost per stage kind

def linear_cost(x1: float, t1: float, x2: float, t2: float) -> tuple[float, float, bool]:
    """(intercept, slope, proportional?) of a cost t = a + k x from two timed points x1 < x2.

    Both points are timed after a warm-up run; where the slope still comes out not positive (timing noise), or
    the intercept negative, the cost is taken proportional to x from the larger point (a = 0, k = t2 / x2) and
    the flag says so -- an estimate never goes negative.
    """
    slope = (t2 - t1) / (x2 - x1)
    intercept = t1 - slope * x1
    if slope <= 0 or intercept < 0:
        return 0.0, t2 / x2, True
    return intercept, slope, False


def extrapolate(s1: float, t1: float, s2: float, t2: float) -> tuple[float, bool]:
    """(the time at s = 1, proportional?) of a cost linear in s, from two measured points."""
    a, k, proportional = linear_cost(s1, t1, s2, t2)
    return a + k, proportional


def _scaled(cfg, fields: tuple[str, ...], s: float):
    values = {f: max(1, round(getattr(cfg, f) * s)) for f in fields if hasattr(cfg, f)}
    for name, value in list(values.items()):  # an averaging window "<x>_last" stays within "<x>_epochs"
        window = name.removesuffix("epochs") + "last"
        if name.endswith("_epochs") and hasattr(cfg, window):
            values[window] = min(getattr(cfg, window), value)
    return dataclasses.replace(cfg, **values)


def grid_estimate(device: torch.device, profile_name: str, sets: dict, clock: Clock, quick: bool) -> None:
    from defbench.attacks import ATTACKS, AttackInputs, trigger_from_description
    from defbench.defenses import DEFENSES, CleanData
    from defbench.encoders import RunContext, SimCLRConfig, build_encoder, train_simclr
    from defbench.benchmark.analysis.studies import budget_fields
    from defbench.benchmark.pipeline import evaluate as evaluation
    from defbench.benchmark.pipeline.device import configure_backends, resident
    from defbench.benchmark.pipeline.plan import expand_grid, grid_spec
    from defbench.benchmark.pipeline.scheduler import expand
    from defbench.benchmark.pipeline.settings import load_profile

    configure_backends(device)
    prof = load_profile(profile_name, sets)
    stages = expand(list(expand_grid(prof, grid_spec(prof)).values()))
    counts = Counter((s.kind, s.name if s.kind in ("attack", "defend") else s.kind) for s in stages)
    size = prof.encoder.image_size
    print(f"  profile {prof.name}: width {prof.encoder.width}, precision {prof.encoder.precision}, "
          f"channels_last {prof.encoder.channels_last}; the grid: {len(stages)} distinct stages "
          + ", ".join(f"{n} {k}" for k, n in sorted(Counter(s.kind for s in stages).items())))
    ctx = RunContext(device=device, show_progress=False).reseed(0)
    pool = resident(torch.randint(0, 256, (16 * prof.pretrain.batch_size if not quick else 512, 3, size, size),
                                  dtype=torch.uint8), device)

    def images(n: int) -> torch.Tensor:
        reps = -(-n // len(pool))
        return (pool.repeat(reps, 1, 1, 1) if reps > 1 else pool)[:n]

    recipe = SimCLRConfig(**{k: v for k, v in dataclasses.asdict(prof.pretrain).items() if k != "max_images"}
                          | {"epochs": 1})  # what pretrain_stage gives train_simclr, for one epoch
    batches = (4, 12) if not quick else (1, 3)
    rows: list[tuple] = []  # (kind, name, seconds per stage, count, note)

    def per_image_pass(run, batch_size: int) -> tuple[float, float]:
        """(intercept, seconds per image pass) from runs over n1 < n2 images, after an untimed one-batch run
        (the first run pays for cuDNN autotuning and first kernels; timed, it made the slope negative)."""
        run(batch_size)
        ns = [b * batch_size for b in batches]
        ts = [timed(lambda n=n: run(n), device) for n in ns]
        a, k, _ = linear_cost(ns[0], ts[0], ns[1], ts[1])
        return a, k

    def pretrain_run(n: int):
        train_simclr(build_encoder(prof.encoder), images(n), recipe, ctx)

    target_images = images(500)

    # pre-training: every planned pre-training stage, epochs x its data set
    try:
        with time_limit(clock.left()):
            a, k = per_image_pass(pretrain_run, recipe.batch_size)
    except OverBudget:
        rows.append(("pretrain", "simclr", None, counts[("pretrain", "pretrain")], SKIPPED))
    else:
        per = [a + k * prof.pretrain.epochs * (s.spec["max_images"] or size_of(s.name, "pretrain"))
               for s in stages if s.kind == "pretrain"]
        rows.append(("pretrain", "simclr", statistics.mean(per), counts[("pretrain", "pretrain")],
                     f"{k * 1e3 * recipe.batch_size:.1f} ms/step, {prof.pretrain.epochs} epochs"))

    clean_encoder = build_encoder(prof.encoder).to(device).eval()
    for attack in prof.grid.attacks:
        component = ATTACKS.get(attack)
        cfg = prof.attack_config(attack)
        trigger = trigger_from_description(cfg.make_trigger(size).describe())
        paper_epochs = getattr(cfg, "epochs", None)

        def attack_run(n: int, cfg=cfg, component=component, trigger=trigger):
            run_cfg = dataclasses.replace(cfg, **({"epochs": 1} if hasattr(cfg, "epochs") else {}),
                                          **({"shadow_images": n} if hasattr(cfg, "shadow_images") else {}))
            given = AttackInputs(prof.encoder, images(n), target_images, trigger, recipe, clean_encoder)
            component.fn(given, run_cfg, ctx)
        try:
            bs = getattr(cfg, "batch_size", recipe.batch_size)
            with time_limit(clock.left()):
                a, k = per_image_pass(attack_run, bs)
        except OverBudget:
            rows.append(("attack", attack, None, counts[("attack", attack)], SKIPPED))
            continue
        except Exception as err:  # reported, the check goes on
            rows.append(("attack", attack, None, counts[("attack", attack)], f"failed: {type(err).__name__}: {err}"))
            continue
        per = []
        for s in (s for s in stages if s.kind == "attack" and s.name == attack):
            n = s.spec["max_images"] or size_of(s.spec["pretrain"], "pretrain")
            if getattr(cfg, "shadow_images", 0):
                n = min(n, cfg.shadow_images)
            if attack == "bassl":  # the poisoned target-class images (~1/10 of the task) join the pre-training set
                n += round(getattr(cfg, "poison_fraction", 0.0) * size_of(s.spec["downstream"], "train") / 10)
            per.append(a + k * (paper_epochs if paper_epochs is not None else prof.pretrain.epochs) * n)
        rows.append(("attack", attack, statistics.mean(per), counts[("attack", attack)],
                     f"{k * 1e3 * bs:.1f} ms/step, {paper_epochs or prof.pretrain.epochs} epochs"))

    clean_n = min(prof.clean.max_images or 10**9, round(prof.clean.fraction * size_of("cifar10", "pretrain"))) \
        if not quick else prof.clean.max_images
    clean = CleanData(images(clean_n))
    # the two defenses the paper reports a cost for first and MOTH (the longest single run) last, so a spent
    # budget skips others
    for defense in sorted(prof.grid.defenses, key=lambda d: (d not in PAPER_COST, d == "moth")):
        component = DEFENSES.get(defense)
        cfg = prof.defense_config(defense)
        fields = tuple(budget_fields(defense)) + component.options.cost
        values = [getattr(cfg, f) for f in fields if getattr(cfg, f, 0)]
        s1 = max(1.0 / min(values), min(1.0, 5.0 / max(values)))  # every field >= 1, the largest >= 5
        # two points where 3 x s1 stays below the full budget; else one point, the cost taken proportional to s
        scales = (s1, 3 * s1) if 3 * s1 < 1.0 else (s1,)
        def defend(s: float, component=component, cfg=cfg, fields=fields) -> None:
            component.fn(clean_encoder.clone().to(device), clean, _scaled(cfg, fields, s), ctx)
        try:
            with time_limit(clock.left()):
                defend(0.0)  # warm-up, untimed: every budget field at 1
                ts = [timed(lambda s=s: defend(s), device) for s in scales]
        except OverBudget:
            rows.append(("defend", defense, None, counts[("defend", defense)], SKIPPED))
            continue
        except Exception as err:
            rows.append(("defend", defense, None, counts[("defend", defense)], f"failed: {type(err).__name__}: {err}"))
            continue
        est, proportional = extrapolate(scales[0], ts[0], scales[1], ts[1]) if len(ts) == 2 else (ts[0] / s1, True)
        paper = f"; paper {PAPER_COST[defense]:,.0f} s per cell" if defense in PAPER_COST else ""
        points = ", ".join(f"x {s:.3g} -> {t:.1f} s" for s, t in zip(scales, ts)) \
            + (" (proportional)" if proportional else "")
        rows.append(("defend", defense, est, counts[("defend", defense)],
                     f"{len(clean)} clean images, {'+'.join(fields)} {points}{paper}"))

    ev = prof.evaluate
    feats = torch.nn.functional.normalize(torch.randn(batches[1] * ev.batch_size * 4, clean_encoder.feature_dim), dim=1)
    labels = torch.randint(0, 10, (len(feats),))
    one = dataclasses.replace(ev, epochs=1)
    try:
        with time_limit(clock.left()):
            f_a, f_k = per_image_pass(lambda n: evaluation.extract_features(clean_encoder, images(n), ctx,
                                                                              ev.feature_batch), ev.feature_batch)
            p_a, p_k = per_image_pass(lambda n: evaluation.train_probe(feats[:n], labels[:n], 10, one, ctx),
                                      ev.batch_size * 4)
    except OverBudget:
        rows.append(("evaluate", "probe", None, counts[("evaluate", "evaluate")], SKIPPED))
    else:
        per = []
        for s in (s for s in stages if s.kind == "evaluate"):
            n_train = min(ev.max_train or 10**9, size_of(s.name, "train"))
            n_test = min(ev.max_test or 10**9, size_of(s.name, "test"))
            per.append(f_a + f_k * (n_train + 2 * n_test) + p_a + p_k * ev.epochs * n_train)
        rows.append(("evaluate", "probe", statistics.mean(per), counts[("evaluate", "evaluate")],
                     f"features {f_k * 1e6:.1f} us/image, probe {p_k * 1e3 * ev.batch_size:.2f} ms/step x "
                     f"{ev.epochs} epochs"))

    print(f"  {'kind':<9}{'name':<12}{'s/stage':>10}{'stages':>8}{'GPU-h':>9}  how")
    total = 0.0
    for kind, name, seconds, count, note in rows:
        hours = seconds * count / 3600 if seconds is not None else None
        total += hours or 0.0
        sec = f"{seconds:10.0f}" if seconds is not None else f"{'-':>10}"
        hrs = f"{hours:9.2f}" if hours is not None else f"{'-':>9}"
        print(f"  {kind:<9}{name:<12}{sec}{count:8d}{hrs}  {note}")
    longest = {k: max((r[2] for r in rows if r[0] == k and r[2] is not None), default=0.0)
               for k in ("pretrain", "attack", "defend", "evaluate")}
    critical = sum(longest.values()) / 3600
    print(f"  total {total:.1f} GPU-hours; on 8 GPUs at best {max(total / 8, critical):.1f} h "
          f"(work / 8, or the longest pretrain -> attack -> defend -> evaluate chain, {critical:.1f} h); "
          "target: within one day")
    skipped = [f"{r[0]} {r[1]}" for r in rows if r[2] is None]
    if skipped:
        print(f"  INCOMPLETE: not measured ({', '.join(skipped)}); the total leaves them out")
    print("  (sizes: CIFAR-10/STL-10/SVHN/GTSRB's published counts; feature caches shared between evaluations "
          "not counted, so evaluation is an upper bound)")


# ----------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: a dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: exercise the code paths")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; section 4 stops measuring beyond")
    parser.add_argument("--sections", default="1234", help="which of the four sections to run (default all)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}); run it on a machine with an NVIDIA "
              "GPU, or `--device cpu --quick` for a dry run of the code paths")
        return 2
    device = torch.device(args.device)
    clock = Clock(args.budget)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"gpu-check on {name}, torch {torch.__version__}{' (quick: numbers meaningless)' if args.quick else ''}")
    if "1" in args.sections:
        print("\n== 1. CUDA test subset (pytest -m cuda) ==")
        print(cuda_tests(timeout=120))
        print(f"  [{clock.elapsed:.0f} s]")
    if "2" in args.sections:
        print("\n== 2. step benchmark, fp32 vs bf16 ==")
        if args.quick:
            step_benchmark(device, width=8, batch=32, repeats=2, profile_name="ci")
        else:
            step_benchmark(device, width=64, batch=512, repeats=10, profile_name="paper")
        print(f"  [{clock.elapsed:.0f} s]")
    if "3" in args.sections:
        print("\n== 3. one tiny cell ==")
        tiny_cell(args.device, args.quick, timeout=900 if args.quick else 150)
        print(f"  [{clock.elapsed:.0f} s]")
    if "4" in args.sections:
        print("\n== 4. the paper Table I grid: estimated GPU-hours per stage kind ==")
        if args.quick:
            from defbench.benchmark.pipeline.settings import parse_sets
            grid_estimate(device, "ci", parse_sets(QUICK_SETS), clock, quick=True)
        else:
            grid_estimate(device, "paper", {}, clock, quick=False)
        print(f"  [{clock.elapsed:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
