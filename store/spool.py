"""An append-only on-disk spool of batches the database could not take, replayed in order.

Each batch is one line of JSON in a segment file (`000000000001.jsonl`, ...). A segment is
deleted only after every batch in it was committed, so a crash during replay replays that
segment again; the writer's de-duplication on primary keys makes that harmless. A torn last line
(a crash while appending) is moved to `rejected.jsonl` instead of blocking the replay.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024


class Spool:
    def __init__(self, directory: Path, *, segment_bytes: int = SEGMENT_BYTES, fsync: bool = True) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.dir.mkdir(parents=True, exist_ok=True)
        self._current: BinaryIO | None = None
        self._current_path: Path | None = None
        # Batches of a segment already committed during this process's replay.
        self._done: dict[Path, int] = {}

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("[0-9]*.jsonl"), key=lambda p: p.name)

    def has_pending(self) -> bool:
        return bool(self.segments())

    def pending_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.segments())

    def append(self, line: bytes) -> None:
        """Write one batch durably (fsync) before the writer forgets it. A write that fails (a
        full disk) is cut off again, so the segment never holds half a batch that a later,
        whole one would be glued to; the caller keeps the batch and tries again."""
        assert b"\n" not in line
        handle = self._handle()
        start = os.lseek(handle.fileno(), 0, os.SEEK_END)
        try:
            view = memoryview(line + b"\n")
            while view:
                written = handle.write(view)
                if not written:
                    raise OSError(f"the spool took no bytes of a batch ({len(view)} left)")
                view = view[written:]
            if self.fsync:
                os.fsync(handle.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), start)
            # A new segment next time: should the cut have failed, the torn tail stays this
            # segment's last line, which replay sets aside; an empty segment is not "pending".
            path = self._current_path
            self._close_current()
            with contextlib.suppress(OSError):
                if path is not None and path.stat().st_size == 0:
                    path.unlink()
            raise
        if handle.tell() >= self.segment_bytes:
            self._close_current()

    def replay(self) -> Iterator[tuple[Path, int, bytes]]:
        """Yield (segment, line number, batch) in order; call `committed` after each one lands."""
        self._close_current()
        for segment in self.segments():
            with open(segment, "rb") as fh:
                data = fh.read()
            lines = data.split(b"\n")
            torn = lines.pop()  # b"" when the file ends with a newline, as every whole write does
            start = self._done.get(segment, 0)
            for number, line in enumerate(lines[start:], start=start):
                yield segment, number, line
            if torn:
                log.error(
                    "spool segment %s ends in a torn write (%d bytes); kept in rejected.jsonl",
                    segment,
                    len(torn),
                )
                self.reject(torn, "torn write")
            segment.unlink()
            self._done.pop(segment, None)

    def committed(self, segment: Path, number: int) -> None:
        self._done[segment] = number + 1

    def reject(self, line: bytes, reason: str) -> None:
        """Keep a batch or row Postgres refuses for good, so that nothing is silently lost."""
        record = {"reason": reason, "data": line.decode("utf-8", errors="replace")}
        with open(self.dir / "rejected.jsonl", "ab") as fh:
            fh.write(json.dumps(record).encode() + b"\n")

    def close(self) -> None:
        self._close_current()

    def _handle(self) -> BinaryIO:
        if self._current is None:
            existing = self.segments()
            number = int(existing[-1].stem) + 1 if existing else 1
            self._current_path = self.dir / f"{number:012d}.jsonl"
            # Unbuffered: a failed write must not linger in a buffer and be written on close.
            self._current = open(self._current_path, "ab", buffering=0)  # noqa: SIM115 - kept open
        return self._current

    def _close_current(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
            self._current_path = None
