"""/proc/PID/stat, split where its format allows: the command name sits in parentheses
and may itself hold spaces or ')', so the fields are those after the last ')'."""

from __future__ import annotations


def read_stat(pid: int | str = "self") -> tuple[str, list[str]]:
    """(command name, fields from field 3 on: [0] is the state letter, [11] utime, [12]
    stime, [19] starttime) of /proc/PID/stat. OSError if the process is gone or hidden
    here; ValueError if the text is not /proc's."""
    with open(f"/proc/{pid}/stat", "rb") as stat_file:
        text = stat_file.read().decode(errors="replace")
    head, closing, rest = text.rpartition(")")
    if not closing or "(" not in head:
        raise ValueError(f"/proc/{pid}/stat: no command name in parentheses")
    return head[head.index("(") + 1 :], rest.split()
