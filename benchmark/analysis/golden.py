"""The regression subset (``make ci-small``): a fixed small grid compared with golden values.

The subset is the ``ci`` profile's grid restricted to one pre-training set and
two downstream tasks: BadEncoder and BASSL x (clean, undefended, the eight
defenses). ``defbench golden check`` runs it (finished stages come from the
artifact store) and compares every ACC/ASR with this CPU kind's golden file,
``tests/golden/ci-small.<kind>.csv``; ``defbench golden update`` reruns it for
several seeds and rewrites that file.

How the tolerances are set: on one device the same config and seed gives
bit-identical numbers (``tests/test_determinism.py``), so at the golden seed
any difference is a change of behaviour. What counts as *significant* comes
from the seed-to-seed spread: ``update`` runs every seed in ``--seeds``, and
each value's tolerance is ``max(floor, factor * (max - min over the runs))``
(floors 1 point of ACC and 2 points of ASR, factor 1). A change that moves a
number by less than swapping the seed does passes; anything larger fails and
is listed. The golden value itself is the first seed's. The subset always runs
with ``THREADS`` intra-op threads: the same seed with 1 and 2 threads already
differs by up to 16 points of ACC at this scale (measured when the file was
first written). Stage seeds do not depend on code versions, so a refactor that
changes no numerics reproduces the golden values exactly (before that, every
edit of a module re-drew its seeds and could fail here on noise alone). The
file was last rewritten when that seeding changed (seeds 0-2 at 2 threads).

Across machines of one CPU kind (torch's CPU capability: AVX2, AVX512) the values are the same: the
AVX512 file written on one machine was reproduced to the last digit, all 80 values, on another (a 2-core
AMD EPYC). A CPU of another kind runs
other kernels, and at one seed's floors most values move (52-58 of 80 on each change of kind). So there
is one file per kind; a machine of a kind with no file writes its own (``golden update --seeds 0``) when
no commit changed numerics since the others were written, and an update after a change of numerics
leaves the other kinds' files stale: delete them, and a machine of that kind writes its own.
"""
from __future__ import annotations

import datetime
import platform
import io
from pathlib import Path

import pandas as pd
import torch

from ...core import UserError
from ..pipeline.plan import expand_grid, grid_spec
from ..pipeline.scheduler import run_grid
from ..pipeline.settings import Profile
from ..pipeline.stages import Env

PRETRAIN = "synth-cifar10"
TASKS = ["synth-stl10", "synth-svhn"]
KEY = ["attack", "pretrain", "downstream", "column"]
METRICS = {"acc": 1.0, "asr": 2.0}  # metric -> tolerance floor (points)
GOLDEN_DIR = Path("tests") / "golden"
# CPU float reductions depend on the intra-op thread count, and these small runs amplify a last-bit
# difference into points of ACC/ASR; the subset always runs with this many threads.
THREADS = 2


class GoldenError(UserError):
    """The golden file is missing, unreadable or does not match the subset."""


def run_subset(profile: Profile, env: Env, workers: int = 1) -> pd.DataFrame:
    """Run (or fetch from the store) the subset's stages; one row per (attack, pretrain, task, column)."""
    torch.set_num_threads(THREADS)
    spec = grid_spec(profile, pretrain=[PRETRAIN], downstream=TASKS)
    cells = expand_grid(profile, spec)
    outcomes = run_grid(list(cells.values()), env, "local", workers, threads=THREADS)  # every worker too
    failed = [f"{o.stage.label}: {o.error}" for o in outcomes if o.status in ("failed", "skipped")]
    if failed:
        raise GoldenError("the regression subset did not finish: " + "; ".join(failed[:3]))
    rows = []
    for (attack, column, pretrain, task), stage in cells.items():
        result = env.store.read_meta(stage.kind, stage.key)["result"]
        rows.append({"attack": attack, "pretrain": pretrain, "downstream": task, "column": column,
                     "acc": result["acc"], "asr": result["asr_all"]})
    return pd.DataFrame(rows).sort_values(KEY).reset_index(drop=True)


def golden_frame(runs: list[pd.DataFrame], factor: float = 1.0) -> pd.DataFrame:
    """Golden values (the first run) with tolerances from the spread over all runs."""
    merged = runs[0].set_index(KEY)
    stacked = pd.concat([r.set_index(KEY) for r in runs], keys=range(len(runs)))
    for metric, floor in METRICS.items():
        spread = stacked[metric].groupby(level=KEY).agg(lambda v: v.max() - v.min())
        merged[f"spread_{metric}"] = spread.reindex(merged.index)
        merged[f"tol_{metric}"] = (factor * merged[f"spread_{metric}"]).clip(lower=floor)
    return merged.reset_index()


def cpu_kind() -> str:
    """The CPU's vector instruction set as torch uses it and its vendor (e.g. AVX512-GenuineIntel): the kernels,
    and so the rounding that these small runs amplify into points of ACC/ASR, differ between kinds; an Intel and
    an AMD CPU that torch both runs at AVX512 differ too (measured: the clean cells move beyond the floors)."""
    return f"{torch.backends.cpu.get_cpu_capability()}-{cpu_vendor()}"


def cpu_vendor() -> str:
    """The CPU vendor's id (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo, else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def default_file(folder: Path = GOLDEN_DIR) -> Path:
    """This CPU kind's golden file (the values reproduce across machines of one kind, not across kinds)."""
    return folder / f"ci-small.{cpu_kind()}.csv"


def other_cpu_files(path: Path) -> list[Path]:
    """The golden files of the other CPU kinds beside ``path``."""
    return sorted(p for p in path.parent.glob("ci-small.*.csv") if p.name != path.name)


def missing_kind_error(path: Path) -> GoldenError:
    """No golden file for this CPU kind: say which kinds have one and how to write this one."""
    kinds = ", ".join(p.name.split(".")[1] for p in other_cpu_files(path)) or "none"
    return GoldenError(f"no golden file for this CPU kind ({cpu_kind()}) at {path} (kinds with one: {kinds}); "
                       "ci values depend on the CPU kind: if no commit changed numerics since those were written, "
                       "write this one with `defbench golden update --seeds 0` and commit it")


def write_golden(frame: pd.DataFrame, path: Path, seeds: list[int], device: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# defbench regression subset, profile ci, written {datetime.date.today()} by "
              f"`defbench golden update --seeds {','.join(map(str, seeds))}` on {device}, torch {torch.__version__}\n"
              f"# seed: {seeds[0]} (the values); tol_* = max(floor, spread over the seeds); see benchmark/golden.py\n"
              f"# cpu: {cpu_kind()}\n")
    path.write_text(header + frame.to_csv(index=False, float_format="%.2f"))


def _header_value(path: Path, key: str) -> str | None:
    """The value of the golden file's ``# key: value`` header line, or None if it has none."""
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].strip()
    return None


def golden_cpu(path: Path) -> str | None:
    """The CPU kind the golden file was written on (its ``# cpu:`` header line), or None if it does not say."""
    try:
        return _header_value(path, "cpu")
    except (OSError, UnicodeDecodeError):
        return None


def cpu_hint(written_on: str | None) -> str:
    """What to do when values moved on a CPU of another kind than the golden file's (empty on the same kind)."""
    here = cpu_kind()
    if written_on == here:
        return ""
    return (f"\nThe golden file was written on a {written_on or 'unrecorded'} CPU and this one is {here}: at ci "
            "the CPU's rounding alone moves most values beyond one-seed floors (README). "
            "If no commit changed numerics, rewrite it here (`defbench golden update --seeds 0`) and say so.")


def golden_seed(path: Path) -> int:
    """The seed the golden values were computed with (the ``# seed:`` header line; 0 if absent)."""
    if not path.is_file():
        return 0
    try:
        value = _header_value(path, "seed")
        return 0 if value is None else int(value.split()[0])
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        raise GoldenError(f"golden file {path}: cannot read its '# seed: N' line; restore it from git or rerun "
                          "`defbench golden update`") from None


def read_golden(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise GoldenError(f"no golden file at {path}; create it with `defbench golden update`")
    try:
        frame = pd.read_csv(path, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise GoldenError(f"golden file {path} is not a CSV ({exc}); restore it from git or rerun "
                          "`defbench golden update`") from None
    missing = {*KEY, *METRICS, *(f"tol_{m}" for m in METRICS)} - set(frame.columns)
    if missing:
        raise GoldenError(f"golden file {path} lacks columns {sorted(missing)}; rerun `defbench golden update`")
    return frame


def compare(current: pd.DataFrame, golden: pd.DataFrame) -> pd.DataFrame:
    """One row per value: golden, now, delta, tolerance and whether it moved beyond it (or is missing)."""
    both = golden.merge(current, on=KEY, how="outer", suffixes=("_golden", "_now"), indicator=True)
    rows = []
    for _, r in both.iterrows():
        for metric in METRICS:
            golden_value, now = r.get(f"{metric}_golden"), r.get(f"{metric}_now")
            delta = now - golden_value
            tol = r.get(f"tol_{metric}")
            status = ("new" if r["_merge"] == "right_only" else "missing" if r["_merge"] == "left_only"
                      else "moved" if abs(delta) > tol else "ok")
            rows.append({**{k: r[k] for k in KEY}, "metric": metric.upper(), "golden": golden_value,
                         "now": now, "delta": delta, "tol": tol, "status": status})
    return pd.DataFrame(rows)


def format_diff(diff: pd.DataFrame, show_all: bool = False) -> str:
    bad = diff[diff.status != "ok"]
    shown = diff if show_all else bad
    out = io.StringIO()
    if len(shown):
        out.write(shown.to_markdown(index=False, floatfmt=".1f") + "\n")
    if len(bad):
        out.write(f"regression subset: {len(bad)} of {len(diff)} values moved beyond tolerance (or are "
                  "missing/new). If the change is intended: `defbench golden update`, and say why in the commit.")
    else:
        out.write(f"regression subset: all {len(diff)} values within tolerance of the golden file.")
    return out.getvalue()
