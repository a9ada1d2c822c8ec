"""The checkpoint zoo: public backdoored and clean encoders, listed in a manifest shipped with the package.

``benchmark/data/zoo.toml`` has one ``[[encoder]]`` table per checkpoint (:class:`ZooEntry` lists the fields):
where it is published, its sha256 (``""`` when nobody could compute it here: *unverified*, never guessed;
``sha256_source`` says where a stated hash comes from), the layout defbench reads it in, its input size and
normalisation, the trigger and target class of its backdoor, the paper, the licence, and the thresholds
``verify`` checks. Files go under ``$DEFBENCH_HOME/zoo/NAME/``.

- ``fetch`` downloads a file whose URL is a direct link (not when ``DEFBENCH_OFFLINE=1``: then one line says
  where to put the file) and refuses, deleting it, a file whose sha256 differs from the stated one;
- ``verify`` measures clean ACC and ASR on the entry's stated task with the benchmark's probe (the ``evaluate``
  stage) and calls the checkpoint *live* only when ACC >= ``min_acc`` and, for a backdoored one,
  ASR >= ``min_asr`` (for a clean one ASR is reported, not judged).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ...core import UserError, paths
from ...encoders.checkpoints import file_sha256
from ...encoders.tower_checkpoints import TOWER_LAYOUTS

LAYOUTS = ("badencoder", "torchvision", "defbench", *TOWER_LAYOUTS)
KINDS = ("backdoored", "clean")
_SHA = re.compile(r"^[0-9a-f]{64}$")


class ZooError(UserError):
    """A manifest, a download or a file that does not pass; the message says what to do."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # backdoored | clean
    url: str  # the file itself, or the release's folder (then `direct = false`)
    file: str  # the file's name (inside the folder, when the URL is one)
    layout: str  # how defbench reads it (LAYOUTS)
    arch: str  # what it is, for people (ResNet-18, CLIP ViT-B/32, ...)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    task: str  # the downstream task its backdoor targets / verify measures on (a defbench dataset)
    paper: str
    licence: str
    source: str  # the README or page that lists the file
    direct: bool = True  # the URL downloads the file (False: a shared folder, download by hand)
    sha256: str = ""  # "" = unverified
    sha256_source: str = ""  # where a stated hash comes from
    target: int | None = None  # None (and no trigger) where the release does not state them
    trigger: str = ""  # the trigger's file name (under the entry's folder), or patch:SIZE
    trigger_url: str = ""
    min_acc: float = 0.0
    min_asr: float | None = None  # backdoored only
    note: str = ""

    @property
    def verified(self) -> bool:
        return bool(self.sha256)

    def folder(self) -> Path:
        return paths.home() / "zoo" / self.name

    def path(self) -> Path:
        return self.folder() / self.file

    def trigger_path(self) -> str:
        if not self.trigger or self.trigger.startswith("patch"):
            return self.trigger
        return str(self.folder() / self.trigger)


FIELDS = {f.name: f for f in dataclasses.fields(ZooEntry)}
REQUIRED = [name for name, f in FIELDS.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _entry(table: dict, where: str) -> ZooEntry:
    name = table.get("name", "?")
    missing = [f for f in REQUIRED if f not in table]
    unknown = sorted(set(table) - set(FIELDS))
    if missing or unknown:
        raise ZooError(f"{where}: entry {name!r} " + (f"lacks {', '.join(missing)}" if missing else "")
                       + ("; " if missing and unknown else "") + (f"has unknown fields {', '.join(unknown)}"
                                                                  if unknown else ""))
    values = {**table, "mean": tuple(table["mean"]), "std": tuple(table["std"])}
    entry = ZooEntry(**values)
    problems = []
    if entry.kind not in KINDS:
        problems.append(f"kind must be one of {', '.join(KINDS)}")
    if entry.layout not in LAYOUTS:
        problems.append(f"layout must be one of {', '.join(LAYOUTS)}")
    if entry.sha256 and not _SHA.match(entry.sha256):
        problems.append("sha256 must be 64 lowercase hex digits, or empty (unverified)")
    if entry.sha256 and not entry.sha256_source:
        problems.append("a stated sha256 needs sha256_source (where it comes from)")
    if entry.kind == "backdoored" and entry.min_asr is None:
        problems.append("a backdoored entry needs min_asr")
    if bool(entry.trigger) != (entry.target is not None):
        problems.append("trigger and target go together (both, or neither where the release does not state them)")
    if len(entry.mean) != 3 or len(entry.std) != 3:
        problems.append("mean and std need three values")
    if problems:
        raise ZooError(f"{where}: entry {name!r}: {'; '.join(problems)}")
    return entry


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, ZooEntry]:
    """Every entry of the manifest (the shipped one, or ``path``), checked; name -> entry."""
    if path is None:
        text, where = (resources.files("defbench.benchmark") / "data" / "zoo.toml").read_text(), "the zoo manifest"
    else:
        text, where = Path(path).read_text(), str(path)
    try:
        tables = tomllib.loads(text).get("encoder", [])
    except tomllib.TOMLDecodeError as err:
        raise ZooError(f"{where} is not valid TOML: {err}") from None
    entries: dict[str, ZooEntry] = {}
    for table in tables:
        entry = _entry(table, where)
        if entry.name in entries:
            raise ZooError(f"{where}: entry {entry.name!r} appears twice")
        entries[entry.name] = entry
    return entries


def manifest_path() -> str | None:
    """``$DEFBENCH_ZOO``: another manifest (a TOML file of the same schema), for one's own checkpoints."""
    return os.environ.get("DEFBENCH_ZOO") or None


def get(name: str) -> ZooEntry:
    entries = load_manifest(manifest_path())
    if name not in entries:
        raise ZooError(f"no zoo entry {name!r}; `defbench zoo list` shows the {len(entries)} entries")
    return entries[name]


# ----------------------------------------------------------------- files

def check_hash(entry: ZooEntry, path: Path) -> str:
    """The file's sha256; a file whose hash is not the stated one is deleted and refused."""
    digest = file_sha256(path)
    if entry.sha256 and digest != entry.sha256:
        path.unlink(missing_ok=True)
        raise ZooError(f"{entry.name}: the file's sha256 is {digest[:16]}..., the manifest states "
                       f"{entry.sha256[:16]}... ({entry.sha256_source}); refused and deleted")
    return digest


def _download(url: str, out: Path, what: str, entry: ZooEntry) -> None:
    offline = os.environ.get("DEFBENCH_OFFLINE") == "1" and not url.startswith("file:")
    if offline:
        raise ZooError(f"{entry.name}: DEFBENCH_OFFLINE=1, so {what} was not downloaded; put {url} at {out} "
                       f"yourself, then run `defbench zoo verify {entry.name}`")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as handle:
            while block := response.read(1 << 20):
                handle.write(block)
        os.replace(tmp, out)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ZooError(f"{entry.name}: cannot download {what} from {url} "
                       f"({getattr(err, 'reason', None) or err}); check the connection, or put the file at "
                       f"{out} yourself") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(entry: ZooEntry) -> dict:
    """Download the checkpoint (and its trigger file) unless already there; check the stated hash."""
    path = entry.path()
    if not path.is_file():
        if not entry.direct:
            raise ZooError(f"{entry.name}: {entry.url} is a shared folder, not a file; download {entry.file} from it "
                           f"by hand to {path}, then run `defbench zoo verify {entry.name}`")
        _download(entry.url, path, "the checkpoint", entry)
    digest = check_hash(entry, path)
    trigger = entry.trigger_path()
    if trigger and not trigger.startswith("patch") and not Path(trigger).is_file():
        if not entry.trigger_url:
            raise ZooError(f"{entry.name}: its trigger {entry.trigger} is missing at {trigger} and has no URL")
        _download(entry.trigger_url, Path(trigger), "the trigger", entry)
    return {"name": entry.name, "path": str(path), "sha256": digest, "verified": entry.verified,
            "trigger": trigger}


def local_file(entry: ZooEntry) -> Path:
    """The fetched checkpoint (its hash checked), or a one-line error saying how to get it."""
    path = entry.path()
    if not path.is_file():
        raise ZooError(f"{entry.name} is not fetched yet; run `defbench zoo fetch {entry.name}` (or put "
                       f"{entry.file} at {path})")
    check_hash(entry, path)
    return path


def suspect(name: str):
    """A fetched zoo checkpoint as a grid suspect (``--suspect zoo:NAME``): its trigger and target from the
    manifest, read at the manifest's input size and normalisation."""
    from .external import resolve_suspect
    entry = get(name)
    path = local_file(entry)
    return resolve_suspect(entry.name, str(path), trigger=entry.trigger_path() or None,
                           target=entry.target if entry.trigger else None, image_size=entry.image_size,
                           mean=entry.mean, std=entry.std)


def verdict(entry: ZooEntry, acc: float, asr: float | None) -> tuple[bool, str]:
    """(live, why): ACC at least ``min_acc`` and, backdoored, ASR at least ``min_asr``."""
    reasons = []
    if not acc >= entry.min_acc:
        reasons.append(f"ACC {acc:.2f} < {entry.min_acc:g}")
    if entry.kind == "backdoored" and asr is None:
        reasons.append("the manifest states no trigger and target, so the backdoor cannot be measured")
    elif entry.kind == "backdoored" and not asr >= entry.min_asr:
        reasons.append(f"ASR {asr:.2f} < {entry.min_asr:g}")
    if reasons:
        return False, "not live: " + ", ".join(reasons)
    return True, "live: " + (f"ACC {acc:.2f} >= {entry.min_acc:g}" + (
        f", ASR {asr:.2f} >= {entry.min_asr:g}" if entry.kind == "backdoored" else ""))
