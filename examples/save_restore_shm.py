"""The simplest use of migd: save a /dev/shm region to a file and restore it, over QMP.

Needs a running migd (`migd serve`) that has no memory backends of its own (a save
covers every backend of the daemon). Run: python examples/save_restore_shm.py [SOCKET]
(default: migd's default socket, /run/migd/migd.sock or $XDG_RUNTIME_DIR/migd/migd.sock).
"""

import asyncio
import os
import sys
from pathlib import Path

from qemu.qmp import QMPClient

from migd.app.config import default_socket_path


async def main(socket_path: str) -> int:
    region = Path(f"/dev/shm/migd-example-{os.getpid()}")  # any file migd can mmap will do
    save_file = Path(f"/tmp/migd-example-{os.getpid()}.sav")
    region.write_bytes(data := os.urandom(8 << 20))
    client = QMPClient("save-restore-shm")
    await client.connect(socket_path)  # reads the greeting, sends qmp_capabilities
    backend = {"qom-type": "memory-backend-file", "id": "shm0", "mem-path": str(region)}
    await client.execute("object-add", {**backend, "size": len(data)})
    # mapped-ram: the one file layout migd writes (QEMU's `migrate file:` with it on)
    caps = [{"capability": "mapped-ram", "state": True}]
    await client.execute("migrate-set-capabilities", {"capabilities": caps})
    for command in ("migrate", "migrate-incoming"):  # save, then restore, the same file
        if command == "migrate-incoming":
            region.write_bytes(bytes(len(data)))  # wipe: the restore must bring the data back
        await client.execute(command, {"uri": f"file:{save_file}"})  # returns at once
        while (info := await client.execute("query-migrate"))["status"] in ("setup", "active"):
            await asyncio.sleep(0.05)
        print(f"{command}: {info['status']} {info.get('error-desc', '')}")
    await client.execute("object-del", {"id": "shm0"})
    await client.disconnect()
    same = region.read_bytes() == data
    region.unlink()
    save_file.unlink(missing_ok=True)
    print("restored region is identical" if same else "MISMATCH: restored region differs")
    return 0 if same else 1


if __name__ == "__main__":
    # Memory files hold guest RAM: created private (0600), as migd wants them before it
    # restores into them (a file others may read is refused).
    os.umask(0o077)
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else default_socket_path())))
