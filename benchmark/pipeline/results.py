"""The results database: an embedded SQLite file, one row per evaluation.

Every number in a table comes from a row of ``evaluations`` (with its full
config, code version, seed, device and wall time; rows of a study also carry
its ``study``, ``arm``, ``sweep`` and swept value ``x``; every row its downstream ``protocol``, NULL in rows
written before protocols existed, which are ``mlp``); ``measurements`` holds
the studies' measurements (MI per layer...); ``stages`` keeps one row per
computed stage (what it was, how long it took, what it recorded). Rows are read with a renamed method's
former name replaced by its current one (``register_defense(..., formerly=...)``): its stored rows are its own.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

from ...attacks import ATTACKS
from ...defenses import DEFENSES

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    row_key TEXT PRIMARY KEY,
    eval_key TEXT NOT NULL,
    encoder_key TEXT NOT NULL,
    profile TEXT, overrides TEXT, seed INTEGER,
    attack TEXT, defense TEXT, role TEXT,
    pretrain TEXT, downstream TEXT, target INTEGER,
    acc REAL, asr_all REAL, asr_excl REAL, n_test INTEGER,
    encoder_seconds REAL, eval_seconds REAL,
    device TEXT, code_version TEXT, config TEXT, extra TEXT,
    created_at TEXT,
    study TEXT, arm TEXT, sweep TEXT, x REAL
);
CREATE TABLE IF NOT EXISTS measurements (
    row_key TEXT PRIMARY KEY,
    stage_key TEXT NOT NULL,
    name TEXT, study TEXT, arm TEXT,
    profile TEXT, overrides TEXT, seed INTEGER,
    attack TEXT, defense TEXT, pretrain TEXT, downstream TEXT, role TEXT,
    result TEXT, seconds REAL, device TEXT, code_version TEXT, created_at TEXT
);
CREATE TABLE IF NOT EXISTS stages (
    stage_key TEXT PRIMARY KEY,
    kind TEXT, name TEXT, label TEXT,
    seconds REAL, device TEXT, code_version TEXT,
    spec TEXT, records TEXT, created_at TEXT
);
"""

EVAL_COLUMNS = ["row_key", "eval_key", "encoder_key", "profile", "overrides", "seed", "attack", "defense",
                "role", "pretrain", "downstream", "target", "acc", "asr_all", "asr_excl", "n_test",
                "encoder_seconds", "eval_seconds", "device", "code_version", "config", "extra", "created_at",
                "study", "arm", "sweep", "x", "protocol"]
MEASUREMENT_COLUMNS = ["row_key", "stage_key", "name", "study", "arm", "profile", "overrides", "seed", "attack",
                       "defense", "pretrain", "downstream", "role", "result", "seconds", "device", "code_version",
                       "created_at"]
# columns added after the first release: (table, column, type), added to older databases on open
ADDED_COLUMNS = [("evaluations", "study", "TEXT"), ("evaluations", "arm", "TEXT"), ("evaluations", "sweep", "TEXT"),
                 ("evaluations", "x", "REAL"), ("evaluations", "protocol", "TEXT")]
STAGE_COLUMNS = ["stage_key", "kind", "name", "label", "seconds", "device", "code_version", "spec",
                 "records", "created_at"]


class ResultsDB:
    """The results database at ``path``; ``readonly`` opens an existing file for reading only (tables and
    reports: they work on a read-only copy, and never create or migrate the file)."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._immutable = False
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(2, "no results database here yet", str(self.path))
            try:
                self._probe()
            except sqlite3.OperationalError:
                # a WAL database in a folder we cannot write (no -shm file to create): read it as immutable
                self._immutable = True
                self._probe()
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._session() as con:
            con.executescript(SCHEMA)
            for table, column, kind in ADDED_COLUMNS:
                present = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    try:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                    except sqlite3.OperationalError:  # another process added it first
                        pass
        con = self._connect()
        try:  # SQLite opens a write-protected file read-only without a word: fail now, not at the first row
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE defbench_write_probe (x)")
        finally:
            if con.in_transaction:
                con.execute("ROLLBACK")
            con.close()

    def _probe(self) -> None:
        with self._session() as con:
            con.execute("SELECT count(*) FROM evaluations").fetchone()  # fails on a file of another kind

    @contextlib.contextmanager
    def _session(self):
        """A connection for one transaction, closed afterwards (the last close removes the -wal/-shm files)."""
        con = self._connect()
        try:
            with con:
                yield con
        finally:
            con.close()

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            flags = "mode=ro&immutable=1" if self._immutable else "mode=ro"
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?{flags}", uri=True, timeout=120)
        con = sqlite3.connect(self.path, timeout=120)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=120000")
        return con

    def _upsert(self, table: str, columns: list[str], row: dict) -> None:
        row = {k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v)
               for k, v in row.items()}
        row.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        values = [row.get(c) for c in columns]
        with self._session() as con:
            con.execute(f"INSERT OR REPLACE INTO {table} ({','.join(columns)}) "
                        f"VALUES ({','.join('?' * len(columns))})", values)

    def add_evaluation(self, row: dict) -> None:
        self._upsert("evaluations", EVAL_COLUMNS, row)

    def add_measurement(self, row: dict) -> None:
        self._upsert("measurements", MEASUREMENT_COLUMNS, row)

    def add_stage(self, row: dict) -> None:
        self._upsert("stages", STAGE_COLUMNS, row)

    def evaluations(self, **where) -> pd.DataFrame:
        return current_names(self._query("evaluations", where))

    def measurements(self, **where) -> pd.DataFrame:
        return current_names(self._query("measurements", where))

    def stages(self, **where) -> pd.DataFrame:
        return self._query("stages", where)

    def _query(self, table: str, where: dict) -> pd.DataFrame:
        columns = {"evaluations": EVAL_COLUMNS, "measurements": MEASUREMENT_COLUMNS, "stages": STAGE_COLUMNS}[table]
        unknown = set(where) - set(columns)
        if unknown:
            raise ValueError(f"{table} has no column {sorted(unknown)[0]!r}")
        clauses = " AND ".join(f"{k} = ?" for k in where)
        sql = f"SELECT * FROM {table}" + (f" WHERE {clauses}" if where else "")
        con = self._connect()
        try:
            return pd.read_sql_query(sql, con, params=list(where.values()))
        finally:
            con.close()


def current_names(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with every renamed attack's and defense's former name replaced by its current one."""
    for column, registry in (("attack", ATTACKS), ("defense", DEFENSES)):
        renamed = registry.renamed()
        if renamed and column in rows:
            rows[column] = rows[column].replace(renamed)
    return rows
