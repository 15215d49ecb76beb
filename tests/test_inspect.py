"""`migd inspect FILE`: describes migd's and QEMU's save files without a daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import xxhash

from migd.migration.mapped_ram import format
from migd.tools.inspect import inspect_file

from .conftest import RawClient, parse_save
from .qemu_vm import QemuVM, requires_qemu

MiB = 1 << 20
PAGE = format.PAGE_SIZE


def migd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migd", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def data_with_zero_pages(size: int, seed: int, zero_mib: tuple[int, ...] = ()) -> bytes:
    """Random pages, every 7th page zero, and the whole MiBs `zero_mib` zero."""
    rng = np.random.default_rng(seed)
    pages = np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8).reshape(-1, PAGE)
    pages[::7] = 0
    per_mib = MiB // PAGE
    for mib in zero_mib:
        pages[mib * per_mib : (mib + 1) * per_mib] = 0
    return pages.tobytes()


def nonzero_pages(data: bytes) -> int:
    return int(np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE).any(axis=1).sum())


# What migd writes of the data above, worked out by hand (not from migd's constants, so a
# change of the skip rule shows): every page but those in zero runs of 1 MiB (256 pages)
# or more; the every-7th zero pages elsewhere are single pages, written inline.
# - ram0 (8 MiB, 2048 pages): MiBs 1-2 are pages 256-767, and pages 255 and 768 are not
#   multiples of 7: one 512-page run. MiB 7 is pages 1792-2047, page 1791 is not a
#   multiple of 7: a run of exactly 256 pages, skipped too. 2048 - 512 - 256 = 1280.
# - extra (4 MiB, 1024 pages): MiB 0 is pages 0-255 and page 256 is not a multiple of 7:
#   256 pages skipped. 1024 - 256 = 768.
# - the offset test's 4 MiB (seed 3, MiB 2 zero): pages 512-767, and page 511 = 7 * 73 is
#   zero as well: a 257-page run. 1024 - 257 = 767.
WRITTEN_PAGES = {"ram0": 1280, "extra": 768}
WRITTEN_PAGES_AT_OFFSET = 767


@pytest.fixture
def saved(daemon, shm, short_dir):
    """A migd save of two backends (ram0: 8 MiB, extra: 4 MiB) at offset 0: (path, data)."""
    data = {
        "ram0": data_with_zero_pages(8 * MiB, seed=1, zero_mib=(1, 2, 7)),
        "extra": data_with_zero_pages(4 * MiB, seed=2, zero_mib=(0,)),
    }
    client = RawClient(daemon.socket_path).negotiate()
    for name, content in data.items():
        (shm / name).write_bytes(content)
        reply = client.execute(
            "object-add",
            {
                "qom-type": "memory-backend-file",
                "id": name,
                "size": len(content),
                "mem-path": str(shm / name),
                "share": True,
            },
        )
        assert reply == {"return": {}}, reply
    client.close()
    path = short_dir / "save.img"
    result = migd("save", path, "--socket", daemon.socket_path, "--backend", "ram0",
                  "--backend", "extra")  # fmt: skip
    assert result.returncode == 0, result.stderr
    return path, data


def test_inspect_of_a_migd_save_shows_complete_blocks_and_page_counts(saved):
    path, data = saved
    result = migd("inspect", path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"{path}: complete mapped-ram save" in out
    assert "machine:       none" in out and "capabilities:  mapped-ram" in out
    assert "INCOMPLETE" not in out and "status:  complete" in out
    for name, content in data.items():
        pages = len(content) // PAGE
        present = WRITTEN_PAGES[name]
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [name])
        assert row[3:6] == [str(pages), str(present), str(pages - present)], row


def test_inspect_json_gives_the_layout_and_counts_that_match_the_written_memory(saved):
    path, data = saved
    result = migd("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["complete"] is True and info["problem"] is None
    assert info["machine"] == "none" and info["capabilities"] == ["mapped-ram"]
    blocks = {b["name"]: b for b in info["blocks"]}
    assert set(blocks) == set(data)
    for name, content in data.items():
        b = blocks[name]
        assert b["size"] == len(content) and b["pages"] == len(content) // PAGE
        assert b["present_pages"] == WRITTEN_PAGES[name]
        assert b["zero_pages"] == b["pages"] - b["present_pages"]
        assert b["pages_offset"] % MiB == 0 and b["bitmap_offset"] == b["header_offset"] + 28
        with open(path, "rb") as f:  # the region really holds the block's pages
            assert os.pread(f.fileno(), len(content), b["pages_offset"]) == content
    totals = info["totals"]
    assert totals["blocks"] == 2 and totals["ram"] == 12 * MiB
    assert totals["present_pages"] == 1280 + 768
    assert info["file_size"] == os.stat(path).st_size


def test_a_save_without_its_end_section_is_reported_incomplete_with_exit_1(saved):
    path, _ = saved
    last_end = max(b.end for b in inspect_file(path).blocks)
    # EOS + footer of the start section (13 bytes), then half of the 18-byte end section.
    os.truncate(path, last_end + 13 + 9)
    result = migd("inspect", path)
    assert result.returncode == 1
    assert f"{path}: INCOMPLETE mapped-ram save" in result.stdout
    assert "no RAM end section" in result.stdout
    assert "ram0" in result.stdout and "extra" in result.stdout  # still shows what it can


def test_a_file_cut_short_in_a_block_region_is_incomplete_and_still_lists_its_blocks(saved):
    path, _ = saved
    first = inspect_file(path).blocks[0]
    os.truncate(path, first.pages_offset + 5 * MiB)
    result = migd("inspect", path)
    assert result.returncode == 1
    assert "INCOMPLETE" in result.stdout and "cut short" in result.stdout
    assert first.name in result.stdout
    result = migd("inspect", path, "--json")
    assert result.returncode == 1
    info = json.loads(result.stdout)
    assert info["complete"] is False and info["truncated"] is True
    assert [b["name"] for b in info["blocks"]] == [first.name]
    assert "incomplete" in result.stderr


def test_a_tiny_file_cut_short_that_claims_huge_blocks_is_inspected_at_once(short_dir):
    """A 4 KiB file whose block claims 2^58 bytes: inspect walked the 8 TiB bitmap the
    claim implies, zeros padded past the file's end, for hours (red-team, session 14)."""
    layout = format.plan_save([("ram0", 1 << 58)])
    at, head = layout.head_writes[0]
    path = short_dir / "huge.sav"
    path.write_bytes(bytes(at) + head + bytes(4096 - at - len(head)))
    result = migd("inspect", str(path), "--json", timeout=60)  # hours before
    assert result.returncode == 1, result.stderr
    info = json.loads(result.stdout)
    assert info["truncated"] is True and [b["name"] for b in info["blocks"]] == ["ram0"]
    assert info["blocks"][0]["size"] == 1 << 58 and info["blocks"][0]["present_pages"] == 0


def test_escape_sequences_from_a_file_never_reach_the_terminal(short_dir):
    """A block name read from a file went raw into error texts that inspect, verify and
    restore print: an ESC in it drove the terminal (red-team, session 14). Everything
    the CLI prints is escaped now, whichever message carries it."""
    layout = format.plan_save([("\x1b[2Jram\x9b", 4 * 4096)])
    head = bytearray(layout.end_offset)
    for at, data in layout.head_writes:
        head[at : at + len(data)] = data
    header_at = layout.blocks[0].header_offset
    head[header_at + 4 : header_at + 12] = (8192).to_bytes(8, "big")  # its page size
    path = short_dir / "esc.sav"
    path.write_bytes(bytes(head))
    for command in ("inspect", "verify"):
        result = migd(command, str(path))
        assert result.returncode != 0
        assert "has page size 8192" in result.stderr, result.stderr
        assert "\\x1b[2Jram\\x9b" in result.stderr  # shown as its escape
        assert "\x1b" not in result.stderr + result.stdout
        assert "\x9b" not in result.stderr + result.stdout


def test_a_file_cut_inside_its_head_is_one_error_line_saying_incomplete(saved):
    path, _ = saved
    os.truncate(path, 10)
    result = migd("inspect", path)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "incomplete" in lines[0], lines


def test_a_foreign_file_is_one_clear_error_line_with_exit_1(short_dir):
    path = short_dir / "notes.txt"
    path.write_text("these are not the pages you are looking for\n" * 100)
    result = migd("inspect", path)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "not a QEMU/migd save file" in lines[0]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "tiny.img: the file is empty: not a save file"),
        (b"PK\x03", "not a QEMU/migd save file"),
        (b"QEV", "incomplete: the file is cut short at 3 bytes"),
    ],
)
def test_an_empty_or_tiny_foreign_file_is_an_error_not_a_crash(short_dir, content, problem):
    path = short_dir / "tiny.img"
    path.write_bytes(content)
    result = migd("inspect", path)
    assert result.returncode == 1 and problem in result.stderr, result.stderr


def test_a_missing_file_is_one_error_line_naming_it(short_dir):
    result = migd("inspect", short_dir / "nope.img")
    assert result.returncode == 1
    assert f"{short_dir / 'nope.img'}: No such file or directory" in result.stderr


def test_a_corrupt_header_is_reported_with_the_parsers_text(saved):
    path, _ = saved
    block = inspect_file(path).blocks[0]
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), (2).to_bytes(4, "big"), block.header_offset)  # header version 2
    result = migd("inspect", path)
    assert result.returncode == 1
    assert "mapped-ram capability version not supported" in result.stderr
    assert "incomplete" not in result.stderr


def test_inspect_reads_a_save_at_an_offset_after_an_applications_header(
    daemon, shm, short_dir
):
    content = data_with_zero_pages(4 * MiB, seed=3, zero_mib=(2,))
    (shm / "mem").write_bytes(content)
    path = short_dir / "with-header.img"
    path.write_bytes(b"HEADER" * 1000)
    result = migd("save", path, "--socket", daemon.socket_path, "--offset", "0x11921",
                  "--mem-path", shm / "mem", "--id", "ram0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert migd("inspect", path).returncode == 1  # no stream at 0: the header is foreign
    result = migd("inspect", path, "--offset", "0x11921", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["offset"] == 0x11921 and info["blocks"][0]["name"] == "ram0"
    assert info["blocks"][0]["present_pages"] == WRITTEN_PAGES_AT_OFFSET


@requires_qemu
@pytest.mark.timeout(120)
async def test_inspect_of_a_qemu_q35_save_lists_all_its_blocks_and_is_complete(shm, short_dir):
    mem = shm / "q35-mem0"
    mem.write_bytes(data_with_zero_pages(64 * MiB, seed=4, zero_mib=(3, 10)))
    backend = f"memory-backend-file,id=mem0,size={64 * MiB},mem-path={mem},share=on"
    args = ["-machine", "q35,memory-backend=mem0", "-object", backend, "-m", "64M",
            "-nodefaults", "-display", "none", "-S"]  # fmt: skip
    path = short_dir / "q35.img"
    async with QemuVM(args, short_dir, name="src") as vm:
        await vm.set_mapped_ram(channels=2)
        await vm.cmd("migrate", {"uri": f"file:{path}"})
        assert (await vm.wait_migration(60))["status"] == "completed", vm.log()
    result = migd("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["complete"] and info["machine"].startswith("pc-q35-")
    names = [b["name"] for b in info["blocks"]]
    assert "mem0" in names and len(names) > 2, names
    assert sum(b["size"] for b in info["blocks"]) == info["total_ram"]
    assert info["save_id"] is None and info["checksums"] is None  # QEMU writes neither
    mem0 = info["blocks"][names.index("mem0")]
    assert mem0["size"] == 64 * MiB
    # The guest never ran (-S): QEMU skips every zero page, so exactly the data pages remain.
    assert mem0["present_pages"] == nonzero_pages(mem.read_bytes())
    human = migd("inspect", path)
    assert human.returncode == 0 and "complete mapped-ram save" in human.stdout
    assert "checksums:     none" in human.stdout


def test_inspect_shows_the_save_id_and_the_checksum_of_the_checksums(saved):
    path, _ = saved
    result = migd("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    # Read independently: the vmdescription's id, and the table that ends the file (one
    # 16-byte xxh3-128 per MiB: 8 + 4 units) with its own xxh3-128.
    parsed = parse_save(path)
    assert parsed.migd is not None
    assert info["save_id"] == parsed.migd["save-id"] and len(info["save_id"]) == 32
    table = path.read_bytes()[-12 * 16 :]
    sums = info["checksums"]
    assert sums == {
        "algorithm": "xxh3-128",
        "unit_bytes": MiB,
        "units": 12,
        "table_offset": info["file_size"] - 12 * 16,
        "table_bytes": 12 * 16,
        "table_digest": xxhash.xxh3_128_hexdigest(table),
        "problem": None,
    }
    human = migd("inspect", path)
    assert f"save id:       {info['save_id']}" in human.stdout
    assert f"table digest:  {sums['table_digest']}" in human.stdout


def test_a_corrupt_checksum_table_is_reported_as_a_problem_not_a_crash(saved):
    path, _ = saved
    with open(path, "r+b") as f:
        end = os.fstat(f.fileno()).st_size
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, end - 20)[0] ^ 0x10]), end - 20)
    result = migd("inspect", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "checksums:     CORRUPT: the checksum table at offset" in result.stdout
    assert "status:  CORRUPT checksum table" in result.stdout
    result = migd("inspect", path, "--json")
    assert result.returncode == 1
    sums = json.loads(result.stdout)["checksums"]
    assert sums["algorithm"] == "xxh3-128" and "the table is corrupt" in sums["problem"]
    assert "the table is corrupt" in result.stderr
    os.truncate(path, end - 1)  # a table cut short: the same, with read_table's words
    info = inspect_file(path)
    assert info.checksums is not None and "cut short" in str(info.checksums.problem)


# --- red-team, session 13 --------------------------------------------------------------------


def test_a_corrupt_bitmap_is_reported_as_restore_would_refuse_it(saved):
    """inspect read the bitmaps only to count pages: a flipped bit, which every restore
    refuses ("bitmap of ramblock ... is corrupt"), was shown as a complete file."""
    path, _ = saved
    block = parse_save(path).blocks[0]
    with open(path, "r+b") as f:
        f.seek(block.bitmap_offset + 10)
        byte = f.read(1)[0]
        f.seek(block.bitmap_offset + 10)
        f.write(bytes([byte ^ 0x04]))
    result = migd("inspect", path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "status:  CORRUPT (bitmap of ramblock ram0 is corrupt" in result.stdout
    assert "migd restore refuses this file" in result.stdout
    result = migd("inspect", path, "--json")
    assert result.returncode == 1
    assert "bitmap of ramblock ram0 is corrupt" in json.loads(result.stdout)["bitmap_problem"]


def test_strings_from_the_file_are_shown_escaped_never_sent_raw_to_the_terminal(saved):
    """A machine type is the file's to say: an escape sequence in it is printed as text."""
    path, _ = saved
    data = bytearray(path.read_bytes())
    at = data.index(b"\x04none")  # the configuration section's machine name, str8
    data[at + 1 : at + 5] = b"\x1b[1m"
    path.write_bytes(bytes(data))
    result = migd("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "machine:       \\x1b[1m" in result.stdout
    assert "\x1b" not in result.stdout


def test_a_restore_of_a_file_without_checksums_says_it_was_not_verified(daemon, shm, short_dir):
    (shm / "m").write_bytes(os.urandom(MiB))
    client = RawClient(daemon.socket_path).negotiate()
    reply = client.execute(
        "object-add",
        {"qom-type": "memory-backend-file", "id": "m", "size": MiB, "mem-path": str(shm / "m"),
         "share": True},
    )  # fmt: skip
    assert reply == {"return": {}}, reply
    path = short_dir / "plain.sav"
    caps = [{"capability": "mapped-ram", "state": True}]
    assert client.execute("migrate-set-capabilities", {"capabilities": caps}) == {"return": {}}
    reply = client.execute("migrate", {"uri": f"file:{path}", "checksums": False})
    assert reply == {"return": {}}, reply
    deadline = time.monotonic() + 60
    while client.execute("query-migrate")["return"].get("status") != "completed":
        assert time.monotonic() < deadline, "the save did not complete"
    client.close()
    result = migd("restore", path, "--socket", daemon.socket_path)
    assert result.returncode == 0, result.stderr
    assert "not verified: the file has no checksums" in result.stdout
