"""The page size (one constant for the whole package) and the I/O sizes of the channel
threads and the zero scan. Below every layer, as errors.py."""

PAGE_SIZE = 4096
# Large I/Os keep O_DIRECT at disk speed; 8 MiB per call is the top of performance.md's range.
CHUNK_PAGES = (8 << 20) // PAGE_SIZE
# Restores read 4 MiB runs. QEMU reads 1 MiB (MAPPED_RAM_LOAD_BUF_SIZE), and so did migd
# until checksums, the cache probe and the populator added work per run: then 2 GiB
# restores ran 1.58-2.11 GiB/s with 1 MiB runs against 1.81-2.39 with 4 MiB and 1.89-2.43
# with 8 MiB (medians of three paired A/B runs of 4-5 rounds, 2026-12-03), and 8
# concurrent restores' query-jobs p99 went from 13-20 ms to 8-16 ms (fewer GIL handoffs
# per MiB: docs/jobs.md). 4 MiB keeps the cache-aware choice (io/residency.py) finer.
READ_CHUNK_PAGES = (4 << 20) // PAGE_SIZE
# A zero run shorter than this is written inline: skipping it would split one large I/O
# into small ones, which costs more on O_DIRECT than writing the zeros (performance.md).
MIN_SKIP_PAGES = (1 << 20) // PAGE_SIZE
