"""Paired runs against a running migd: restores with verify on/off, or saves with
checksums on/off, in mirrored order (on, off, off, on; then off, on, on, off), the page
cache dropped before each; prints each round's ratio (time off / time on) and the median.

The daemon must have a backend `ram0` of the file's size and mapped-ram, multifd and
direct-io set (docs/bench/checksums/README.md).

    python docs/bench/checksums/pairs.py SOCKET restore|save ROUNDS FILE
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from qemu.qmp.legacy import QEMUMonitorProtocol


def main() -> None:
    sock, op, rounds, path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    qmp = QEMUMonitorProtocol(sock)
    qmp.connect()
    on, off = ("on", "off") if op == "restore" else (True, False)

    def run(setting: object) -> float:
        subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=True)
        if op == "restore":
            qmp.cmd("migrate-incoming", uri=f"file:{path}", verify=setting)
        else:
            if os.path.exists(path):
                os.unlink(path)
            qmp.cmd("migrate", uri=f"file:{path}", checksums=setting)
        while (info := qmp.cmd("query-migrate"))["status"] not in ("completed", "failed"):
            time.sleep(0.05)
        assert info["status"] == "completed", info
        return float(info["total-time"])

    ratios = []
    for r in range(rounds):
        order = [on, off, off, on] if r % 2 == 0 else [off, on, on, off]
        spent = {on: 0.0, off: 0.0}
        for setting in order:
            spent[setting] += run(setting)
        ratios.append(spent[off] / spent[on])
        print(f"round {r}: on {spent[on] / 2:.0f} ms, off {spent[off] / 2:.0f} ms, "
              f"ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print("median ratio", round(statistics.median(ratios), 3))


if __name__ == "__main__":
    main()
