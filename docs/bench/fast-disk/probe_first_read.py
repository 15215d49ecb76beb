"""The first read of a tmpfs file against a re-read (session 28): two 1.5 GiB files in
/dev/shm just written, read with 4 MiB preads (as migd's staged saves read memory files):
a, a again, b, a after b (a's page-cache metadata out of the caches, if that were it), a
after 256 MiB of user memory touched, and a with POSIX_FADV_NOREUSE; three times.
Printed: GiB/s and this process's system CPU seconds per pass.

    .venv/bin/python docs/bench/fast-disk/probe_first_read.py
"""
import os, time, resource, mmap
MiB=1<<20; SIZE=1536*MiB
def mk(p):
    with open(p,"wb") as f:
        for _ in range(SIZE//(64*MiB)): f.write(os.urandom(64*MiB))
    return os.open(p,os.O_RDONLY)
a=mk("/dev/shm/cr-a"); b=mk("/dev/shm/cr-b"); buf=mmap.mmap(-1,4*MiB)
big=mmap.mmap(-1,256*MiB); big.write(b"x"*(256*MiB))
def readall(fd, adv=None):
    if adv is not None: os.posix_fadvise(fd,0,0,adv)
    r0=resource.getrusage(resource.RUSAGE_SELF); t0=time.perf_counter()
    for at in range(0,SIZE,4*MiB): os.preadv(fd,[buf],at)
    t=time.perf_counter()-t0; r1=resource.getrusage(resource.RUSAGE_SELF)
    return f"{1.5/t:5.2f} GiB/s sys {r1.ru_stime-r0.ru_stime:.3f}"
def thrash():
    for i in range(0,256*MiB,4096): big[i]=1
try:
    for r in range(3):
        print("a", readall(a), "| a again", readall(a), "| b", readall(b), "| a after b", readall(a), flush=True)
        thrash(); print("a after 256 MiB of user memory", readall(a), flush=True)
        print("a NOREUSE after b:", readall(b) and readall(a, os.POSIX_FADV_NOREUSE), flush=True)
finally:
    os.unlink("/dev/shm/cr-a"); os.unlink("/dev/shm/cr-b")
