"""Atomic, resumable file output shared by every stage.

Every artefact is written to a temporary sibling and renamed into place, so a killed run leaves
either the old state or the new one, never a half-written file.

`KeyedOutput` is the one way a step that caches decides what to do with its output: done (it holds
this key: reuse it), another key (an error for a user's `--out`, a redo for a cache), a partial run of
this key to resume (a staging folder `.{name}.partial`, or a partial JSONL log), and publishing the
finished output (one rename, or one atomic JSON write). Train, inject, evaluate, kl, the split, repair's
evaluation cache, the edited folders of `sftlens.weights.apply`, the audit's steps and the study's linked
model folders all use it (a probe store grows fact by fact instead: `sftlens.probe.store`).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sftlens.errors import SftlensError


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order, process and machine."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block completes.

    An existing `path` is replaced as a whole; an interrupted block leaves no trace at `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make shared model folders private
    try:
        yield tmp
        _replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(source: Path, path: Path) -> None:
    """Rename the folder `source` to `path`; whatever was at `path` is replaced as a whole."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(source, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, path)
    _fsync_dir(path.parent)


KEY_FILE = "run_key"  # a staging folder's key (the name training runs have always used)


def staging_path(path: str | Path) -> Path:
    """The hidden sibling a keyed output is built in: `.{name}.partial`."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _scratch(name: str) -> bool:
    """A partial log (`KeyedOutput.log`): the only file a folder output may hold before it is finished."""
    return name.startswith(".") and name.endswith(".partial.jsonl")


class KeyedOutput:
    """The output of a step keyed by its inputs (`key`, a `stable_hash`): a folder whose `record` file
    (JSON) holds the key, or, without `record`, a JSON file that holds it (field `key_field`).

    - `finished()` / `done()`: the output was finished with this key (reuse it). Another key at `path` is
      a one-line `SftlensError` naming the path when `stale="error"` (a user's `--out`: never touched), or
      not done when `stale="redo"` (a cache: redone, and replaced on publishing). A folder holding
      anything else is an error (`stale="error"`) or not done (`"redo"`).
    - `partial()`: the staging folder `.{name}.partial` of this key, to build a folder in (kept when a
      run with this key left it, so it resumes; cleared when another key's run did); `writing()`: a
      fresh staging folder published when the block completes, removed when it fails.
    - `log(name)`: the partial JSONL log this key's work appends to before the output is written.
    - `publish()`: the staging folder (or a folder `staged` inside it) renamed to `path` in one step;
      `write(data)`: the record written atomically (last: it marks the output finished).
    """

    def __init__(self, path: str | Path, key: str | None = None, record: str | None = None, *,
                 what: str = "an sftlens output", stale: str = "error", key_field: str = "key"):
        if stale not in ("error", "redo"):
            raise ValueError(f"stale must be error or redo, got {stale!r}")
        self.path, self.key, self.record, self.what = Path(path), key, record, what
        self.stale, self.key_field = stale, key_field
        self._found: dict | None = None

    @classmethod
    def staged_at(cls, staging: str | Path, key: str, **kwargs) -> KeyedOutput:
        """The output whose staging folder is `staging` (`.{name}.partial`)."""
        staging = Path(staging)
        name = staging.name.removeprefix(".").removesuffix(".partial")
        if staging.name != f".{name}.partial":
            raise ValueError(f"{staging}: not a staging folder (.NAME.partial)")
        return cls(staging.with_name(name), key, **kwargs)

    @property
    def record_path(self) -> Path:
        return self.path / self.record if self.record else self.path

    @property
    def staging(self) -> Path:
        return staging_path(self.path)

    def _load(self) -> dict | None:
        try:
            data = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            if self.stale == "error" and self.record_path.exists():
                raise SftlensError(f"{self.record_path}: unreadable ({err}); choose another --out") from None
            return None
        return data if isinstance(data, dict) else None

    def finished_key(self) -> str | None:
        """The key of the finished output at `path`; None when there is none (absent, an empty folder or
        one holding only partial logs; with `stale="redo"` also anything else)."""
        self._found = None
        if not self.path.exists():
            return None
        if self.record is not None and not self.path.is_dir():
            if self.stale == "redo":
                return None
            raise SftlensError(f"{self.path}: exists and is not a folder; choose another --out")
        found = self._load()
        if found is not None and found.get(self.key_field) is not None:
            self._found = found
            return found[self.key_field]
        if self.record is not None and self.stale == "error":
            foreign = sorted(p.name for p in self.path.iterdir() if not _scratch(p.name))
            if foreign:
                raise SftlensError(f"{self.path}: holds files that are not {self.what} ({foreign[0]}); "
                                   "choose another --out")
        return None

    def finished(self) -> dict | None:
        """The record of the output at `path` if it was finished with this key, else None (see the class)."""
        found = self.finished_key()
        if found is None or found == self.key:
            return self._found
        if self.stale == "error":
            noun = self.what.split(" ", 1)[-1].removeprefix("sftlens ")
            raise SftlensError(f"{self.path}: holds another {noun} (key {found}); choose another --out")
        return None

    def done(self) -> bool:
        return self.finished() is not None

    def partial(self, say=None) -> Path:
        """The staging folder of this key (its `run_key` file holds the key): the one a killed run with this
        key left, to resume, else a new empty one (`say` is told when another key's folder is discarded)."""
        work = self.staging
        marker = work / KEY_FILE
        if work.is_dir() and marker.is_file() and marker.read_text().strip() == self.key:
            return work
        if work.exists():
            if say:
                say(f"discarding {work}: an interrupted run with other inputs")
            shutil.rmtree(work)
        work.mkdir(parents=True)
        marker.write_text(f"{self.key}\n")
        return work

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A fresh staging folder, published (`publish`) when the block completes, removed when it fails."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        try:
            yield self.staging
            self.publish()
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise

    def publish(self, staged: Path | None = None) -> Path:
        """Rename the finished folder into place: `staged` (inside the staging folder, which then goes) or
        the staging folder itself. What was at `path` is replaced whole: with `stale="error"` only an empty
        folder (anything else there was refused by `finished`, and is never touched), with `"redo"` a stale output."""
        if self.stale == "error" and self.path.exists():
            self.path.rmdir()  # empty, or an OSError: rename would not replace a non-empty folder either
        if staged is None:
            (self.staging / KEY_FILE).unlink(missing_ok=True)
        _replace_folder(Path(staged or self.staging), self.path)
        if staged is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        return self.path

    def write(self, data: dict) -> dict:
        """Write the record, `data` with this key, atomically: a JSON output, or a folder's record file."""
        record = {self.key_field: self.key, **data}
        atomic_write_json(self.record_path, record)
        return record

    def log(self, name: str | None = None) -> Path:
        """The partial JSONL log of this key: `.{stem}.{key}.partial.jsonl` beside a JSON output, or inside
        a folder output for its file `name`; other keys' logs of the same file are removed."""
        target = self.path / name if name else self.path
        own = target.with_name(f".{target.stem}.{self.key}.partial.jsonl")
        pattern = re.compile(rf"\.{re.escape(target.stem)}\.[0-9a-f]+\.partial\.jsonl")
        if target.parent.is_dir():
            for stale in target.parent.iterdir():
                if stale.name != own.name and pattern.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)
        return own


def read_jsonl(path: str | Path) -> list[dict]:
    """Read complete JSON lines; a torn last line (a killed appender) is ignored."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            rows.append(json.loads(line))
    return rows


class JsonlAppender:
    """Append-only JSONL log for incremental results: each row is flushed and fsynced.

    A torn trailing line left by a killed writer is cut off on open, so appends resume cleanly.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock_path(target: str | Path) -> Path:
    """The lock file of an output folder or file: a hidden sibling, so the output itself stays clean."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive_writer(target: str | Path, what: str = "output") -> Iterator[None]:
    """Hold the one-writer lock of `target` (an OS-level `flock`, which the kernel drops when the
    holder dies, so a SIGKILL leaves no stale lock). A second writer fails at once with one line
    naming the holder (pid, host and start time, from the lock file). Readers never take it."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise SftlensError(f"{target}: another sftlens run is writing this {what} ({holder}); wait for it to end, "
                           "or write elsewhere") from None
    try:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, its content is only read while locked


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
