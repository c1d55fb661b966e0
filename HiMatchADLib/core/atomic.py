"""Atomic files: write to a temporary name beside the target, verify, rename; stale temporaries of dead processes removed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

#: A temporary file of :func:`atomic_path` older than this is an orphan (no single write takes so
#: long) and is removed by the next write into its folder, whoever left it.
STALE_TEMP_SECONDS = 6 * 3600


_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


# ".<final name>.<pid>@<host>.<random>.tmp<suffix>" (and ".<final name>.<random>.tmp<suffix>" from
# earlier versions, which carry no owner).
_TEMP_RE = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]*))?\.[a-z0-9_]{8}\.tmp(?P<suffix>\.[A-Za-z0-9.]+)?$")

_cleaned_folders: set = set()
#: Suffixes a temporary keeps, lower-cased (a writer picks the format by it; ``.nii.gz`` is two).
_KEPT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _umask() -> int:
    try:  # without changing the process's umask (other threads may be creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (always True on Windows, where probing kills)."""
    if os.name == "nt":  # os.kill would terminate the process there; rely on the age rule
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, now: Optional[float] = None) -> list[Path]:
    """Remove temporary files of :func:`atomic_path` in ``folder`` left by a killed process.

    A temporary is stale when its owner process (recorded in its name) is gone from this host, or
    when it is older than :data:`STALE_TEMP_SECONDS`. Returns the removed paths.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP_RE.match(e.name)
        if m is None or not m.group("name").lower().endswith((m.group("suffix") or "").lower()):
            continue  # not named as atomic_path names its temporaries
        try:
            st = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = m.group("pid")
            dead = pid is not None and m.group("host") == _HOST and int(pid) != os.getpid() and not process_alive(int(pid))
            if dead or now - st.st_mtime > STALE_TEMP_SECONDS:
                os.unlink(e.path)
                removed.append(Path(e.path))
        except OSError:
            continue
    return removed


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (same extension); rename it to ``final`` on success.

    On any error the temporary file is removed, so a reader never sees a half-written output. The
    final file gets the permissions a plain ``open()`` would give it (those of the file it replaces,
    else ``0666`` less the umask), not the private ``0600`` of a temporary file. The first write
    into a folder removes the stale temporaries of killed runs there
    (:func:`remove_stale_temporaries`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.abspath(final.parent)
    if folder not in _cleaned_folders:
        remove_stale_temporaries(folder)
        _cleaned_folders.add(folder)
    name = final.name
    suffix = next((s for s in _KEPT_SUFFIXES if name.lower().endswith(s)), final.suffix)
    owner = f".{os.getpid()}@{_HOST}."
    room = name_max(final.parent) - len(os.fsencode(f".{owner}xxxxxxxx.tmp{suffix}"))
    if len(os.fsencode(name)) > room:  # a name that fits must fit as a temporary too: shortened, with a hash
        stem = os.fsencode(name[: len(name) - len(suffix)] if suffix else name)
        tag = "~" + hashlib.blake2b(os.fsencode(name), digest_size=4).hexdigest()
        keep = max(1, room - len(os.fsencode(suffix)) - len(tag))
        name = stem[:keep].decode("utf-8", "ignore") + tag + suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{name}{owner}", suffix=".tmp" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            mode = stat.S_IMODE(final.stat().st_mode)
        except OSError:
            mode = 0o666 & ~_umask()
        yield tmp_path
        os.chmod(tmp_path, mode)
        try:
            os.replace(tmp_path, final)
        except OSError as exc:  # name the user's path, not the temporary one
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def name_max(folder: str | os.PathLike) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing parent) allows."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def folder_write_problem(folder: str | os.PathLike) -> Optional[str]:
    """Why files cannot be written in ``folder`` (when it does not exist yet: why it cannot be created
    in its nearest existing parent), or None when they can. Probed with a temporary file removed at
    once: permissions alone do not tell (root ignores them; a read-only mount does not show in them)."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".himatchad-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        where = "" if probe == folder else f" (in its parent {probe})"
        return f"{exc.strerror or exc}{where}"
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
