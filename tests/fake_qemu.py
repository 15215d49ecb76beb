"""A QMP server that plays a QEMU, badly on purpose, for `migd vm` against hostile QEMUs.

Run as a process: `python tests/fake_qemu.py SOCKET CONFIG.json LOG`. It answers the
commands `migd vm save` and `restore` send, as QEMU 10 does, unless CONFIG says otherwise:

  state: the run state at start ("running")
  memdevs: [{"id", "size", "share", "mem-path"}] (query-memdev, qom-get); "memdevs_raw":
      the query-memdev reply as given
  map_memdevs: map each mem-path shared and writable, as a QEMU does (default true)
  machine: the machine type; device_bytes: the device state it writes ("QEVM" first)
  device_magic: the first 4 bytes of that device state (default "QEVM")
  overrides: {command: {"return": X} | {"error": text} | {"hang": true}}

Every command received goes to LOG as one line "<- COMMAND" (and "hanging on COMMAND"),
which is what the tests read to know what migd vm did (stopped the guest? resumed it?).
It serves one client at a time, as QEMU's QMP socket does.
"""

from __future__ import annotations

import array
import contextlib
import json
import mmap
import os
import socket
import sys
import threading
from typing import Any


class FakeQemu:
    def __init__(self, config: dict[str, Any], log_path: str) -> None:
        self.config = config
        self.log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives as long as we do)
        self.status = config.get("state", "running")
        self.received_fds: list[int] = []
        self.fdsets: dict[int, list[int]] = {}
        self.caps = {"x-ignore-shared": False, "mapped-ram": False, "multifd": False}
        self.bandwidth = 134217728
        self.migration = "none"
        self.maps = []
        if config.get("map_memdevs", True):
            for memdev in config.get("memdevs", []):
                fd = os.open(memdev["mem-path"], os.O_RDWR)
                self.maps.append(mmap.mmap(fd, os.fstat(fd).st_size))  # MAP_SHARED, rw
                os.close(fd)

    def log(self, text: str) -> None:
        self.log_file.write(text + "\n")

    def answer(self, command: str, args: dict[str, Any]) -> Any:
        memdevs = self.config.get("memdevs", [])
        if command == "qmp_capabilities":
            return {}
        if command == "query-status":
            return {"status": self.status, "running": self.status == "running"}
        if command == "query-version":
            return {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}
        if command == "query-memdev":
            if "memdevs_raw" in self.config:
                return self.config["memdevs_raw"]
            return [
                {"id": m["id"], "size": m["size"], "share": m.get("share", True), "merge": False,
                 "dump": True, "prealloc": False, "policy": "default", "host-nodes": []}
                for m in memdevs
            ]  # fmt: skip
        if command == "qom-get":
            path, prop = args["path"], args["property"]
            if (path, prop) == ("/machine", "type"):
                return self.config.get("machine", "pc-q35-10.0-machine")
            for m in memdevs:
                if path == f"/objects/{m['id']}":
                    return {"type": "memory-backend-file", "mem-path": m["mem-path"]}[prop]
            raise LookupError(f"Property '{prop}' not found")
        if command == "query-migrate-capabilities":
            return [{"capability": k, "state": v} for k, v in self.caps.items()]
        if command == "migrate-set-capabilities":
            for cap in args["capabilities"]:
                self.caps[cap["capability"]] = cap["state"]
            return {}
        if command == "query-migrate-parameters":
            return {"max-bandwidth": self.bandwidth}
        if command == "migrate-set-parameters":
            self.bandwidth = args.get("max-bandwidth", self.bandwidth)
            return {}
        if command == "add-fd":
            fdset = args.get("fdset-id", len(self.fdsets))
            self.fdsets.setdefault(fdset, []).append(self.received_fds.pop())
            return {"fdset-id": fdset, "fd": self.fdsets[fdset][-1]}
        if command == "remove-fd":
            for fd in self.fdsets.pop(args["fdset-id"], []):
                os.close(fd)
            return {}
        if command == "stop" and self.status == "inmigrate":
            return {}  # as QEMU: an incoming VM stays inmigrate, only not autostarted
        if command in ("stop", "cont"):
            self.status = "paused" if command == "stop" else "running"
            return {}
        if command == "migrate":
            fdset = int(args["uri"].split("/dev/fdset/")[1].split(",")[0])
            size = self.config.get("device_bytes", 4096)
            magic = self.config.get("device_magic", "QEVM").encode()
            os.write(self.fdsets[fdset][-1], (magic + bytes(size))[:size])
            self.migration = "completed"
            return {}
        if command == "migrate-incoming":  # loads nothing: the device state is not read
            self.migration, self.status = "completed", "paused"
            return {}
        if command == "query-migrate":
            return {"status": self.migration}
        if command == "migrate_cancel":
            self.migration = "cancelled"
            return {}
        if command == "quit":
            return {}
        raise LookupError(f"The command {command} has not been found")

    def serve(self, conn: socket.socket) -> None:
        greeting = {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                                        "package": ""}, "capabilities": []}}  # fmt: skip
        conn.sendall(json.dumps(greeting).encode() + b"\r\n")
        decoder = json.JSONDecoder()
        pending = ""
        while True:
            fds = array.array("i")
            data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                    self.received_fds.extend(fds)
            if not data:
                return
            pending += data.decode()
            while pending.strip():
                try:
                    message, end = decoder.raw_decode(pending.lstrip())
                except json.JSONDecodeError:
                    break
                pending = pending.lstrip()[end:]
                self.reply(conn, message)

    def reply(self, conn: socket.socket, message: dict[str, Any]) -> None:
        command, args = message["execute"], message.get("arguments") or {}
        self.log(f"<- {command}")
        override = self.config.get("overrides", {}).get(command, {})
        if override.get("hang"):
            self.log(f"hanging on {command}")
            threading.Event().wait()
        if "return" in override:
            reply: dict[str, Any] = {"return": override["return"]}
        elif "error" in override:
            reply = {"error": {"class": "GenericError", "desc": override["error"]}}
        else:
            try:
                reply = {"return": self.answer(command, args)}
            except LookupError as exc:
                reply = {"error": {"class": "GenericError", "desc": str(exc).strip("'")}}
        if "id" in message:
            reply["id"] = message["id"]
        conn.sendall(json.dumps(reply).encode() + b"\r\n")


def main() -> None:
    sock_path, config_path, log_path = sys.argv[1:4]
    with open(config_path) as f:
        fake = FakeQemu(json.load(f), log_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path + ".new")
    server.listen(1)
    os.rename(sock_path + ".new", sock_path)  # the socket appears ready to accept
    while True:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):  # the client went away: wait for the next
            fake.serve(conn)


if __name__ == "__main__":
    main()
