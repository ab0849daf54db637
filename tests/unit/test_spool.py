from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lightloop.store.spool import Spool


def test_batches_replay_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, segment_bytes=20, fsync=False)
    for i in range(5):
        spool.append(json.dumps({"n": i}).encode())
    assert len(spool.segments()) >= 2
    seen = []
    for segment, number, line in spool.replay():
        seen.append(json.loads(line)["n"])
        spool.committed(segment, number)
    assert seen == [0, 1, 2, 3, 4]
    assert not spool.has_pending() and spool.pending_bytes() == 0


def test_an_interrupted_replay_resumes_where_it_stopped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    for i in range(4):
        spool.append(str(i).encode())
    replay = spool.replay()
    for _ in range(2):
        segment, number, _line = next(replay)
        spool.committed(segment, number)
    # The database went away: the rest stays; appends meanwhile go to a new segment.
    spool.append(b"4")
    rest = [line for _s, _n, line in spool.replay()]
    assert rest == [b"2", b"3", b"4"]


def test_a_new_process_replays_the_whole_segment_again(tmp_path: Path) -> None:
    # Progress within a segment lives in memory only; after a crash the segment replays from its
    # start, and the writer's de-duplication absorbs the repeats.
    spool = Spool(tmp_path, fsync=False)
    spool.append(b"a")
    spool.append(b"b")
    segment, number, _ = next(spool.replay())
    spool.committed(segment, number)
    spool.close()
    assert [line for _s, _n, line in Spool(tmp_path).replay()] == [b"a", b"b"]


def test_a_torn_write_is_kept_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.append(b'{"ok": 1}')
    spool.close()
    with open(spool.segments()[0], "ab") as fh:
        fh.write(b'{"half": ')  # a crash in the middle of an append
    lines = [line for _s, _n, line in Spool(tmp_path).replay()]
    assert lines == [b'{"ok": 1}']
    rejected = [json.loads(x) for x in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert rejected == [{"reason": "torn write", "data": '{"half": '}]
    assert not spool.has_pending()


def test_a_failed_append_leaves_no_half_batch_for_the_next_one_to_join(tmp_path: Path) -> None:
    """A full disk (here a file size limit, which fails the write with EFBIG as ENOSPC would):
    the failed batch is cut off again, so a later batch appended once there is room lands whole
    instead of glued to half of the failed one."""
    script = f"""
import errno, resource
from pathlib import Path
from lightloop.store.spool import Spool
resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
spool = Spool(Path({str(tmp_path)!r}), fsync=False)
spool.append(b'"' + b"a" * 58 + b'"')
try:
    spool.append(b'"' + b"b" * 58 + b'"')
except OSError as exc:
    assert exc.errno == errno.EFBIG, exc
else:
    raise AssertionError("the second append should not fit")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
spool.append(b'"c"')
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    lines = [line for _segment, _number, line in Spool(tmp_path, fsync=False).replay()]
    assert lines == [b'"' + b"a" * 58 + b'"', b'"c"']
    assert not (tmp_path / "rejected.jsonl").exists()
