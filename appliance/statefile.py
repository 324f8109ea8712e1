"""The last published uniqueId, kept where the next start finds it (systemd's StateDirectory).

If pvapy crashes the process, a restart must say how many frames went missing.
The id lives in a small memory-mapped file: the pipeline stores each published
id into the mapping (a memory write, no system call), and the kernel keeps the
page when the process dies however it dies, so the record is exact to the frame
for a crash. Only a power cut can lose what was not yet written back; stop()
writes it back.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from typing import Dict, Optional

log = logging.getLogger(__name__)

FILE_NAME = "last-published"
_MAGIC = b"PTYCHON1"
_LAYOUT = struct.Struct("<8sq")  # magic, last published uniqueId (8-byte aligned: one store)
_ID_OFFSET = 8


def state_directory(configured: Optional[str]) -> Optional[str]:
    """publish.state_directory, else systemd's first StateDirectory, else None (no record kept)."""
    if configured:
        return configured
    from_systemd = os.environ.get("STATE_DIRECTORY", "")
    return from_systemd.split(":")[0] or None


class PublishedRecord:
    """The last published uniqueId, and the one a previous run left behind (``previous``)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self.previous = self._read_previous(fd)
            if self.previous is None:
                os.ftruncate(fd, 0)
                os.write(fd, _LAYOUT.pack(_MAGIC, -1))
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)

    def _read_previous(self, fd: int) -> Optional[int]:
        data = os.read(fd, _LAYOUT.size)
        if len(data) != _LAYOUT.size:
            if data:
                log.warning("%s: %d bytes, expected %d: ignoring it", self.path, len(data), _LAYOUT.size)
            return None
        magic, last_id = _LAYOUT.unpack(data)
        if magic != _MAGIC:
            log.warning("%s: not a ptychonn-edge record (magic %r): ignoring it", self.path, magic)
            return None
        return last_id if last_id >= 0 else None

    def note(self, unique_id: int) -> None:
        """Called by the pipeline thread after each publish: one 8-byte store into the mapping."""
        struct.pack_into("<q", self._map, _ID_OFFSET, unique_id)

    def flush(self) -> None:
        """Write the record back to disk (a crash never needs this; a power cut does)."""
        self._map.flush()


def restart_gap(previous_last_id: int, first_id: int) -> Dict[str, object]:
    """What a restart lost: frames between the last one published before it and the first one after.

    A first id at or below the previous last one is a new acquisition: what the old
    one lost at its end cannot be told (``frames_lost`` None).
    """
    lost = first_id - previous_last_id - 1 if first_id > previous_last_id else None
    return {"previous_last_id": previous_last_id, "first_id": first_id, "frames_lost": lost}
