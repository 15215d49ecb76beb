"""A minimal io_uring for O_DIRECT reads in ctypes (no liburing: its newest wheels die
with SIGILL on this CPU), for probe_shapes.py: setup, one mmap of both rings, READ
submissions, completions reaped after io_uring_enter. x86 only (no memory barriers:
the syscall orders the ring updates)."""
import ctypes, mmap, os, struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_SETUP, SYS_ENTER = 425, 426
OP_READ = 22
ENTER_GETEVENTS = 1
OFF_SQ_RING, OFF_SQES = 0, 0x10000000
FEAT_SINGLE_MMAP = 1
SQE = struct.Struct("<BBHiQQIIQHHiQQ")
CQE = struct.Struct("<QiI")
U32 = struct.Struct("<I")


class Params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", ctypes.c_uint32 * 10), ("cq_off", ctypes.c_uint32 * 10)]


class Ring:
    def __init__(self, entries=4):
        p = Params()
        fd = libc.syscall(SYS_SETUP, ctypes.c_uint(entries), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
        self.fd = fd
        sq, cq = list(p.sq_off), list(p.cq_off)
        self.sq_head, self.sq_tail, sq_mask, _, _, _, self.sq_array = sq[:7]
        self.cq_head, self.cq_tail, cq_mask, _, _, self.cqes = cq[:6]
        size = max(self.sq_array + p.sq_entries * 4, self.cqes + p.cq_entries * CQE.size)
        assert p.features & FEAT_SINGLE_MMAP
        self.rings = mmap.mmap(fd, size, offset=OFF_SQ_RING)
        self.sqes = mmap.mmap(fd, p.sq_entries * SQE.size, offset=OFF_SQES)
        self.sq_mask = U32.unpack_from(self.rings, sq_mask)[0]
        self.cq_mask = U32.unpack_from(self.rings, cq_mask)[0]
        self.pending = 0

    def read(self, fd, addr, length, offset, user_data):
        tail = U32.unpack_from(self.rings, self.sq_tail)[0]
        i = tail & self.sq_mask
        SQE.pack_into(self.sqes, i * SQE.size, OP_READ, 0, 0, fd, offset, addr, length, 0,
                      user_data, 0, 0, 0, 0, 0)
        U32.pack_into(self.rings, self.sq_array + 4 * i, i)
        U32.pack_into(self.rings, self.sq_tail, (tail + 1) & 0xFFFFFFFF)
        self.pending += 1

    def enter(self, wait):
        while True:
            n = libc.syscall(SYS_ENTER, self.fd, self.pending, wait,
                             ENTER_GETEVENTS if wait else 0, None, 0)
            if n >= 0:
                self.pending -= n
                return
            e = ctypes.get_errno()
            if e != 4:  # EINTR
                raise OSError(e, os.strerror(e))

    def reap(self):
        """(user_data, res) of one completion, waiting for it."""
        while True:
            head = U32.unpack_from(self.rings, self.cq_head)[0]
            tail = U32.unpack_from(self.rings, self.cq_tail)[0]
            if head != tail:
                ud, res, _ = CQE.unpack_from(self.rings, self.cqes + (head & self.cq_mask) * CQE.size)
                U32.pack_into(self.rings, self.cq_head, (head + 1) & 0xFFFFFFFF)
                return ud, res
            self.enter(1)

    def close(self):
        self.rings.close(); self.sqes.close(); os.close(self.fd)
