"""The artifact store: one folder per stage output, keyed by a content hash.

A folder appears under its final name only once complete (written to a
temporary sibling, then renamed), so a reader never sees half an artifact and
an interrupted stage leaves nothing but a temporary folder to sweep. A lock
file per key keeps two workers from computing the same stage at once.

Temporaries of killed processes are swept at start-up (``commands.common.open_env``):
the store's ``.tmp-KEY-HOST-PID-XXXXXX`` folders when PID is gone on this host,
and every ``.NAME.PID.tmp`` file (dataset caches, checkpoints) under a folder
given to :func:`sweep_stale_files` when PID is gone and the file has not been
touched for a minute. :meth:`ArtifactStore.damaged` finds artifacts whose files
are cut short (``defbench clean --stale`` removes them).

A stage whose training diverged (NaN or inf) leaves no artifact but a small record,
``diverged/KIND/KEY.json``: on the same device the same key diverges again, so a
rerun reports it without recomputing, and a study renders that arm as diverged.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
import zipfile
from pathlib import Path

import torch

from ...core import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no cross-process locking
    fcntl = None


class StoreError(UserError):
    """A stored artifact that cannot be read; the message names it and says how to recompute it."""


class ArtifactStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / key

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / "meta.json").is_file()

    def read_meta(self, kind: str, key: str) -> dict:
        path = self.path(kind, key) / "meta.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise StoreError(f"cannot read the stored artifact {path} ({type(err).__name__}); delete the folder "
                             f"{path.parent} and rerun to recompute it") from None

    @staticmethod
    def save_tensor(obj, path: Path) -> None:
        """``torch.save`` with bytes that depend only on the tensors (not on a temporary file name)."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue())

    @staticmethod
    def load_tensor(path: Path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated or damaged: say which file, and what to do
            raise StoreError(f"cannot read the stored artifact {path} ({type(err).__name__}); delete the folder "
                             f"{Path(path).parent} and rerun to recompute it") from None

    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        lock_path = self.root / "locks" / f"{kind}-{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "w") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def writing(self, kind: str, key: str, meta: dict):
        """Yield a temporary folder to fill; on success it becomes the artifact (with meta.json)."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir()
        try:
            yield tmp
            meta = {**meta, "key": key, "kind": kind, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
            if final.exists():  # another worker finished first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def divergence_path(self, kind: str, key: str) -> Path:
        return self.root / "diverged" / kind / f"{key}.json"

    def record_divergence(self, kind: str, key: str, record: dict) -> None:
        """Note that this stage diverged (written atomically; no artifact is stored)."""
        path = self.divergence_path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**record, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        os.replace(tmp, path)

    def divergence(self, kind: str, key: str) -> dict | None:
        """The record of this stage's divergence, or None (none, or unreadable: then it simply runs again)."""
        try:
            record = json.loads(self.divergence_path(kind, key).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def sweep_temporaries(self) -> int:
        """Remove temporary folders of killed workers on this host (their PID is gone); returns how many."""
        return len(self.stale_temporaries(remove=True))

    def stale_temporaries(self, remove: bool = False) -> list[Path]:
        """The temporary folders of killed workers on this host (removed when ``remove``)."""
        found, host = [], socket.gethostname()
        for tmp in self.root.glob("*/*/.tmp-*"):
            match = _TMP_NAME.match(tmp.name)
            if match and match["host"] == host and not _alive(int(match["pid"])):
                found.append(tmp)
                if remove:
                    shutil.rmtree(tmp, ignore_errors=True)
        return found

    def damaged(self) -> list[Path]:
        """Artifact folders that cannot be read back: an unreadable meta.json, or a ``.pt`` file cut short
        (a torch file is a zip archive, whose directory sits at its end)."""
        bad = []
        for meta in self.root.glob("*/*/*/meta.json"):
            folder = meta.parent
            if folder.name.startswith("."):
                continue
            try:
                json.loads(meta.read_text())
                for tensor_file in folder.glob("*.pt"):
                    with zipfile.ZipFile(tensor_file) as archive:
                        archive.infolist()
            except (OSError, ValueError, zipfile.BadZipFile):
                bad.append(folder)
        return bad


_TMP_NAME = re.compile(r"^\.tmp-(?P<key>[0-9a-f]+)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{6}$")
_TMP_FILE = re.compile(r"^\..+\.(?P<pid>\d+)\.tmp$")
STALE_AFTER_S = 60  # a temporary file untouched this long whose PID is gone is left over (no host in its name)


def stale_files(folder: Path) -> list[Path]:
    """``.NAME.PID.tmp`` files under ``folder`` whose PID is gone and that have not changed for a minute."""
    found, now = [], time.time()
    if not Path(folder).is_dir():
        return found
    for path in Path(folder).rglob(".*.tmp"):
        if any(part.startswith(".tmp-") for part in path.relative_to(folder).parts[:-1]):
            continue  # inside a stage's temporary folder: swept with it
        match = _TMP_FILE.match(path.name)
        try:
            old = now - path.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if match and path.is_file() and old and not _alive(int(match["pid"])):
            found.append(path)
    return found


def sweep_stale_files(folder: Path) -> int:
    """Remove :func:`stale_files`; returns how many."""
    found = stale_files(folder)
    for path in found:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return len(found)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
