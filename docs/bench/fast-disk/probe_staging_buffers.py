"""migd's staged save and restore as plain loops, alternated, their staging buffers on
anonymous transparent huge pages (migd's) or in a memfd (shmem, 4 KiB pages here), session 28.

probe_write_sources.py found O_DIRECT writes from shmem pages pinned cheaper than from
huge-page buffers; here the whole staged work: 4 threads, 4 MiB runs, 1.5 GiB, save =
pread from the memory file into the buffer, xxh3-128 per MiB, O_DIRECT write; restore =
O_DIRECT read into the buffer, xxh3-128 per MiB, pwrite into the memory file.

    sudo .venv/bin/python docs/bench/fast-disk/probe_staging_buffers.py [ROUNDS]   # repo root
"""
import mmap, os, resource, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
import xxhash
from migd.bench.fastdisk import FastDisk
MiB=1<<20; RUN=4*MiB; SIZE=1536*MiB; GIB=SIZE/2**30
ROUNDS=int(sys.argv[1]) if len(sys.argv)>1 else 5
disk=FastDisk(SIZE+512*MiB); out=disk.open()
img=f"{out}/w-img"; mem="/dev/shm/w-mem"
with open(mem,"wb") as f:
    for _ in range(SIZE//(64*MiB)): f.write(os.urandom(64*MiB))
fd_mem=os.open(mem,os.O_RDWR)
fd_img=os.open(img,os.O_RDWR|os.O_CREAT|os.O_DIRECT,0o600)
os.posix_fallocate(fd_img,0,SIZE)
def offsets(i): return range(i*RUN,SIZE,4*RUN)
def thp():
    b=mmap.mmap(-1,RUN, mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS); b.madvise(mmap.MADV_HUGEPAGE); b.write(b"\1"*RUN); return b
def shm():
    fd=os.memfd_create("stage"); os.ftruncate(fd,RUN); b=mmap.mmap(fd,RUN); os.close(fd); b.write(b"\1"*RUN); return b
def hash4(v):
    for m in range(0,RUN,MiB): xxhash.xxh3_128_digest(v[m:m+MiB])
def save(make):
    def body(i):
        b=make(); v=memoryview(b)
        for at in offsets(i):
            os.preadv(fd_mem,[b],at); hash4(v); os.pwritev(fd_img,[b],at)
    body.__name__="save_"+make.__name__; return body
def restore(make):
    def body(i):
        b=make(); v=memoryview(b)
        for at in offsets(i):
            os.preadv(fd_img,[b],at); hash4(v); os.pwrite(fd_mem,v,at)
    body.__name__="restore_"+make.__name__; return body
WAYS=[save(thp),save(shm),restore(thp),restore(shm)]
res={w.__name__:[] for w in WAYS}
def run(body):
    os.posix_fadvise(fd_img,0,0,os.POSIX_FADV_DONTNEED)
    r0=resource.getrusage(resource.RUSAGE_SELF); t0=time.perf_counter()
    ts=[threading.Thread(target=body,args=(i,)) for i in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    t=time.perf_counter()-t0; r1=resource.getrusage(resource.RUSAGE_SELF)
    return GIB/t,((r1.ru_utime+r1.ru_stime)-(r0.ru_utime+r0.ru_stime))/GIB
try:
    run(save(thp))
    for r in range(ROUNDS):
        ways=WAYS[r%len(WAYS):]+WAYS[:r%len(WAYS)]
        if r%2: ways=ways[::-1]
        for w in ways: res[w.__name__].append(run(w))
    for k,v in res.items():
        print(f"{k:16s} {st.median(x[0] for x in v):6.2f} GiB/s ({min(x[0] for x in v):.2f}-{max(x[0] for x in v):.2f}) cpu {st.median(x[1] for x in v):.3f} s/GiB")
finally:
    os.close(fd_img); os.unlink(mem); disk.close()
