"""What mapping a memory file costs (session 28): a 1.5 GiB tmpfs file of 4 KiB pages
mapped MAP_SHARED and populated (MADV_POPULATE_WRITE or MADV_POPULATE_READ) or not, then
unmapped; wall time of each and this process's CPU, twice.

    .venv/bin/python docs/bench/fast-disk/probe_populate.py
"""
import mmap, os, time, resource
MiB=1<<20; SIZE=1536*MiB
p="/dev/shm/popcost"
with open(p,"wb") as f:
    for _ in range(SIZE//(64*MiB)): f.write(os.urandom(64*MiB))
fd=os.open(p,os.O_RDWR)
def cpu(): r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
for how in ["POPULATE_WRITE","POPULATE_READ","none"]*2:
    t0=time.perf_counter(); c0=cpu()
    m=mmap.mmap(fd,SIZE,mmap.MAP_SHARED)
    if how!="none": m.madvise({"POPULATE_READ":22,"POPULATE_WRITE":23}[how])
    t1=time.perf_counter()
    m.close()
    t2=time.perf_counter(); c2=cpu()
    print(how, f"map {t1-t0:.3f}s unmap {t2-t1:.3f}s cpu {c2-c0:.3f}")
os.unlink(p)
