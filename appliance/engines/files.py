"""Reading an engine's files (model, manifest, golden pair, DLA plan) without ever blocking or overreading.

The watched directory takes whatever is copied into it: a FIFO, a link to a
device or an oversized file must be refused before the first read.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Optional

from appliance.engines.errors import EngineError


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes a file may have, and the setting that says so (for the message)."""

    max_bytes: int
    name: str


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _check_regular(path: str, info: os.stat_result, limit: Optional[SizeLimit]) -> int:
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a plain file")
        raise EngineError("{}: {}, not a regular file; expected a file that can be read once".format(path, kind))
    if limit is not None and info.st_size > limit.max_bytes:
        raise EngineError("{}: {} bytes, more than {}".format(path, info.st_size, limit.name))
    return info.st_size


def regular_file_size(path: str, limit: Optional[SizeLimit] = None) -> int:
    """The size of ``path``, which must be a regular file (a symlink to one is followed) within ``limit``.

    Checked before anything reads the file: a FIFO would block, a device (a link
    to /dev/zero) never ends, and an oversized file would be read only to be
    refused. Raises EngineError for those, OSError when it cannot be looked at.
    """
    return _check_regular(path, os.stat(path), limit)


def open_regular_file(path: str, limit: Optional[SizeLimit] = None) -> BinaryIO:
    """Open ``path`` for reading after :func:`regular_file_size`'s checks, without ever blocking.

    O_NONBLOCK makes the open of a FIFO put in place after the stat return at
    once, and the fstat of what was opened then refuses it before any read.
    """
    regular_file_size(path, limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        _check_regular(path, os.fstat(fd), limit)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str, limit: Optional[SizeLimit] = None) -> str:
    """The hex sha256 of a regular file within ``limit`` (EngineError otherwise, see :func:`open_regular_file`)."""
    digest = hashlib.sha256()
    with open_regular_file(path, limit) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
