"""A save reported completed was durable first: checked on the syscalls themselves.

The daemon runs under strace; the order of its pwritev/pwrite64/fdatasync calls on the
save file and of the socket write that first says "completed" is then checked against
format.md's rule: page data written (pwritev), channel fds fdatasync'ed, bitmaps written
on the main fd and fdatasync'ed, and only then the RAM end section and EOF written and
the main fd fdatasync'ed again; only then `completed`. A file reads as complete once its
end section is there, so that must never reach the disk before the bitmaps do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from migd.migration.mapped_ram import format

from .conftest import RawClient, fill_random

MiB = 1 << 20
TRACED = "pwrite64,pwritev,pwritev2,fdatasync,fsync,sendto,sendmsg,write"

# `PID name(FD<what>, args...) = RET`, or `... <unfinished ...>` and later
# `PID <... name resumed>...) = RET`; RET may be followed by ` ERRNO (text)`.
_CALL = re.compile(r"^(\d+) +(\w+)\((\d+)<([^>]*)>(.*)$")
_RESUMED = re.compile(r"^(\d+) +<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"\) += (-?\d+)(?: \w+ \([^()]*\))?$")
_UNFINISHED = " <unfinished ...>"
_POSITIONAL = ("pwrite64", "pwritev", "pwritev2")


@dataclass
class Call:
    name: str
    fd: int
    what: str  # the path, or socket:[inode], that strace -y shows for the fd
    args: str  # the arguments after the fd, as strace prints them
    start: int  # line numbers: strace sees a call's exit before any later call's entry
    end: int = -1
    result: int | None = None

    @property
    def offset(self) -> int | None:
        """The file offset of a positional write: its last argument."""
        if self.name not in _POSITIONAL:
            return None
        return int(self.args.rsplit(", ", 1)[-1])


def _split_result(text: str) -> tuple[str, int | None]:
    m = _RESULT.search(text)
    return (text[: m.start()], int(m.group(1))) if m else (text, None)


def parse_strace(text: str) -> list[Call]:
    calls: list[Call] = []
    pending: dict[int, Call] = {}
    for number, line in enumerate(text.splitlines()):
        if m := _RESUMED.match(line):
            call = pending.pop(int(m.group(1)), None)
            if call is not None:
                call.end = number
                call.result = _split_result(m.group(3))[1]
            continue
        if not (m := _CALL.match(line)):
            continue
        pid, name, fd, what, rest = m.groups()
        if rest.endswith(_UNFINISHED):
            call = Call(name, int(fd), what, rest[: -len(_UNFINISHED)], number)
            pending[int(pid)] = call
        else:
            args, result = _split_result(rest)
            call = Call(name, int(fd), what, args, number, number, result)
        calls.append(call)
    return calls


def check_durable_order(calls: list[Call], path: str, layout: format.SaveLayout) -> None:
    """Assert format.md's durability order for one completed save of `path`."""
    on_file = [c for c in calls if c.what == path]
    heads = [c for c in on_file if c.name == "pwrite64" and c.offset == layout.offset]
    assert len(heads) == 1, "the stream head is written once, on the main fd"
    main_fd = heads[0].fd
    pages = [c for c in on_file if c.name in ("pwritev", "pwritev2")]
    assert pages, "no page data was written with pwritev"
    assert all(c.result is not None and c.result > 0 for c in pages), "a page write failed"
    channel_fds = {c.fd for c in pages}
    syncs = [c for c in on_file if c.name in ("fdatasync", "fsync")]
    assert all(c.result == 0 for c in syncs)
    bitmap_at = {b.bitmap_offset for b in layout.blocks}
    bitmaps = [c for c in on_file if c.name == "pwrite64" and c.offset in bitmap_at]
    ends = [c for c in on_file if c.name == "pwrite64" and c.offset == layout.end_offset]
    assert {c.fd for c in bitmaps + ends} == {main_fd}
    assert len(bitmaps) == len(layout.blocks) and len(ends) == 1
    end = ends[0]

    first_page, last_page = min(c.start for c in pages), max(c.end for c in pages)
    channel_syncs = []
    for fd in sorted(channel_fds):
        after = [c for c in syncs if c.fd == fd and c.start > first_page]
        assert after, f"channel fd {fd} was never synced"
        channel_syncs.append(after[0])
        assert last_page < after[0].start, f"fd {fd} synced before every page was written"
    synced = max(c.end for c in channel_syncs)
    for c in [*bitmaps, end]:
        assert c.start > synced, f"{c.name} at {c.offset} began before the pages were synced"
    bitmap_syncs = [c for c in syncs if c.fd == main_fd and c.start > max(b.end for b in bitmaps)]
    assert bitmap_syncs and bitmap_syncs[0].end < end.start, (
        "the end section was written before the bitmaps were synced"
    )
    main_syncs = [c for c in syncs if c.fd == main_fd and c.start > end.end]
    assert main_syncs, "the main fd was not synced after the end section"
    final_sync = main_syncs[0]
    late = [c for c in on_file if c.name != "fdatasync" and c.start > final_sync.start]
    assert not late, f"writes after the final sync: {late}"

    said = [
        c
        for c in calls
        if c.what.startswith("socket:")
        and c.name in ("sendto", "sendmsg", "write")
        and "completed" in c.args
    ]
    assert said, "no client was told the save completed"
    assert said[0].start > final_sync.end, "'completed' was sent before the final fdatasync"


def _strace() -> str:
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    probe = subprocess.run([strace, "-qq", "-e", "trace=none", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode().strip()}")
    return strace


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.fixture
def traced_daemon(short_dir: Path):
    """A subprocess migd under `strace -f -y`; yields (socket path, a function -> log)."""
    yield from _traced_migd(short_dir, TRACED)


def _traced_migd(short_dir: Path, traced: str):
    """traced_daemon's body: migd under strace, tracing the system calls `traced` names."""
    strace = _strace()
    sock, log = short_dir / "qmp.sock", short_dir / "strace.log"
    with open(short_dir / "migd.err", "wb") as err:
        proc = subprocess.Popen(
            [
                strace, "-f", "-qq", "-y", "-s", "256", "-e", f"trace={traced}",
                "-e", "signal=none", "-o", str(log),
                sys.executable, "-m", "migd", "serve", "--socket", str(sock),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, (short_dir / "migd.err").read_text()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            break
        except OSError:
            assert time.monotonic() < deadline, "traced migd did not start"
            time.sleep(0.05)
        finally:
            probe.close()

    def finish() -> str:
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGTERM)
        proc.wait(30)
        return log.read_text(errors="replace")

    try:
        yield sock, finish
    finally:
        if proc.poll() is None:
            for pid in _children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("multifd", "direct_io", "offset"),
    [(True, True, None), (False, False, None), (True, False, 0x11921)],
    ids=["multifd-direct-io", "main-channel-only", "multifd-at-an-offset"],
)
def test_completed_is_announced_only_after_pages_and_metadata_are_fdatasynced(
    traced_daemon, shm, short_dir, multifd, direct_io, offset
):
    sock, finish = traced_daemon
    size = 16 * MiB
    data = bytearray(fill_random(shm / "ram0", size, seed=8))
    data[4 * MiB : 8 * MiB] = bytes(4 * MiB)  # a zero run the save skips
    (shm / "ram0").write_bytes(data)
    (shm / "ram1").write_bytes(bytes(MiB - 4096) + b"\x01" * 4096)
    target = short_dir / "save.img"
    client = RawClient(sock).negotiate()
    try:
        for id, path, length in (("ram0", "ram0", size), ("ram1", "ram1", MiB)):
            add = {"qom-type": "memory-backend-file", "id": id, "size": length}
            assert "return" in client.execute("object-add", {**add, "mem-path": str(shm / path)})
        caps = [
            {"capability": "mapped-ram", "state": True},
            {"capability": "multifd", "state": multifd},
            {"capability": "events", "state": True},
        ]
        assert "return" in client.execute("migrate-set-capabilities", {"capabilities": caps})
        params = {"multifd-channels": 3, "direct-io": direct_io}
        assert "return" in client.execute("migrate-set-parameters", params)
        uri = f"file:{target}" + (f",offset={offset}" if offset is not None else "")
        assert "return" in client.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + 60
        while (status := client.execute("query-migrate")["return"]["status"]) != "completed":
            assert status in ("setup", "active"), status
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        client.close()
    calls = parse_strace(finish())

    layout = format.plan_save([("ram0", size), ("ram1", MiB)], offset or 0)
    check_durable_order(calls, str(target), layout)
    syncs = [c for c in calls if c.what == str(target) and c.name == "fdatasync"]
    assert len(syncs) == (3 if multifd else 1) + 2  # channels, bitmaps, end section


# --- the checker itself must catch a wrong order -------------------------------------------

_GOOD_LOG = """\
10 pwrite64(5</s.img>, "QEVM", 200, 0) = 200
10 pwrite64(5</s.img>, "\\0\\0", 13, 2101248) = 13
11 pwritev(6</s.img>, [{iov_base="x", iov_len=4096}], 1, 1048576 <unfinished ...>
12 pwritev(7</s.img>, [{iov_base="y", iov_len=4096}], 1, 1052672) = 4096
11 <... pwritev resumed>) = 4096
13 fdatasync(6</s.img>) = 0
13 fdatasync(7</s.img>) = 0
13 pwrite64(5</s.img>, "\\3", 8, 84) = 8
13 fdatasync(5</s.img>) = 0
13 pwrite64(5</s.img>, "\\3\\0", 33, 2101261) = 33
13 fdatasync(5</s.img>) = 0
10 sendto(8<socket:[99]>, "{\\"data\\": {\\"status\\": \\"completed\\"}}", 60, 0, NULL, 0) = 60
"""
_LAYOUT = format.SaveLayout(
    0,
    (format.BlockLayout("ram0", 2 * 4096, 56, 84, 1048576),),
    (),
    2101261,
)


def test_the_order_checker_accepts_the_documented_order():
    check_durable_order(parse_strace(_GOOD_LOG), "/s.img", _LAYOUT)


@pytest.mark.parametrize(
    ("swap", "message"),
    [
        ((4, 5), "synced before every page"),  # a channel sync before the last page write
        ((6, 7), "began before the pages were synced"),  # bitmap before a channel sync
        ((8, 9), "written before the bitmaps were synced"),  # end section before that sync
        ((10, 11), "before the final fdatasync"),  # completed before the final sync
        ((9, 10), "not synced after the end section"),  # final sync before the end section
        (8, "written before the bitmaps were synced"),  # one sync after both (the old order)
    ],
)
def test_the_order_checker_rejects_each_wrong_order(swap, message):
    lines = _GOOD_LOG.splitlines()
    if isinstance(swap, int):
        del lines[swap]
    else:
        a, b = swap
        lines[a], lines[b] = lines[b], lines[a]
    with pytest.raises(AssertionError, match=message):
        check_durable_order(parse_strace("\n".join(lines)), "/s.img", _LAYOUT)



# --- the partial-restore mark is durable before a restore changes memory ------------------

MARK_TRACED = "fsetxattr,fsync,preadv,preadv2,pread64,pwrite64,pwritev,pwritev2,fallocate"
_READS = ("preadv", "preadv2", "pread64")


@pytest.fixture
def mark_traced_daemon(short_dir: Path):
    """traced_daemon, tracing what marks a memory file and what changes it."""
    yield from _traced_migd(short_dir, MARK_TRACED)


def _until_final(client: RawClient) -> str:
    """query-migrate until the job leaves setup and active (a bounded busy wait)."""
    deadline = time.monotonic() + 60
    while (status := client.execute("query-migrate")["return"]["status"]) in ("setup", "active"):
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def test_the_partial_mark_is_fsynced_before_a_restore_changes_memory(
    mark_traced_daemon, shm, short_dir
):
    """The mark (user.migd.partial) says a memory file holds a mix of old and restored
    pages; it is inode metadata, which the page cache may hold back: unless it is on disk
    before the first page lands, a crash can leave a half-restored file with no mark, and
    the next object-add takes it for whole. So fsetxattr, then fsync of the memory file,
    then the first read of page data into the memory (or write into its file)."""
    probe = shm / "xattr-probe"
    probe.touch()
    try:
        os.setxattr(probe, "user.migd.probe", b"1")
    except OSError as exc:
        pytest.skip(f"no user xattrs on /dev/shm here (the mark is a sidecar): {exc.strerror}")
    sock, finish = mark_traced_daemon
    size = 4 * MiB
    data = fill_random(shm / "ram0", size, seed=3)
    saved, restored, memory = short_dir / "save.img", short_dir / "restore.img", shm / "dst"
    client = RawClient(sock).negotiate()
    try:
        add = {"qom-type": "memory-backend-file", "id": "ram0", "size": size}
        client.ok("object-add", {**add, "mem-path": str(shm / "ram0")})
        caps = [
            {"capability": "mapped-ram", "state": True},
            {"capability": "multifd", "state": True},
        ]
        client.ok("migrate-set-capabilities", {"capabilities": caps})
        client.ok("migrate-set-parameters", {"multifd-channels": 2})
        client.ok("migrate", {"uri": f"file:{saved}"})
        assert _until_final(client) == "completed"
        # A copy under another name: every call on it in the trace is the restore's.
        shutil.copyfile(saved, restored)
        client.ok("object-del", {"id": "ram0"})
        client.ok("object-add", {**add, "mem-path": str(memory)})
        client.ok("migrate-incoming", {"uri": f"file:{restored}"})
        assert _until_final(client) == "completed"
    finally:
        client.close()
    calls = parse_strace(finish())
    assert memory.read_bytes() == data

    marks = [
        c
        for c in calls
        if c.name == "fsetxattr" and c.what == str(memory) and '"user.migd.partial"' in c.args
    ]
    assert len(marks) == 1 and marks[0].result == 0, marks
    mark = marks[0]
    reads = [c for c in calls if c.what == str(restored) and c.name in _READS]
    main_fd = reads[0].fd  # the restore's first read: the stream head, on the main fd
    channel_reads = [c for c in reads if c.fd != main_fd]  # page data only
    assert channel_reads, "no page data was read through the multifd channels"
    changes = [
        c
        for c in calls
        if c.start > mark.end
        and (
            (c.what == str(restored) and c.name in _READS)
            or (c.what == str(memory) and c.name in ("pwrite64", "pwritev", "pwritev2",
                                                     "fallocate"))
        )
    ]  # fmt: skip
    assert changes, "nothing read into the memory after the mark"
    syncs = [c for c in calls if c.name == "fsync" and c.what == str(memory) and c.start > mark.end]
    assert syncs and syncs[0].result == 0, "the memory file was never fsynced after the mark"
    assert syncs[0].end < changes[0].start, (
        f"{changes[0].name} changed the memory before the mark was fsynced"
    )
    assert all(c.start > syncs[0].end for c in channel_reads), "pages read before the mark"


def test_a_save_to_a_new_file_syncs_its_directory_before_completed(traced_daemon, shm, short_dir):
    """fdatasync makes a file's data durable, not its name: POSIX asks for an fsync of the
    directory too. A save that created its file and said `completed` before that could be
    gone after a power cut, name and all (before: the directory was never synced)."""
    sock, finish = traced_daemon
    fill_random(shm / "ram0", 4 * MiB, seed=9)
    (short_dir / "saves").mkdir()
    target = short_dir / "saves" / "new.img"
    client = RawClient(sock).negotiate()
    try:
        add = {"qom-type": "memory-backend-file", "id": "ram0", "size": 4 * MiB}
        assert "return" in client.execute("object-add", {**add, "mem-path": str(shm / "ram0")})
        caps = [{"capability": c, "state": True} for c in ("mapped-ram", "multifd", "events")]
        assert "return" in client.execute("migrate-set-capabilities", {"capabilities": caps})
        assert "return" in client.execute("migrate", {"uri": f"file:{target}"})
        deadline = time.monotonic() + 60
        while (status := client.execute("query-migrate")["return"]["status"]) != "completed":
            assert status in ("setup", "active"), status
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        client.close()
    calls = parse_strace(finish())

    final_sync = [c for c in calls if c.what == str(target) and c.name == "fdatasync"][-1]
    dir_syncs = [
        c for c in calls
        if c.name in ("fsync", "fdatasync") and c.what == str(target.parent) and c.result == 0
    ]  # fmt: skip
    said = [
        c for c in calls
        if c.what.startswith("socket:") and c.name in ("sendto", "sendmsg", "write")
        and "completed" in c.args
    ]  # fmt: skip
    assert dir_syncs, "the new save file's directory was never synced"
    assert said and final_sync.end < said[0].start and dir_syncs[0].end < said[0].start
