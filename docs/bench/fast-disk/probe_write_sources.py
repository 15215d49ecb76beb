"""O_DIRECT writes on the fast disk from different sources, plain loops alternated (session 28).

4 threads write 1.5 GiB in 4 MiB O_DIRECT calls into an allocated file on the fast disk
(ext4 on a loop device over tmpfs), each from:
- reuse4k: its own anonymous 4 MiB buffer, 4 KiB pages, used over and over (the bench's
  Python write baseline);
- reusethp: the same on transparent huge pages (migd's staging buffers);
- two_thp: two such buffers in turn;
- mapping_moving: the memory file's mapping (tmpfs, 4 KiB pages, every page mapped),
  each call the next 4 MiB (a save without staging, its mapping already made);
- mapping_reused: one 4 MiB of that mapping per thread, over and over;
- anon_moving: a 1.5 GiB anonymous buffer, each call the next 4 MiB;
- staged_thp: pread of the memory file into a huge-page buffer, then the write (migd's
  staged save without checksums).
Printed: GiB/s and this process's CPU s/GiB, medians (min-max).

    sudo .venv/bin/python docs/bench/fast-disk/probe_write_sources.py [ROUNDS]   # repo root
"""
import mmap, os, resource, sys, threading, time, statistics as st
sys.path.insert(0, os.getcwd())
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
mapping=mmap.mmap(fd_mem,SIZE); view=memoryview(mapping)
for at in range(0,SIZE,MiB): view[at]  # touch: map every page
big=mmap.mmap(-1,SIZE); big.write(b"\x5a"*SIZE); bview=memoryview(big)
def offsets(i): return range(i*RUN,SIZE,4*RUN)
def anon(thp):
    b=mmap.mmap(-1,RUN, mmap.MAP_PRIVATE|mmap.MAP_ANONYMOUS)
    if thp: b.madvise(mmap.MADV_HUGEPAGE)
    b.write(os.urandom(RUN)); return b
def reuse4k(i):
    b=anon(False)
    for at in offsets(i): os.pwritev(fd_img,[b],at)
def reusethp(i):
    b=anon(True)
    for at in offsets(i): os.pwritev(fd_img,[b],at)
def mapping_moving(i):
    for at in offsets(i): os.pwritev(fd_img,[view[at:at+RUN]],at)
def mapping_reused(i):
    src=i*RUN
    for at in offsets(i): os.pwritev(fd_img,[view[src:src+RUN]],at)
def anon_moving(i):
    for at in offsets(i): os.pwritev(fd_img,[bview[at:at+RUN]],at)
def two_thp(i):
    bs=[anon(True),anon(True)]
    for k,at in enumerate(offsets(i)): os.pwritev(fd_img,[bs[k&1]],at)
def staged_thp(i):  # migd's way: pread into a THP buffer, then write
    b=anon(True)
    for at in offsets(i):
        os.preadv(fd_mem,[b],at); os.pwritev(fd_img,[b],at)
WAYS=[reuse4k,reusethp,two_thp,mapping_moving,mapping_reused,anon_moving,staged_thp]
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
    for r in range(ROUNDS):
        ways=WAYS[r%len(WAYS):]+WAYS[:r%len(WAYS)]
        if r%2: ways=ways[::-1]
        for w in ways: res[w.__name__].append(run(w))
    for k,v in res.items():
        print(f"{k:16s} {st.median(x[0] for x in v):6.2f} GiB/s ({min(x[0] for x in v):.2f}-{max(x[0] for x in v):.2f}) cpu {st.median(x[1] for x in v):.3f} s/GiB")
finally:
    os.close(fd_img); os.unlink(mem); disk.close()
