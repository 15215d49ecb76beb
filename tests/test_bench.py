"""`migd bench` end to end at a tiny size: the suite works; its figures are not checked.

The real run (4 GiB, 3 rounds, 20+ minutes) is never a test: see README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .conftest import rest_of_output
from .qemu_vm import requires_qemu

REPO = Path(__file__).resolve().parent.parent
TINY = ["--size-gib", "0.0625", "--runs", "1", "--channels", "1,2"]


def odirect_ok(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)
    return True


# The paired checksum rows at 2 channels (the reference count of TINY): the setting each
# sends, as it shows: the saved file carries a table or not (bench/fill.py), the
# restore's query-migrate x-checksums state.
CHECKSUM_STATES = {
    "migd-save-2-sums": ["recorded"],
    "migd-save-2-nosum": ["off"],
    "migd-restore-2-verify": ["verified"],
    "migd-restore-2-noverify": ["unverified"],
    "migd-restore-2-verify-before-write": ["verified"],
}


def check_checksum_rows(rows: dict, ratios: dict) -> None:
    """Each paired row ran with its setting, restored the right memory, and the three
    ratios (with over without, per round) are there."""
    for key, states in CHECKSUM_STATES.items():
        assert rows[key]["checksum_states"] == states, (key, rows[key])
        if "restore" in key:
            assert rows[key]["verified"] is True, key
    for what in ("checksums on / off", "verify on / off", "verify before-write / off"):
        (name,) = [n for n in ratios if what in n and "paired" in n]
        ratio = ratios[name]
        assert ratio["value"] > 0 and ratio["min"] is None  # one round: no min-max


def run_bench(argv: list[str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{prelude}import sys; from migd.app.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "bench", *argv],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    if not odirect_ok(tmp_path):
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    return tmp_path


@pytest.mark.timeout(300)
def test_bench_end_to_end(disk: Path) -> None:
    out = disk / "out"
    proc = run_bench([*TINY, "--dir", str(disk), "--out", str(out), "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "bench.json").read_text())
    assert doc["complete"] and doc["channels"] == [1, 2] and doc["ref_channels"] == 2
    assert sorted(p.name for p in disk.iterdir()) == ["out"], "save files left behind"

    rows = {r["key"]: r for r in doc["rows"]}
    expected = {
        "migd-save-1", "migd-save-2", "migd-save-1-buffered", "migd-save-2-buffered",
        "migd-save-2-nodetect", "migd-restore-1", "migd-restore-2",
        "migd-restore-1-buffered", "migd-restore-2-buffered", "migd-restore-2-empty",
        "migd-save-2-adjacent", "migd-save-2-zero75", "migd-save-2-zero30",
        "migd-save-2-holes75", "migd-save-2-staged", "migd-save-2-mapped",
        "migd-restore-2-staged", "migd-restore-2-mapped",
        "migd-restore-2-empty-staged", "migd-restore-2-empty-mapped",
        "migd-save-2-polled", "migd-save-2-event", "migd-restore-2-polled",
        "migd-restore-2-event",
    } | set(CHECKSUM_STATES)
    if doc["qemu"]:  # QEMU >= 9.1 installed
        expected |= {
            "qemu-save-1", "qemu-save-2", "qemu-save-2-buffered", "qemu-restore-1",
            "qemu-restore-2", "qemu-restore-2-buffered", "qemu-restore-2-empty",
        }
    assert expected <= set(rows), expected - set(rows)
    assert doc["disk_write_key"] in rows and doc["disk_read_key"] in rows
    # the restores' baseline: a plain read of the very file they read, among them
    assert doc["restore_read_key"] == "disk-read-file"
    assert rows["disk-read-file"]["tool"] == ("fio" if shutil.which("fio") else "python")
    ratios = {r["name"]: r for r in doc["ratios"]}
    same_file = [n for n in ratios if "O_DIRECT read of the same file" in n]
    assert len(same_file) == 1 and ratios[same_file[0]]["value"] > 0
    # saves against the disk write of their own round (the disk's passes ran among them)
    per_round = [n for n in ratios if "best disk write of the same round" in n]
    assert len(per_round) == 1 and ratios[per_round[0]]["value"] > 0
    for row in rows.values():
        samples = 4 if row["memory"] == "adjacent" else 1  # paired with each of 4 saves
        if row["key"] in CHECKSUM_STATES or row["key"].endswith(
            ("-staged", "-mapped", "-polled", "-event")
        ):
            samples = 2  # on, off, off, on in each round; staged, mapped, mapped, staged
        assert len(row["seconds"]) == samples and row["gib_per_s"] > 0, row
        assert row["bytes"] == 64 << 20
    for key in expected:
        if "restore" in key:
            assert rows[key]["verified"] is True, key
    assert rows["migd-save-2"]["page_cache_pct"] and rows["migd-save-2"]["query_migrate_p99_ms"]
    assert rows["migd-save-2-zero75"]["written_pct"][0] < 50  # the zero clusters are skipped
    assert {r["name"] for r in doc["ratios"]} and doc["machine"]["cpus"] == os.cpu_count()
    check_checksum_rows(rows, ratios)
    # the main rows run migd's defaults: checksums recorded, verified on restore
    assert rows["migd-save-2"]["checksum_states"] == ["recorded"]
    assert rows["migd-restore-2"]["checksum_states"] == ["verified"]
    # saves and restores (into used memory, into an empty file) through staging buffers or
    # the mapping, paired: ratios reported
    staging = [r for n, r in ratios.items() if "staging buffers / " in n]
    assert len(staging) == 3 and all(r["value"] > 0 for r in staging)
    # saves and restores polled every 10 ms or waiting for the event, paired: the polled
    # ones answered query-migrate along the way, the others only once, at the end
    polling = [r for n, r in ratios.items() if "waiting for the event / polling" in n]
    assert len(polling) == 2 and all(r["value"] > 0 for r in polling)
    for op in ("save", "restore"):
        assert rows[f"migd-{op}-2-polled"]["query_migrate_answers"]
        assert rows[f"migd-{op}-2-event"]["query_migrate_answers"] is None

    md = (out / "bench.md").read_text()
    assert "migd bench --size-gib 0.0625" in md and "| ch |" in md
    assert "## Cost of checksums (paired runs)" in md
    assert "| save, checksums on / off |" in md and "| restore, verify on / off |" in md
    assert "migd restore, 2 ch, direct-io (verified)" in md
    png = out / "bench.png"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


@pytest.mark.timeout(300)
def test_bench_without_matplotlib_qemu_or_fio(disk: Path) -> None:
    out = disk / "out"
    proc = run_bench(
        ["--size-gib", "0.0625", "--runs", "1", "--channels", "1", "--dir", str(disk),
         "--out", str(out), "--no-qemu", "--buffered-channels", "none",
         "--baseline", "python"],
        prelude="import sys; sys.modules['matplotlib'] = None; ",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matplotlib is not installed" in proc.stderr
    assert not (out / "bench.png").exists()
    assert "| ch |" in proc.stdout and proc.stdout == (out / "bench.md").read_text()
    doc = json.loads((out / "bench.json").read_text())
    keys = {r["key"] for r in doc["rows"]}
    assert {"disk-write-py", "disk-read-py", "migd-save-1", "migd-restore-1"} <= keys
    assert doc["restore_read_key"] == "disk-read-file"
    assert {r["key"]: r for r in doc["rows"]}["disk-read-file"]["tool"] == "python"
    assert not any(k.startswith("qemu") or "buffered" in k for k in keys)
    assert doc["qemu"] is None


def test_bench_usage_errors() -> None:
    proc = run_bench(["--channels", "1,x"])
    assert proc.returncode == 2 and "1,2,4,8" in proc.stderr
    proc = run_bench(["--channels", "1", "--buffered-channels", "2"])
    assert proc.returncode == 2 and "subset" in proc.stderr
    proc = run_bench(["--size-gib", "0.01", "--runs", "1"])
    assert proc.returncode == 2 and "argument --size-gib: '0.01'" in proc.stderr


# Each bad number is refused as it is parsed: exit 2 and argparse's one line naming the
# option and the value, before the suite, --concurrency or --vm makes anything.
BAD_NUMBERS = [
    (["--size-gib", "nan"], "--size-gib", "nan"),
    (["--size-gib", "inf"], "--size-gib", "inf"),
    (["--size-gib", "1e400"], "--size-gib", "1e400"),  # float() makes it inf
    (["--size-gib", "-1"], "--size-gib", "-1"),
    (["--size-gib", "2000"], "--size-gib", "2000"),
    (["--size-gib", "x"], "--size-gib", "x"),
    (["--runs", "0"], "--runs", "0"),
    (["--runs", "1.5"], "--runs", "1.5"),
    (["--concurrency", "--jobs", "-3"], "--jobs", "-3"),
    (["--concurrency", "--job-size-mib", "nan"], "--job-size-mib", "nan"),
    (["--concurrency", "--job-channels", "256"], "--job-channels", "256"),
    (["--vm", "--vm-sizes-gib", "1,nan"], "--vm-sizes-gib", "nan"),
    (["--vm", "--vm-sizes-gib", "0.001"], "--vm-sizes-gib", "0.001"),
    (["--vm", "--vm-sizes-gib", "x"], "--vm-sizes-gib", "x"),
]


@pytest.mark.parametrize(("argv", "option", "value"), BAD_NUMBERS)
def test_bench_refuses_bad_numbers_before_anything(
    tmp_path: Path, argv: list[str], option: str, value: str
) -> None:
    memory = tmp_path / "memory"
    memory.mkdir()
    proc = run_bench([*argv, "--dir", str(tmp_path), "--memory-dir", str(memory), "--no-qemu"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"migd bench: error: argument {option}: '{value}'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]
    assert list(memory.iterdir()) == []


@pytest.mark.parametrize("option", ["--dir", "--memory-dir"])
def test_bench_refuses_a_missing_directory(tmp_path: Path, option: str) -> None:
    missing = tmp_path / "missing"
    proc = run_bench(["--size-gib", "0.0625", "--runs", "1", "--no-qemu", option, str(missing)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"migd bench: error: {option} '{missing}': no such directory" in proc.stderr
    assert "Traceback" not in proc.stderr and not missing.exists()
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    proc = run_bench(["--vm", option, str(a_file)])
    assert proc.returncode == 2 and f"{option} '{a_file}': not a directory" in proc.stderr


@pytest.mark.timeout(300)
def test_bench_checksums_only(disk: Path, huge_tmpfs: Path) -> None:
    # Its memory files on huge pages (--memory-dir), as docs/bench/fast-disk measures.
    out = disk / "out"
    proc = run_bench(
        ["--size-gib", "0.0625", "--runs", "2", "--channels", "2", "--dir", str(disk),
         "--no-qemu", "--buffered-channels", "none", "--checksums-only", "--out", str(out),
         "--memory-dir", str(huge_tmpfs)]
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"memory files in {huge_tmpfs}" in proc.stdout
    assert list(huge_tmpfs.iterdir()) == []  # its memory files removed
    doc = json.loads((out / "bench.json").read_text())
    assert "## Cost of checksums" in proc.stdout and "| ch |" not in proc.stdout
    assert not (out / "bench.png").exists()
    assert doc["complete"] and "--checksums-only" in doc["command"]
    rows = {r["key"]: r for r in doc["rows"]}
    assert set(rows) == set(CHECKSUM_STATES)
    for key, states in CHECKSUM_STATES.items():
        assert rows[key]["checksum_states"] == states and len(rows[key]["seconds"]) == 4, key
    ratios = {r["name"]: r for r in doc["ratios"]}
    for what in ("checksums on / off", "verify on / off", "verify before-write / off"):
        (name,) = [n for n in ratios if what in n]
        assert "2 rounds" in name
        ratio = ratios[name]
        assert ratio["min"] <= ratio["value"] <= ratio["max"], ratio
    assert sorted(p.name for p in disk.iterdir()) == ["out"], "files left behind"


def test_bench_concurrency_section(disk: Path) -> None:
    """`migd bench --concurrency`: every phase measured in each round, each with its ratio
    and fairness, the rounds' median ratios, and nothing left behind in --dir."""
    proc = run_bench(["--concurrency", "--jobs", "3", "--job-size-mib", "8", "--no-qemu",
                      "--runs", "2", "--dir", str(disk)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in proc.stdout.splitlines()
        if line.startswith("| serial") or line.startswith("| concurrent")
    }
    assert set(rows) == {
        f"{how} memory-{what} (round {r})"
        for how in ("serial", "concurrent") for what in ("save", "restore") for r in (1, 2)
    }  # fmt: skip
    for what in ("save", "restore"):
        for r in (1, 2):
            row = rows[f"concurrent memory-{what} (round {r})"]
            total, gibs, ratio, jain, slowest, p99, rss = row
            assert float(total) > 0 and float(gibs) > 0 and float(ratio) > 0
            assert 0 < float(jain) <= 1 and float(slowest) >= 1
            assert float(p99) > 0 and float(rss) > 0
        assert f"concurrent memory-{what} / serial, round by round" in proc.stdout
        pooled = re.search(
            rf"query-jobs during every round's concurrent memory-{what}: p99 ([\d.]+) ms, "
            r"p50 ([\d.]+) ms, max ([\d.]+) ms \((\d+) answers\)",
            proc.stdout,
        )
        assert pooled, proc.stdout
        p99, p50, worst, answers = map(float, pooled.groups())
        assert 0 < p50 <= p99 <= worst and answers >= 2
    assert "over 2 rounds" in proc.stdout
    assert "3 jobs of 8 MiB" in proc.stdout
    assert list(disk.iterdir()) == []
    assert run_bench(["--concurrency", "--jobs", "0"]).returncode == 2


@requires_qemu
def test_bench_vm_section(disk: Path) -> None:
    """`migd bench --vm`: both sizes measured for migd and QEMU with ratios (the restored
    memory is compared inside), and nothing left behind in --dir."""
    proc = run_bench(["--vm", "--vm-sizes-gib", "0.03125,0.0625", "--runs", "1",
                      "--channels", "2", "--dir", str(disk)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if "GiB |" in line]
    # The stopped saves' table, then --live's (downtime, QEMU's, ratio, its live pass,
    # the restore of its image, ratio), then --postcopy's restores (until the guest can
    # run, QEMU's restore, ratio, until all of its RAM is in, ratio).
    assert [r[0].strip() for r in rows] == ["0.03125 GiB", "0.0625 GiB"] * 3
    for row in rows[:2]:
        for cell in (row[1], row[2], row[4], row[6], row[7], row[9]):  # seconds
            assert float(cell.split()[0]) > 0
        for cell in (row[3], row[5], row[8], row[10]):  # ratios
            assert float(cell.split("x")[0]) > 0
    for row in rows[2:4]:
        for cell in (row[1], row[2], row[4], row[5]):  # seconds
            assert float(cell.split()[0]) > 0
        for cell in (row[3], row[6]):  # ratios
            assert float(cell.split("x")[0]) > 0
    for row in rows[4:]:
        ready, qemu, all_in = (float(row[i].split()[0]) for i in (1, 2, 4))
        assert 0 < ready < all_in and qemu > 0  # the guest could run before its RAM was in
        for cell in (row[3], row[5]):  # ratios
            assert float(cell.split("x")[0]) > 0
    assert "--postcopy" in proc.stderr  # each round's log names it
    assert list(disk.iterdir()) == []
    assert run_bench(["--vm", "--vm-sizes-gib", "x"]).returncode == 2


def _fast_disk_leftovers(log: str) -> list[str]:
    """What is left of the fast disk the bench's log says it made: its backing file, a
    loop device on it, its mount. Only this run's (named in its log): a bench run beside
    this test (another checkout's tests) has a fast disk of its own, which a look at every
    migd-fastdisk-* on the machine took for this one's leftovers."""
    backing = re.search(r"backing file (\S+)", log)
    mount = re.search(r"mounted at (\S+)", log)
    assert backing and mount, log[-3000:]
    loops = subprocess.run(
        ["losetup", "-j", backing[1]], capture_output=True, text=True
    ).stdout  # fmt: skip
    mounts = Path("/proc/mounts").read_text()
    return [
        *([backing[1]] if Path(backing[1]).exists() else []),
        *[line for line in loops.splitlines() if line.strip()],
        *[line for line in mounts.splitlines() if f" {mount[1]} " in line],
    ]


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="--fast-disk needs root (loop devices)")
def test_bench_fast_disk_runs_on_a_loop_over_tmpfs_and_leaves_nothing() -> None:
    """`migd bench --fast-disk`: the rows ran on ext4 over a loop device, with user and
    system CPU seconds per row, and the disk is gone afterwards."""
    proc = run_bench(["--fast-disk", "--size-gib", "0.0625", "--runs", "1", "--channels", "2",
                      "--no-qemu", "--json"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["machine"]["dir_fs"] == "ext4", doc["machine"]
    assert doc["machine"]["dir_device"].startswith("/dev/loop"), doc["machine"]
    rows = {r["key"]: r for r in doc["rows"] if r["key"].startswith("migd-")}
    assert {"migd-save-2", "migd-restore-2"} <= set(rows), sorted(rows)
    for row in rows.values():
        runs = len(row["seconds"])  # 1, or 2 for a row paired in mirrored order
        assert len(row["cpu_user_seconds"]) == len(row["cpu_system_seconds"]) == runs, row
        assert min(row["cpu_user_seconds"] + row["cpu_system_seconds"]) >= 0, row
    # /proc/PID/stat counts in clock ticks (10 ms): a 64 MiB save alone may spend less
    # than one (CI saw 0 + 0 once), all the rows together do not.
    spent = sum(sum(r["cpu_user_seconds"]) + sum(r["cpu_system_seconds"]) for r in rows.values())
    assert spent > 0, rows
    assert _fast_disk_leftovers(proc.stderr) == []
    assert "fast disk: ext4 on /dev/loop" in proc.stderr


FAST_DISK_TOOLS = ("losetup", "mkfs.ext4", "mount", "umount")


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="--fast-disk needs root (loop devices); a private /dev/shm needs unshare",
)
@pytest.mark.parametrize("size", ["-1", "nan", "0.01"])
def test_bench_fast_disk_checks_the_size_before_it_builds_anything(
    tmp_path: Path, size: str
) -> None:
    """A bad --size-gib is refused before the /dev/shm file, the loop device, the mkfs and
    the mount (--fast-disk ignores --dir, so a missing one is no error either). The bench
    runs with a /dev/shm of its own (a tmpfs in a mount namespace) and with the real
    tools behind wrappers that log each call: other sessions on this machine may build
    fast disks at the same time, so `losetup -a` and the real /dev/shm cannot tell."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls"
    for tool in FAST_DISK_TOOLS:
        wrapper = tools / tool
        wrapper.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n'
                           f'exec {shutil.which(tool)} "$@"\n')  # fmt: skip
        wrapper.chmod(0o755)
    code = "import sys; from migd.app.cli import main; sys.exit(main(sys.argv[1:]))"
    script = (
        'mount -t tmpfs -o size=64m migd-test-shm /dev/shm || exit 99; "$@"; code=$?; '
        "ls -A /dev/shm; exit $code"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         "env", f"PATH={tools}:{os.environ['PATH']}", sys.executable, "-c", code, "bench",
         "--fast-disk", "--size-gib", size, "--dir", "/nonexistent", "--no-qemu"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"migd bench: error: argument --size-gib: '{size}'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "fast disk" not in proc.stderr
    assert proc.stdout == "", "files left in /dev/shm: " + proc.stdout
    assert not calls.exists(), calls.read_text()
    # the set-up is what the bench sees: the wrappers come first in its PATH, and with a
    # valid size it gets as far as FastDisk, which finds the private /dev/shm too small
    # for its backing file (checked before the file is made)
    assert shutil.which("losetup", path=f"{tools}:{os.environ['PATH']}") == str(
        tools / "losetup"
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         "env", f"PATH={tools}:{os.environ['PATH']}", sys.executable, "-c", code, "bench",
         "--fast-disk", "--size-gib", "0.0625", "--no-qemu"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "in /dev/shm, which has 64 MiB free" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout == "" and not calls.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_fast_disk_close_detaches_a_device_it_never_learnt_the_name_of() -> None:
    """A signal during `losetup --find --show` can land after the attach but before
    FastDisk knows the device: close() finds it by the backing file and detaches it."""
    from migd.bench.fastdisk import FastDisk

    fd, name = tempfile.mkstemp(prefix="migd-fastdisk-test-", dir="/dev/shm")
    os.ftruncate(fd, 1 << 20)
    os.close(fd)
    backing = Path(name)
    disk = FastDisk(1 << 20)
    disk.backing = backing  # the state open() is in once the file is written
    attached = ""
    try:
        attached = subprocess.run(
            ["losetup", "--find", "--show", name], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert attached.startswith("/dev/loop") and disk.device is None
        assert FastDisk.attached(backing) == [attached]
        disk.close()
        assert not backing.exists()
        # by the device's name: `losetup -j` no longer finds a deleted backing file
        assert name not in _backing_file(attached)
    finally:
        if attached and name in _backing_file(attached):  # close() left it: ours
            subprocess.run(["losetup", "-d", attached], check=False)
        backing.unlink(missing_ok=True)


def _backing_file(device: str) -> str:
    """The file behind a loop device ("" if it is detached)."""
    return subprocess.run(
        ["losetup", "-n", "-O", "BACK-FILE", device], capture_output=True, text=True
    ).stdout.strip()


def _processes_naming(text: str) -> list[str]:
    """The command lines of the live processes that name `text` (a test's directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it exited
        if text in argv:
            found.append(argv)
    return found


def _bench_until(argv: list[str], line: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`migd bench ARGV` started, and its stderr read until a line containing `line`."""
    code = "import sys; from migd.app.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "bench", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    for text in proc.stderr:
        seen.append(text)
        if line in text:
            return proc, seen
    proc.wait()
    raise AssertionError(f"no {line!r} in its output:\n{''.join(seen)}")


@requires_qemu
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_bench_vm_interrupted_leaves_nothing(sig: signal.Signals) -> None:
    """`migd bench --vm` signalled once its first round has begun: its migd daemon, the
    QEMU it was starting, the socket directory and the guest's memory file are all gone,
    and it says so (before: SIGTERM and SIGHUP killed the bench outright and left them
    all; once it unwound, a QEMU still starting was left running)."""
    work = Path(tempfile.mkdtemp(prefix="mb-", dir="/tmp"))  # short: QEMU's socket paths
    try:
        (work / "d").mkdir()
        (work / "m").mkdir()
        proc, _ = _bench_until(
            ["--vm", "--vm-sizes-gib", "0.015625", "--runs", "1", "--channels", "1",
             "--dir", str(work / "d"), "--memory-dir", str(work / "m")],
            "vm round 1/1",
        )  # fmt: skip
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (128 + sig, 130), err
        assert "interrupted" in err and "Traceback" not in _without_dropped(err), err
        assert list((work / "d").iterdir()) == [] and list((work / "m").iterdir()) == []
        assert _processes_naming(str(work)) == []
    finally:
        for argv in _processes_naming(str(work)):
            print("left running:", argv)
        shutil.rmtree(work, ignore_errors=True)


def _without_dropped(err: str) -> str:
    """err without Python's report of the signal's exception raised in a finalizer or a
    weakref callback ("Exception ignored in ...", its traceback, "SystemExit: 143"): not a
    crash of the bench, which asks again between rounds (bench/common.raise_if_stopped)."""
    return re.sub(
        r"Exception ignored in.*?\n(SystemExit: \d+|KeyboardInterrupt:? ?)\n", "", err, flags=re.S
    )


def _fast_disk_tools(bin_dir: Path, ctl: Path) -> None:
    """Wrappers of the fast disk's tools in `bin_dir`: each logs its call to ctl/calls
    (with what it printed), fails if ctl/fail-TOOL exists, and if ctl/hold-TOOL exists
    writes to the FIFO ctl/reached and waits for the test's flock on ctl/go."""
    bin_dir.mkdir()
    os.mkfifo(ctl / "reached")
    for tool in FAST_DISK_TOOLS:
        wrapper = bin_dir / tool
        wrapper.write_text(
            f"#!/bin/sh\n"
            f"if [ -e {ctl}/hold-{tool} ]; then\n"
            f"  echo {tool} > {ctl}/reached; flock {ctl}/go true\nfi\n"
            f'if [ -e {ctl}/fail-{tool} ]; then echo "planted failure" >&2; exit 32; fi\n'
            f'out=$({shutil.which(tool)} "$@"); code=$?\n'
            f'echo "{tool} $* -> $out" >> {ctl}/calls; [ -n "$out" ] && echo "$out"\n'
            f"exit $code\n"
        )  # fmt: skip
        wrapper.chmod(0o755)


def _fast_disk_left(ctl: Path, err: str) -> list[str]:
    """What this bench's fast disk left: its backing file, its mount, its loop device
    (by the names in its log and its tools' calls: other sessions may build their own)."""
    left = []
    for backing in re.findall(r"backing file (/dev/shm/migd-fastdisk-\S+)", err):
        if Path(backing).exists():
            left.append(backing)
    calls = (ctl / "calls").read_text() if (ctl / "calls").exists() else ""
    for mount in re.findall(r"(/tmp/migd-fastdisk-mnt-\S+)", calls + err):
        if mount in Path("/proc/mounts").read_text() or Path(mount).exists():
            left.append(mount)
    for device in re.findall(r"--show .* -> (/dev/loop\d+)", calls):
        if "migd-fastdisk-" in _backing_file(device):
            left.append(device)
    return sorted(set(left))


FAST_DISK_FAULTS = [
    # (a file planted in ctl, where the first signal goes ("" for none), a second signal
    # at the umount, the error it says)
    ("fail-mkfs.ext4", "", "mkfs.ext4 -q -F"),
    ("fail-mount", "", "mount -o nodiscard"),
    ("hold-mkfs.ext4", "reached", ""),
    ("hold-mount", "reached", ""),
    ("hold-umount", "mounted at", ""),
]


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="--fast-disk needs root (loop devices)")
@pytest.mark.parametrize(("plant", "signal_at", "error"), FAST_DISK_FAULTS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_bench_fast_disk_failed_or_interrupted_leaves_nothing(
    tmp_path: Path, plant: str, signal_at: str, error: str, sig: signal.Signals
) -> None:
    """`migd bench --fast-disk` whose mkfs or mount fails, or signalled while mkfs or
    mount runs, or signalled during the bench and again while its teardown unmounts:
    no backing file in /dev/shm, no mount, no loop device of its own is left, and it says
    what failed."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    _fast_disk_tools(tmp_path / "bin", ctl)
    (ctl / plant).write_text("")
    code = "import sys; from migd.app.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "bench", "--fast-disk", "--size-gib", "0.0625",
         "--runs", "1", "--channels", "1", "--no-qemu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    go = os.open(ctl / "go", os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(go, fcntl.LOCK_EX)  # a held tool waits until it is closed
    try:
        if signal_at == "reached":  # a tool is held: signal the bench while it runs
            assert (ctl / "reached").read_text().strip() == plant.removeprefix("hold-")
            proc.send_signal(sig)
        elif signal_at:  # signal once the disk is up, and again during its umount
            for text in proc.stderr:
                seen.append(text)
                if signal_at in text:
                    break
            proc.send_signal(sig)
            assert (ctl / "reached").read_text().strip() == "umount"
            proc.send_signal(sig)
        os.close(go)
        _, rest = rest_of_output(proc, 240)
    finally:
        with contextlib.suppress(OSError):
            os.close(go)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(seen) + rest
    assert _fast_disk_left(ctl, err) == [], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if error:
        assert proc.returncode == 1 and f"error: {error}" in err, err[-3000:]
        assert "planted failure" in err, err[-3000:]
    else:
        assert proc.returncode in (128 + sig, 130), err[-3000:]
        assert "interrupted" in err, err[-3000:]


def test_load_bench_reports_answers_and_where_the_cpu_went(short_dir: Path) -> None:
    """`python -m migd.bench.load` at a small size: no errors, and the CPU rows. 256 MiB:
    /proc counts CPU time in 10 ms ticks, and a 64 MiB save may spend less than one."""
    proc = subprocess.run(
        [sys.executable, "-m", "migd.bench.load", "--size-gib", "0.25", "--clients", "8",
         "--dir", str(short_dir)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|", proc.stdout, re.M))
    assert rows["errors"] == "0" and int(rows["query-migrate answers during the save"]) > 0
    # A difference of CPU times: at this size it may be noise of either sign.
    assert re.fullmatch(r"-?\d+ us", rows["daemon CPU per answer"]), rows
    cpu = re.fullmatch(r"([\d.]+) / ([\d.]+) s", rows["daemon CPU, save alone / polled"])
    assert cpu is not None and float(cpu[2]) > 0, rows


def test_the_headline_figures_leave_the_paired_rows_out() -> None:
    """The best save (the headline's, and QEMU's match) is among the rows timed as all
    others are, one a round, polled every 10 ms: never one of the paired rows (the one
    that waited for the event, or went through staging buffers or the mapping in pairs
    after the rounds), even when that one ran faster."""
    from migd.bench.report import BenchReport
    from migd.bench.results import Row

    def row(key: str, seconds: float, polled: bool | None, staging: str | None = None) -> Row:
        return Row(key, key, 1 << 30, "save", "migd", channels=2, polled=polled,
                   staging=staging, times=[seconds])  # fmt: skip

    rows = [row("migd-save-2", 1.0, None), row("migd-save-2-event", 0.5, False),
            row("migd-save-2-polled", 0.9, True),
            row("migd-save-2-staged", 0.6, None, "staged"),
            row("migd-save-2-mapped", 0.7, None, "mapped")]  # fmt: skip

    class Report(BenchReport):
        def measured(self) -> dict[str, Row]:
            return {r.key: r for r in rows}

    report = Report.__new__(Report)
    assert report.best("migd", "save", direct_io=True) is rows[0]
    assert all(report.qemu_match(r) is None for r in rows[1:])


def test_saves_are_held_against_the_disk_write_of_their_own_round() -> None:
    """The save ratio is taken round by round: each round's save against the best of that
    round's disk writes (fio's when fio ran), the median of the rounds; not one median
    over the other, which a disk whose speed swings between rounds would skew."""
    from migd.bench.report import BenchReport
    from migd.bench.results import Row

    def row(key: str, op: str, tool: str, times: list[float]) -> Row:
        return Row(key, key, 1 << 30, op, tool, channels=4 if tool == "migd" else None,
                   times=times)  # fmt: skip

    # Round 1 slow, rounds 2 and 3 fast; fio's 4-job write the best in two rounds, its
    # 1-job write in one; the Python loop (faster still) does not count when fio ran.
    save = row("migd-save-4", "save", "migd", [2.0, 1.0, 1.0])
    rows = [save, row("disk-write-fio1", "write", "fio", [1.9, 0.8, 1.0]),
            row("disk-write-fio4", "write", "fio", [1.6, 0.9, 0.8]),
            row("disk-write-py", "write", "python", [0.1, 0.1, 0.1])]  # fmt: skip

    class Report(BenchReport):
        def measured(self) -> dict[str, Row]:
            return {r.key: r for r in rows}

    report = Report.__new__(Report)
    report.ref, report.size = 4, 1 << 30
    # per round: 1.6 / 2.0, 0.8 / 1.0, 0.8 / 1.0; the median of those
    assert report.share_of_disk_per_round(save, "write") == pytest.approx(0.8)
    ratios = {r.name: r for r in report.ratios()}
    held = ratios["best migd save (4 ch) / best disk write of the same round (per round)"]
    assert held.value == pytest.approx(0.8) and held.ok is False  # target >= 0.90
    # the ratio of medians would be 1.0 / 0.9 (fio4's median against the save's)
    assert save.gibs / report.best_disk("write").gibs == pytest.approx(0.9)
    # an interrupted round (the save ran, the disk did not) is left out
    save.times.append(0.5)
    assert report.share_of_disk_per_round(save, "write") == pytest.approx(0.8)
    # without fio the Python loop is the disk
    del rows[1:3]
    assert report.share_of_disk_per_round(save, "write") == pytest.approx(0.1)
    assert report.share_of_disk_per_round(None, "write") is None
