"""Careful file handling shared by every part of dupstudio that writes or parses user files.

* :func:`atomic_write_bytes` is the one way files are written: a temporary sibling named with
  the writer's PID, fsync, rename over the target. Symlinks are followed (the real file is
  replaced, the link stays); a new file gets mode ``0666 & ~umask`` and a replaced one keeps
  its mode. OS errors (disk full, no permission, a parent that is a file) become one-line
  :class:`DupstudioError` messages and the previous file stays intact.
* Temporary names carry the PID (``.NAME.tmp-PID-XXXXXXXX``, ``.NAME.partial-PID-...``,
  ``.NAME.old-PID-...``), so :func:`remove_stale` can delete what a killed run left behind
  without touching a live run's files.
* :func:`check_int` / :func:`read_safetensors_header` check counts and sizes read from files
  against sane limits and the file's own size before anything is allocated.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Union

from dupstudio.core.jobs import DupstudioError

#: hidden temporary names written by dupstudio: ``.NAME.KIND-PID-HEX8`` plus an optional suffix
TEMP_RE = re.compile(r"^\..+\.(tmp|partial|old)-(\d+)-[0-9a-f]{8}(\.[A-Za-z0-9]+)?$")

Data = Union[bytes, Callable[[BinaryIO], None]]


# --------------------------------------------------------------------------- OS errors
def _file_ancestor(path: Path) -> Optional[Path]:
    """The first existing ancestor of ``path`` that is not a folder (None if there is none)."""
    for p in path.parents:
        if p.exists():
            return None if p.is_dir() else p
    return None


def os_error_message(path: Path, e: OSError, action: str = "write") -> str:
    """``PATH: cannot ACTION ...`` in one line, naming a full disk or a parent that is a file."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{path}: cannot {action}: the disk is full ({e.strerror})"
    blocker = _file_ancestor(Path(path)) if e.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        return f"{path}: cannot {action}: {blocker} is a file, not a folder"
    return f"{path}: cannot {action} ({e.strerror or e})"


@contextmanager
def user_io(path, action: str = "write"):
    """Turn an OSError inside the block into a one-line DupstudioError about ``path``."""
    try:
        yield
    except OSError as e:
        raise DupstudioError(os_error_message(Path(path), e, action)) from e


# --------------------------------------------------------------------------- temporary names
def temp_sibling(target: Path, kind: str = "tmp", suffix: str = "") -> Path:
    """A hidden sibling ``.NAME.KIND-PID-HEX8SUFFIX`` of ``target`` (not created)."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def make_temp_dir(target: Path, kind: str = "partial") -> Path:
    """Create a hidden sibling folder of ``target`` (mode from the umask, unlike mkdtemp's 0700)."""
    target = Path(target)
    with user_io(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            p = temp_sibling(target, kind)
            try:
                p.mkdir()
                return p
            except FileExistsError:
                continue
    raise DupstudioError(f"{target.parent}: cannot create a temporary folder")


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running on this machine (a zombie, exited but not yet reaped by its
    parent, counts as gone)? Unjudgeable cases count as alive: what they hold is kept."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or a number we cannot judge): keep
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    return True


_swept: set = set()


def remove_stale(folder: Path, *, report: bool = True) -> list:
    """Delete dupstudio temporary files/folders in ``folder`` whose writer's PID is gone.

    Each folder is looked at once per process; what was removed is said once on stderr."""
    folder = Path(folder)
    key = str(folder.absolute())
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = TEMP_RE.match(entry.name)
        if m is None or pid_alive(int(m.group(2))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            continue
    if removed and report:
        print(f"dupstudio: removed {len(removed)} temporary file(s) left in {folder} by "
              f"interrupted runs: {', '.join(sorted(removed))}", file=sys.stderr, flush=True)
    return removed


# --------------------------------------------------------------------------- atomic writes
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(tmp: Path, data: Data) -> None:
    # O_EXCL with mode 0666: the kernel applies the umask, as for any newly created file
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            data(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path, data: Data, *, final_name: Optional[Callable[[Path], str]] = None) -> Path:
    """Write ``data`` (bytes, or a function writing into the binary file object it is given)
    to ``path`` atomically; return the path written.

    A symlink is followed and its real target replaced. ``final_name(tmp)`` may pick the
    file name in the same folder after the content is written (content-addressed files).
    """
    real = Path(os.path.realpath(Path(path).expanduser()))
    tmp = None
    with user_io(path):
        real.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(real.parent)
        tmp = temp_sibling(real, "tmp", real.suffix)
        try:
            _write_temp(tmp, data)
            if final_name is not None:
                real = real.parent / final_name(tmp)
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(real).st_mode))  # a replaced file keeps its mode
            except FileNotFoundError:
                pass
            os.replace(tmp, real)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(real.parent)
    return real


# --------------------------------------------------------------------------- limits
def check_int(value, where: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], else DupstudioError naming ``where`` (bools and
    non-integral values are refused, with their type in the message)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DupstudioError(f"{where}: expected an integer, got {describe_value(value)}")
    if not lo <= value <= hi:
        raise DupstudioError(f"{where}: {value} is out of range ({lo}-{hi})")
    return value


def describe_value(v) -> str:
    """How a JSON/GGUF value reads in a message: ``the string '2'``, ``null``, ``a list``."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, str):
        return f"the string {v[:40]!r}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


#: bytes per element of each safetensors dtype
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2,
                      "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8,
                      "F64": 8, "C64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own reference reader refuses larger headers
MAX_DIMS = 8


def read_safetensors_header(path) -> dict:
    """The JSON header of a ``.safetensors`` file ({name: {dtype, shape, data_offsets}}), every
    entry checked: known dtype, at most 8 non-negative dims, byte range inside the file and
    matching the shape. Raises DupstudioError naming the file and the first problem."""
    path = Path(path)
    with user_io(path, "read"):
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DupstudioError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise DupstudioError(f"{path}: corrupt safetensors file (header of {n} bytes in a "
                                     f"file of {size})")
            raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise DupstudioError(f"{path}: corrupt safetensors header ({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise DupstudioError(f"{path}: corrupt safetensors header (not an object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            # mlx writes null when there is none
            if info is not None and (not isinstance(info, dict)
                                     or not all(isinstance(v, str) for v in info.values())):
                raise DupstudioError(f"{path}: corrupt safetensors header (__metadata__ must map "
                                     f"names to strings)")
            continue
        _check_tensor_entry(path, name, info, data)
    return header


def _check_tensor_entry(path: Path, name: str, info, data_bytes: int) -> None:
    where = f"{path}: tensor {name[:80]!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise DupstudioError(f"{where}: corrupt entry (needs exactly dtype, shape, data_offsets)")
    width = SAFETENSORS_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if width is None:
        raise DupstudioError(f"{where}: unknown dtype {describe_value(info['dtype'])}")
    shape, offs = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise DupstudioError(f"{where}: the shape must be a list of at most {MAX_DIMS} sizes")
    count = 1
    for d in shape:
        count *= check_int(d, f"{where}: shape", 0, data_bytes)
        count = min(count, data_bytes + 1)  # past the file size already: no need to grow
    if not isinstance(offs, list) or len(offs) != 2:
        raise DupstudioError(f"{where}: data_offsets must be [begin, end]")
    begin = check_int(offs[0], f"{where}: data_offsets", 0, 1 << 62)
    end = check_int(offs[1], f"{where}: data_offsets", begin, 1 << 62)
    if end > data_bytes:
        raise DupstudioError(f"{where}: its data ends at byte {end} of the data section but the "
                             f"file holds only {data_bytes} (truncated?)")
    if end - begin != count * width:
        raise DupstudioError(f"{where}: {end - begin} bytes of data for shape {shape} "
                             f"({info['dtype']}); the file is corrupt or truncated")
