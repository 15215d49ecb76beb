"""QEMU 10's full capability and parameter sets (issue 15 item 4).

One table of requests, each with migd's reply and, where it differs, QEMU 10's with the
reason (the table is the list of intended differences). It runs against migd always and
against a real QEMU when one is installed, in the same order, from the same state.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from migd.migration import settings
from migd.migration.settings import Capabilities, Parameters, SettingError

from .qemu_vm import QemuVM, requires_qemu

QEMU_CAPABILITIES = [
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram",
    "x-colo", "release-ram", "return-path", "pause-before-switchover", "multifd",
    "dirty-bitmaps", "postcopy-blocktime", "late-block-activate", "x-ignore-shared",
    "validate-uuid", "background-snapshot", "zero-copy-send", "postcopy-preempt",
    "switchover-ack", "dirty-limit", "mapped-ram",
]  # fmt: skip

# query-migrate-parameters of a fresh QEMU 10.0 (measured); migd's differs in max-bandwidth.
QEMU_DEFAULTS = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False, "tls-creds": "",
    "tls-hostname": "", "tls-authz": "", "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0, "downtime-limit": 300, "x-checkpoint-delay": 20000,
    "multifd-channels": 2, "xbzrle-cache-size": 67108864, "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99, "multifd-compression": "none", "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1, "multifd-zstd-level": 1, "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1, "mode": "normal", "zero-page-detection": "multifd",
    "direct-io": False,
}  # fmt: skip
MIGD_DEFAULTS = QEMU_DEFAULTS | {"max-bandwidth": 0}  # unlimited: QEMU's cap slows saves


class Ok:
    """A successful reply ({} or, when `value` is given, exactly that value)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Ok({self.value!r})"


OK = Ok()
SAME = object()  # QEMU replies as migd does


@dataclasses.dataclass
class Step:
    command: str
    arguments: dict[str, Any] | None
    migd: Ok | str  # the reply: Ok or the error text
    qemu: Any = SAME  # QEMU 10's reply where it differs
    why: str = ""  # why it differs (the intended difference)


def caps(*names: str, state: bool = True) -> dict[str, Any]:
    return {"capabilities": [{"capability": n, "state": state} for n in names]}


RESET = Step("migrate-set-capabilities", caps(*QEMU_CAPABILITIES, state=False), OK)
SET_CAPS = "migrate-set-capabilities"
SET = "migrate-set-parameters"
QUERY_CAPS = "query-migrate-capabilities"
QUERY = "query-migrate-parameters"
NOT_LIVE = "migd saves memory in one pass: what only a live migration uses is refused"


def not_implemented(cap: str) -> str:
    return f"migd does not implement the '{cap}' capability: "


STEPS = [
    # Every capability may be set to false, and all are reported, in QEMU's order.
    RESET,
    Step(QUERY_CAPS, None, Ok([{"capability": c, "state": False} for c in QEMU_CAPABILITIES])),
    # QEMU's own refusals of the resulting set, in either order of enabling
    Step(SET_CAPS, caps("xbzrle", "mapped-ram"),
         "Mapped-ram migration is incompatible with xbzrle"),
    Step(SET_CAPS, caps("mapped-ram"), OK),
    Step(SET_CAPS, caps("postcopy-ram"), "Mapped-ram migration is incompatible with postcopy"),
    Step(SET_CAPS, caps("xbzrle"), "Mapped-ram migration is incompatible with xbzrle"),
    RESET,
    Step(SET_CAPS, caps("zero-copy-send"),
         "Zero copy only available for non-compressed non-TLS multifd migration"),
    Step(SET_CAPS, caps("postcopy-preempt"), "Postcopy preempt requires postcopy-ram"),
    Step(SET_CAPS, caps("switchover-ack"),
         "Capability 'switchover-ack' requires capability 'return-path'"),
    Step(SET_CAPS, caps("dirty-limit"),
         "dirty-limit requires KVM with accelerator property 'dirty-ring-size' set"),
    Step(SET_CAPS, caps("xbzrle", "multifd"), "Multifd is not compatible with xbzrle"),
    Step(SET_CAPS, caps("postcopy-ram", "multifd"), "Postcopy is not yet compatible with multifd"),
    # What QEMU takes and migd cannot do; a refused list changes nothing (events stays off)
    Step(SET_CAPS, caps("events", "xbzrle"), not_implemented("xbzrle"), OK, NOT_LIVE),
    RESET,
    Step(SET_CAPS, caps("multifd", "zero-copy-send"), not_implemented("zero-copy-send"), OK,
         NOT_LIVE),
    RESET,
    Step(SET_CAPS, caps("background-snapshot"), not_implemented("background-snapshot"), OK,
         NOT_LIVE),
    RESET,
    Step(QUERY_CAPS, None, Ok([{"capability": c, "state": False} for c in QEMU_CAPABILITIES])),
    # Parameters: all of QEMU's, its defaults but max-bandwidth
    Step(QUERY, None, Ok(MIGD_DEFAULTS), Ok(QEMU_DEFAULTS), "max-bandwidth 0: unlimited"),
    Step(SET, {"downtime-limit": 2000, "tls-creds": "", "tls-hostname": None}, OK),
    Step(SET, {"announce-step": 50, "cpu-throttle-tailslow": True, "max-bandwidth": 0}, OK),
    Step(SET, {"zero-page-detection": "legacy", "block-bitmap-mapping": []}, OK),
    Step(QUERY, None,
         Ok(MIGD_DEFAULTS | {"downtime-limit": 2000, "announce-step": 50,
                             "cpu-throttle-tailslow": True, "max-bandwidth": 0,
                             "zero-page-detection": "legacy", "block-bitmap-mapping": []})),
    # QEMU's range checks and texts; the whole request is refused
    Step(SET, {"downtime-limit": 1000, "announce-step": 0},
         "Parameter 'announce_step' expects a value between 0 and 10000"),
    Step(SET, {"downtime-limit": 2000001},
         "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"),
    Step(SET, {"max-cpu-throttle": 10},
         "Parameter 'max_cpu_throttle' expects an integer in the range of "
         "cpu_throttle_initial to 99"),
    Step(SET, {"cpu-throttle-initial": 0},
         "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"),
    Step(SET, {"cpu-throttle-increment": 100},
         "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"),
    Step(SET, {"throttle-trigger-threshold": 0},
         "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"),
    Step(SET, {"throttle-trigger-threshold": 256},
         "Parameter 'throttle-trigger-threshold' expects uint8_t"),
    Step(SET, {"announce-initial": 99999999999},
         "Parameter 'announce_initial' expects a value between 0 and 100000"),
    Step(SET, {"announce-max": 100001},
         "Parameter 'announce_max' expects a value between 0 and 100000"),
    Step(SET, {"announce-rounds": 1001},
         "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    Step(SET, {"x-checkpoint-delay": -1}, "Parameter 'x-checkpoint-delay' expects uint32_t"),
    Step(SET, {"avail-switchover-bandwidth": 2**64},
         "Parameter 'avail-switchover-bandwidth' expects uint64"),
    Step(SET, {"xbzrle-cache-size": 4097},
         "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size"),
    Step(SET, {"multifd-zlib-level": 10},
         "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    Step(SET, {"multifd-qatzip-level": 0},
         "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"),
    Step(SET, {"multifd-zstd-level": 21},
         "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    Step(SET, {"x-vcpu-dirty-limit-period": 0},
         "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000"),
    Step(SET, {"vcpu-dirty-limit": 0}, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
    Step(SET, {"multifd-channels": 0},
         "Parameter 'multifd_channels' expects a value between 1 and 255"),
    Step(SET, {"tls-creds": 5}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
    Step(SET, {"block-bitmap-mapping": None},
         "Invalid parameter type for 'block-bitmap-mapping', expected: array"),
    Step(SET, {"mode": None}, "Invalid parameter type for 'mode', expected: string"),
    Step(SET, {"multifd-compression": "qatzip"},
         "Parameter 'multifd-compression' does not accept value 'qatzip'"),
    Step(SET, {"max-cpu-throttle": 30, "cpu-throttle-initial": 25}, OK),
    # What QEMU takes and migd cannot honour
    Step(SET, {"mode": "cpr-reboot"}, "migd does not implement migration mode 'cpr-reboot'", OK,
         "migd saves memory, not a VM for CPR"),
    Step(SET, {"mode": "normal"}, OK),
    Step(SET, {"block-bitmap-mapping": [{"node-name": "n", "alias": "a", "bitmaps": []}]},
         "migd does not implement 'block-bitmap-mapping'", OK, "migd has no block devices"),
    Step(SET, {"block-bitmap-mapping": []}, OK),
    Step(SET, {"multifd-compression": "zlib"}, "migd does not implement multifd-compression 'zlib'",
         OK, "the mapped-ram layout migd writes has no compressed form"),
    Step(SET, {"multifd-compression": "none"}, OK),
    Step(QUERY, None,
         Ok(MIGD_DEFAULTS | {"downtime-limit": 2000, "announce-step": 50,
                             "cpu-throttle-tailslow": True, "max-bandwidth": 0,
                             "zero-page-detection": "legacy", "block-bitmap-mapping": [],
                             "max-cpu-throttle": 30, "cpu-throttle-initial": 25})),
    # With mapped-ram: QEMU's own text, on the resulting set (QEMU checks its current set,
    # so it takes this one and then refuses every later migrate-set-parameters: last step)
    Step(SET_CAPS, caps("multifd", "mapped-ram"), OK),
    Step(SET, {"tls-creds": "tls0"},
         "Mapped-ram only available for non-compressed non-TLS multifd migration", OK,
         "QEMU checks its current settings, not the resulting ones"),
]  # fmt: skip


async def run_steps(client: Any) -> list[tuple[str, Any]]:
    from qemu.qmp import ExecuteError

    replies: list[tuple[str, Any]] = []
    for step in STEPS:
        try:
            replies.append(("return", await client.execute(step.command, step.arguments)))
        except ExecuteError as exc:
            replies.append(("error", exc.error.error.desc))
    return replies


def check(step: Step, expected: Any, reply: tuple[str, Any]) -> None:
    kind, value = reply
    where = f"{step.command} {step.arguments}"
    if isinstance(expected, Ok):
        assert kind == "return", (where, value)
        if expected.value is None:
            assert value == {}, where
        elif isinstance(expected.value, dict):
            keys = value.keys() | expected.value.keys()
            diff = {k: (value.get(k), expected.value.get(k)) for k in keys}
            assert value == expected.value, (where, {k: d for k, d in diff.items() if d[0] != d[1]})
        else:
            assert value == expected.value, where
    else:
        assert kind == "error", (where, value)
        # migd's own refusals give the start of the text: the reason follows
        if expected.startswith("migd does not implement"):
            assert value.startswith(expected), (where, value)
        else:
            assert value == expected, where


async def test_migd_accepts_qemus_sets_and_refuses_with_qemus_texts(qmp):
    for step, reply in zip(STEPS, await run_steps(qmp), strict=True):
        check(step, step.migd, reply)


@requires_qemu
async def test_qemu_replies_as_the_table_says(short_dir: Path):
    args = ["-machine", "none", "-nodefaults", "-display", "none"]
    async with QemuVM(args, short_dir, name="ref") as vm:
        replies = await run_steps(vm.qmp)
    for step, reply in zip(STEPS, replies, strict=True):
        expected = step.migd if step.qemu is SAME else step.qemu
        if isinstance(expected, str) and expected.startswith("migd"):
            raise AssertionError(f"{step}: QEMU's reply must be listed")
        check(step, expected, reply)


# -- the settings table itself -------------------------------------------------------------


def test_the_table_has_qemus_capabilities_in_order_and_migd_does_three():
    assert [c.value for c in settings.MigrationCapability] == QEMU_CAPABILITIES
    done = [f.name for f in dataclasses.fields(Capabilities) if settings.REFUSED not in f.metadata]
    assert done == ["events", "multifd", "mapped_ram"]


def test_the_table_has_qemus_parameters_and_defaults_but_max_bandwidth():
    params = {settings.wire_name(k): v for k, v in dataclasses.asdict(Parameters()).items()}
    assert params.pop("block-bitmap-mapping") is None  # absent until set, as in QEMU
    assert params == MIGD_DEFAULTS


@pytest.mark.parametrize(
    ("changes", "member"),
    [
        ({"mapped_ram": True, "xbzrle": True}, None),
        ({"return_path": True, "switchover_ack": True}, "return-path"),
        ({"auto_converge": True}, "auto-converge"),
    ],
)
def test_a_refused_capability_set_names_its_member(changes, member):
    with pytest.raises(SettingError) as info:
        settings.apply_capabilities(Capabilities(), changes, Parameters())
    assert info.value.member == member


def test_a_setting_of_false_is_always_accepted():
    off = {f.name: False for f in dataclasses.fields(Capabilities)}
    assert settings.apply_capabilities(Capabilities(), off, Parameters()) == Capabilities()
