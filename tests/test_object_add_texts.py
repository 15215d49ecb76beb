"""object-add and object-del refuse what QEMU 10 refuses in QEMU's words (issue 15,
wording), measured on QEMU 10.0, and a refused object-add leaves nothing behind.

migd's own rules (ownership, link count, a partial restore's mark, a directory) keep
migd's texts: tests/test_file_ownership.py, tests/test_partial_restore.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from .conftest import qmp_error

FILE = "memory-backend-file"
RAM = "memory-backend-ram"


def _add(qom_type: str, size: Any, mem_path: Path | None = None) -> dict[str, Any]:
    args = {"qom-type": qom_type, "id": "m0", "size": size}
    if mem_path is not None:
        args["mem-path"] = str(mem_path)
    return args


@pytest.mark.parametrize(
    ("qom_type", "size", "text"),
    [
        (FILE, 0, "property 'size' of memory-backend-file doesn't take value '0'"),
        (RAM, 0, "property 'size' of memory-backend-ram doesn't take value '0'"),
        (FILE, 4097, "backend 'memory-backend-file' memory size must be multiple of 4 KiB"),
        # QEMU rounds this one up to whole pages; migd refuses it in the same words.
        (RAM, 4097, "backend 'memory-backend-ram' memory size must be multiple of 4 KiB"),
        (RAM, "4096", "Parameter 'size' expects uint64"),
        (RAM, 1.5, "Parameter 'size' expects uint64"),
        (RAM, 1 << 64, "Parameter 'size' expects uint64"),
        (RAM, True, "Parameter 'size' expects uint64"),
        (RAM, None, "Parameter 'size' expects uint64"),
    ],
)
async def test_a_size_qemu_refuses_is_refused_in_its_words(qmp, shm, qom_type, size, text):
    path = shm / "m0" if qom_type == FILE else None
    assert await qmp_error(qmp, "object-add", _add(qom_type, size, path)) == text
    assert await qmp.execute("query-memdev") == []
    assert list(shm.iterdir()) == []  # QEMU leaves the file it created; migd creates none


async def test_a_mem_path_that_cannot_be_opened_is_refused_in_qemus_words(qmp, shm):
    missing = shm / "no-such-dir" / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, missing))
    assert text == f"can't open backing store {missing} for guest RAM: No such file or directory"
    (shm / "file").write_bytes(b"")
    under_file = shm / "file" / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, under_file))
    assert text == f"can't open backing store {under_file} for guest RAM: Not a directory"
    assert await qmp.execute("query-memdev") == []


async def test_a_mem_path_on_a_read_only_filesystem_is_refused_in_qemus_words(qmp, readonly_dir):
    # QEMU run as an unprivileged user says the same for EACCES (measured): one text for
    # every errno of the open.
    path = readonly_dir / "ram"
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, path))
    assert text == f"can't open backing store {path} for guest RAM: Read-only file system"


async def test_a_directory_keeps_migds_text(qmp, shm):
    # QEMU makes a temporary file in a directory; migd refuses it.
    text = await qmp_error(qmp, "object-add", _add(FILE, 4096, shm))
    assert text == f"Could not open '{shm}': Is a directory"


async def test_object_del_of_an_unknown_id_is_qemus_text(qmp):
    assert await qmp_error(qmp, "object-del", {"id": "nope"}) == "object 'nope' not found"


# -- QEMU's backend properties (round 10a): each taken with its QAPI type and QEMU's checks;
# merge, dump, prealloc and the canonical block name honoured, the rest refused by name.

OPTION_TEXTS: list[tuple[str, str, Any, str]] = [
    (RAM, "merge", "x", "Invalid parameter type for 'merge', expected: boolean"),
    (RAM, "prealloc-threads", "x", "Parameter 'prealloc-threads' expects uint64"),
    (RAM, "prealloc-threads", -1, "Parameter 'prealloc-threads' expects uint32_t"),
    (RAM, "prealloc-threads", 0,
     "property 'prealloc-threads' of memory-backend-ram doesn't take value '0'"),
    (RAM, "host-nodes", ["x"], "Parameter 'host-nodes[0]' expects uint64"),
    (RAM, "host-nodes", [0], "host-nodes must be empty for policy default, or you should "
     "explicitly specify a policy other than default"),
    (RAM, "policy", "bind", "host-nodes must be set for policy bind"),
    (RAM, "policy", "x", "Parameter 'policy' does not accept value 'x'"),
    (RAM, "align", 4096, "Parameter 'align' is unexpected"),
    (RAM, "readonly", True, "Parameter 'readonly' is unexpected"),
    (FILE, "align", 3, "alignment 0x3 must be multiples of page size 0x1000"),
    (FILE, "rom", "on", "property 'rom' = 'on' is not supported with 'readonly' = 'off'"),
    (FILE, "rom", "x", "Parameter 'rom' does not accept value 'x'"),
    (FILE, "offset", "x", "Parameter 'offset' expects uint64"),
    (RAM, "reserve", False, "migd does not support 'reserve' = 'false': migd's mappings "
     "always reserve their memory (no MAP_NORESERVE), so that a restore fails with an error "
     "rather than a process killed for want of memory"),
    (FILE, "readonly", True, "migd does not support 'readonly' = 'true': migd maps its "
     "backends read-write, so that a restore can land in them"),
    (FILE, "offset", 4096, "migd does not support 'offset' = '4096': migd maps a memory file "
     "from its start"),
    (FILE, "pmem", True, "migd does not support 'pmem' = 'true': migd makes no "
     "persistent-memory (MAP_SYNC) guarantees"),
    (FILE, "discard-data", True, "migd does not support 'discard-data' = 'true': migd never "
     "destroys a memory file's contents: they are what it saves"),
    (FILE, "align", 8192, "migd does not support 'align' = '8192': migd maps memory aligned "
     "to the page size only"),
]  # fmt: skip


@pytest.mark.parametrize(("qom_type", "key", "value", "text"), OPTION_TEXTS)
async def test_a_backend_property_is_checked_as_qemus(qmp, shm, qom_type, key, value, text):
    args = {**_add(qom_type, 4096, shm / "m0" if qom_type == FILE else None), key: value}
    assert await qmp_error(qmp, "object-add", args) == text
    assert await qmp.execute("query-memdev") == []


async def test_prealloc_context_names_an_object_migd_does_not_have(qmp):
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("object-add", {**_add(RAM, 4096), "prealloc-context": "tc0"})
    error = caught.value.error.error
    assert (error.class_, error.desc) == ("DeviceNotFound", "Device 'tc0' not found")


async def test_properties_asking_for_nothing_are_taken(qmp, shm):
    """The values that ask for what migd does anyway are accepted, as QEMU accepts them."""
    args = {**_add(FILE, 4096, shm / "m0"), "reserve": True, "policy": "default",
            "host-nodes": [], "align": 4096, "offset": 0, "discard-data": False, "pmem": False,
            "readonly": False, "rom": "auto", "prealloc-threads": 4, "merge": False}  # fmt: skip
    assert await qmp.execute("object-add", args) == {}
    (memdev,) = await qmp.execute("query-memdev")
    assert (memdev["merge"], memdev["dump"], memdev["prealloc"]) == (False, True, False)


async def test_merge_dump_and_prealloc_take_effect(qmp, shm):
    """prealloc populates the whole file now (its blocks allocated: a sparse file had
    none), dump false and merge true are madvised; query-memdev says so (merge only where
    the kernel has KSM, which QEMU also needs)."""
    size = 4 << 20
    args = {**_add(FILE, size, shm / "m0"), "prealloc": True, "dump": False, "merge": True}
    assert await qmp.execute("object-add", args) == {}
    assert (shm / "m0").stat().st_blocks * 512 >= size
    (memdev,) = await qmp.execute("query-memdev")
    ksm = Path("/sys/kernel/mm/ksm").exists()
    assert (memdev["merge"], memdev["dump"], memdev["prealloc"]) == (ksm, False, True)
    sparse = {**_add(FILE, size, shm / "m1"), "id": "m1"}
    assert await qmp.execute("object-add", sparse) == {}
    assert (shm / "m1").stat().st_blocks == 0


async def test_canonical_path_names_the_block_as_qemu_does(qmp):
    """x-use-canonical-path-for-ramblock-id: QEMU names the RAM block by the object's
    path, which is the name a save file carries."""
    args = {**_add(RAM, 4096), "x-use-canonical-path-for-ramblock-id": True}
    assert await qmp.execute("object-add", args) == {}
    (memdev,) = await qmp.execute("query-memdev")
    assert memdev["ramblock-name"] == "/objects/m0"
