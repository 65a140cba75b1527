"""Files written whole or not at all, their hashes, and the cache folder.

Folders and JSON files are written beside their target under a temporary name, then renamed
into place, so a crash never leaves half of one behind. Temporary folders carry their
creator in their name (``PREFIX-PID@HOST-XXXX``), so one left by a killed process can be told
from one still being written, and removed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def default_cache_dir() -> Path:
    """``$FREEMERGE_CACHE``, else ``$XDG_CACHE_HOME/freemerge``, else ``~/.cache/freemerge``."""
    if os.environ.get("FREEMERGE_CACHE"):
        return Path(os.environ["FREEMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "freemerge"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _host_tag() -> str:
    """8 hex digits of this host's name: a PID is only judged on the host that wrote it."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owned_tempdir(parent: Path | None, prefix: str) -> Path:
    """A new private folder (mode 0700) ``PREFIX-PID@HOST-XXXX`` in ``parent`` (None: the
    system's temporary folder)."""
    return Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}-{os.getpid()}@{_host_tag()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def stale_folders(parent: Path, prefix: str) -> list[Path]:
    """Folders of :func:`owned_tempdir` in ``parent`` whose creator, on this host, is gone."""
    pattern = re.compile(re.escape(prefix) + r"-(\d+)@([0-9a-f]{8})-")
    host = _host_tag()
    try:
        entries = sorted(Path(parent).iterdir())
    except FileNotFoundError:
        return []
    return [
        path
        for path in entries
        if (match := pattern.match(path.name))
        and match[2] == host
        and not _alive(int(match[1]))
        and path.is_dir()
        and not path.is_symlink()
    ]


def _partial_prefix(out: Path) -> str:
    return f".{out.name}-partial"


def _aside_prefix(out: Path) -> str:
    return f".{out.name}-old"


def stale_partials(out: Path) -> list[Path]:
    """Folders that :func:`replaced_directory` left beside ``out`` when its process was killed:
    a half-written new one, or the old ``out`` moved aside mid-swap."""
    out = Path(out)
    return stale_folders(out.parent, _partial_prefix(out)) + stale_folders(
        out.parent, _aside_prefix(out)
    )


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove :func:`stale_partials` of ``out``; an old ``out`` moved aside by a swap that was
    killed halfway is put back instead when ``out`` is missing. The paths handled."""
    out = Path(out)
    stale = stale_partials(out)
    for path in stale:
        if path.name.startswith(_aside_prefix(out)) and not os.path.lexists(out):
            os.rename(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)
    return stale


def exchange_directories(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``):
    every reader sees one or the other, never neither. False, with nothing changed, where the
    C library, kernel or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    a_raw, b_raw = os.fsencode(a), os.fsencode(b)
    if renameat2(_AT_FDCWD, a_raw, _AT_FDCWD, b_raw, _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; the old ``out``, if any, ends at ``tmp`` for the caller to remove.

    An exchange is one atomic step. Where it is unavailable, the old ``out`` is renamed aside
    first: for the instant between the two renames ``out`` is absent, and a crash there
    leaves it whole at ``.NAME-old-PID@HOST-XXXX``, which the next replacement puts back."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif not exchange_directories(tmp, out):
        aside = owned_tempdir(out.parent, _aside_prefix(out))
        os.rename(out, aside)  # onto the empty folder just made
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(aside, out)
            raise
        os.rename(aside, tmp)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def replaced_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; when the block succeeds it replaces ``out``
    (whatever was there), otherwise it is removed and ``out`` is left as it was.

    ``out`` is never half written nor, where Linux's ``renameat2`` exchange works, ever absent:
    the old folder stays readable until the new one is swapped in by one atomic exchange of
    names, then it is removed (see :func:`_swap_in` for the fallback). Stale temporary folders
    from killed processes are removed first (:func:`remove_stale_partials`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = owned_tempdir(out.parent, _partial_prefix(out))
    try:
        yield tmp
        _swap_in(tmp, out)
    finally:
        _remove(tmp)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json_atomically(path: Path, payload: dict) -> None:
    """:func:`write_text_atomically` of ``payload`` as indented JSON."""
    write_text_atomically(path, json.dumps(payload, indent=2, default=str))
