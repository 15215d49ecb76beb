"""The page size (one constant for the whole package) and the I/O sizes of the channel
threads and the zero scan. Below every layer, as errors.py."""

PAGE_SIZE = 4096
# Large I/Os keep O_DIRECT at disk speed; 8 MiB per call is the top of performance.md's range.
CHUNK_PAGES = (8 << 20) // PAGE_SIZE
# Reads do better smaller, as QEMU reads (MAPPED_RAM_LOAD_BUF_SIZE): restoring 4 GiB here,
# 1 MiB reads ran at 1.84 GiB/s against 1.68 with 8 MiB, four runs each, interleaved.
READ_CHUNK_PAGES = (1 << 20) // PAGE_SIZE
# A zero run shorter than this is written inline: skipping it would split one large I/O
# into small ones, which costs more on O_DIRECT than writing the zeros (performance.md).
MIN_SKIP_PAGES = (1 << 20) // PAGE_SIZE
