"""`make mutants`: plant realistic bugs one at a time and check that a test catches each.

Every mutant is a named patch: a file, an exact piece of its text, what replaces it, and
the tests that must then fail. The patches are applied to a temporary copy of the tree
(the working tree is never touched, so an interrupted run leaves nothing behind), and
each must match its file exactly once: a patch whose original text has changed fails
the run loudly instead of silently testing nothing. The selected tests must pass on the
unpatched copy first; then for each mutant they run with `-x` and must fail.

    python -m tests.mutants            # all mutants; exit status 1 if any survives
    python -m tests.mutants NAME...    # only these
    python -m tests.mutants --list     # names and tests, without running anything
    python -m tests.mutants --show     # also print the assertion that caught each
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds per pytest run; a run that hangs this long counts as not caught
# The unmutated run takes every selection at once: its own bound (the whole list's tests
# took more than TIMEOUT once the list grew to 207 mutants, and the run stopped there).
BASELINE_TIMEOUT = 1800

G = "tests/test_bug_guards.py::"
V = "tests/test_vm.py::"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the tree's root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest arguments: node ids


MUTANTS = [
    # --- the seven of issue 13 --------------------------------------------------------
    Mutant(
        "zero-scan-reads-half-of-each-page",
        "migd/io/zero_scan.py",
        "np.bitwise_or.reduce(chunk, axis=1) == 0",
        "np.bitwise_or.reduce(chunk[:, : _WORDS_PER_PAGE // 2], axis=1) == 0",
        (G + "test_a_page_with_one_nonzero_byte_anywhere_is_never_called_zero",),
    ),
    Mutant(
        "staged-zero-scan-reads-half-of-each-page",
        "migd/io/zero_scan.py",
        "np.bitwise_or.reduce(pages, axis=1) == 0",
        "np.bitwise_or.reduce(pages[:, : _WORDS_PER_PAGE // 2], axis=1) == 0",
        (G + "test_a_page_with_one_nonzero_byte_anywhere_is_never_called_zero",),
    ),
    Mutant(
        "allowed-dirs-as-a-string-prefix",
        "migd/state/paths.py",
        'return path == directory or path.startswith(directory.rstrip("/") + "/")',
        'return path.startswith(directory.rstrip("/"))',
        (G + "test_siblings_and_prefixes_of_an_allowed_dir_are_outside",),
    ),
    Mutant(
        "short-write-taken-as-complete",
        "migd/io/threads.py",
        "        data = data[done:]\n        offset += done\n\n\ndef read_fully",
        "        data = data[len(data) :]\n        offset += done\n\n\ndef read_fully",
        (G + "test_a_save_onto_a_filesystem_that_writes_short_keeps_every_byte",),
    ),
    Mutant(
        "first-channel-fd-left-open-on-a-later-open-failure",
        "migd/io/target.py",
        "            for fd in fds:\n                self._openers.close(fd)\n",
        "            for fd in fds[1:]:\n                self._openers.close(fd)\n",
        (G + "test_a_failed_channel_open_leaves_no_fd_open_in_the_daemon",),
    ),
    Mutant(
        "restore-ignores-max-bandwidth",
        "migd/io/threads.py",
        "            self.throttle.wait(len(memory), self.cancel)\n",
        "",
        (G + "test_a_restore_holds_max_bandwidth",),
    ),
    Mutant(
        "remaining-from-the-last-sample",
        "migd/migration/job.py",
        "else (self.total_bytes - done * PAGE_SIZE)",
        "else (self.total_bytes - (self._samples[-1][2] if self._samples else 0) * PAGE_SIZE)",
        (G + "test_remaining_adds_up_with_the_counters_of_the_same_reply",),
    ),
    Mutant(
        "channels-opened-without-o-direct",
        "migd/io/target.py",
        "return open_file(path, flags | (os.O_DIRECT if direct else 0), 0o600)",
        "return open_file(path, flags | (0 if direct else 0), 0o600)",
        (G + "test_direct_io_opens_every_channel_with_o_direct",),
    ),
    # --- the zero scan and the page I/O ---------------------------------------------------
    Mutant(
        "cached-runs-read-with-o-direct",
        "migd/io/threads.py",
        "return cached_fd if cached else self.fd",
        "return self.fd",
        ("tests/test_cache_aware.py::test_a_cached_file_is_read_buffered_with_direct_io",),
    ),
    Mutant(
        "mincore-counts-the-uncached-pages",
        "migd/io/residency.py",
        "return pages - self._vector.raw[:pages].count(0)",
        "return self._vector.raw[:pages].count(0)",
        ("tests/test_cache_aware.py::test_the_probe_counts_the_cached_pages_of_a_range",),
    ),
    Mutant(
        "zero-scan-trusts-its-samples",
        "migd/io/zero_scan.py",
        "reader.zero_pages(address + low * PAGE_SIZE, zero[low:high])",
        "zero[low:high] = True",
        (G + "test_lone_bytes_in_long_zero_runs_survive_save_and_restore",),
    ),
    Mutant(
        "zero-scan-keeps-short-runs",
        "migd/io/zero_scan.py",
        "    short = (stops - starts) < min_run\n",
        "    short = (stops - starts) < 0\n",
        ("tests/test_zero_scan.py::test_zero_scan_finds_exactly_the_long_zero_runs",),
    ),
    Mutant(
        "last-page-of-each-write-not-marked-present",
        "migd/io/threads.py",
        "block.present[first_page + at : first_page + at + pages] = True",
        "block.present[first_page + at : first_page + at + pages - 1] = True",
        ("tests/test_restore.py::test_round_trip_restores_every_byte_and_zeroes_absent_pages",),
    ),
    Mutant(
        "end-of-file-read-as-zeros",
        "migd/io/threads.py",
        "    if got < len(data):\n        raise ChannelError(",
        "    if False:\n        raise ChannelError(",
        ("tests/test_faults.py::test_file_truncated_under_a_running_restore_fails_clearly_and_leaks_nothing",),
    ),
    Mutant(
        "absent-pages-not-zeroed-on-restore",
        "migd/io/threads.py",
        "                block.zero_range(run.first_page * PAGE_SIZE, run.pages * PAGE_SIZE)",
        "                pass",
        ("tests/test_restore.py::test_round_trip_restores_every_byte_and_zeroes_absent_pages",),
    ),
    Mutant(
        "save-ignores-max-bandwidth",
        "migd/io/threads.py",
        "                self.throttle.wait(len(chunk), self.cancel)\n",
        "",
        ("tests/test_save_progress.py::test_max_bandwidth_holds_within_ten_percent",),
    ),
    Mutant(
        "calls-under-a-cap-keep-their-256-kib-floor",
        "migd/io/threads.py",
        "pages = min(pages, int(rate * CALL_SECONDS) // PAGE_SIZE)",
        "pages = min(pages, max(MIN_CALL_PAGES, int(rate * CALL_SECONDS) // PAGE_SIZE))",
        ("tests/test_save_progress.py::test_counters_advance_at_every_poll_under_a_low_cap",),
    ),
    Mutant(
        "no-migration-pass-2-at-the-final-sync",
        "migd/migration/engine.py",
        "            self._pass(job, 2)\n",
        "            job.sync_count = 2\n",
        ("tests/test_migration_pass.py",),
    ),
    # --- the file format --------------------------------------------------------------
    Mutant(
        "bitmap-encoded-msb-first",
        "migd/migration/mapped_ram/format.py",
        'packed = np.packbits(np.asarray(present, dtype=bool), bitorder="little")',
        'packed = np.packbits(np.asarray(present, dtype=bool), bitorder="big")',
        ("tests/test_format.py",),
    ),
    Mutant(
        "bitmap-decoded-one-byte-short",
        "migd/migration/mapped_ram/format.py",
        "    need = _ceil_div(pages, 8)\n    if len(data) < need:",
        "    need = pages // 8\n    if len(data) < need:",
        ("tests/test_format.py",),
    ),
    Mutant(
        "bitmap-count-check-removed",
        "migd/migration/mapped_ram/format.py",
        "    if count != check.present:",
        "    if False:",
        ("tests/test_format.py", "tests/test_metadata_mutations.py"),
    ),
    # --- durability ---------------------------------------------------------------------
    Mutant(
        "channel-fdatasync-skipped",
        "migd/migration/mapped_ram/save.py",
        "    for fd in fds:\n        fdatasync(fd, path)\n",
        "    for fd in fds[:0]:\n        fdatasync(fd, path)\n",
        ("tests/test_durability.py",),
    ),
    Mutant(
        "end-section-written-before-the-bitmaps-are-synced",
        "migd/migration/mapped_ram/save.py",
        "    fdatasync(main_fd, path)\n    _, _, normal, zero, _ = job.totals()",
        "    _, _, normal, zero, _ = job.totals()",
        ("tests/test_durability.py",),
    ),
    # --- which files migd opens -------------------------------------------------------
    Mutant(
        "channel-identity-check-removed",
        "migd/io/target.py",
        "if (st.st_dev, st.st_ino) != (main.st_dev, main.st_ino):",
        "if False:",
        (G + "test_an_fdset_whose_o_direct_fd_is_another_file_is_refused",),
    ),
    Mutant(
        "ownership-check-removed",
        "migd/state/paths.py",
        "    if st.st_uid not in owners:\n        if os.geteuid() in owners:",
        "    if False:\n        if os.geteuid() in owners:",
        ("tests/test_file_ownership.py",),
    ),
    Mutant(
        "group-writable-check-removed",
        "migd/state/paths.py",
        "    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):",
        "    if False:",
        ("tests/test_file_ownership.py",),
    ),
    Mutant(
        "hard-link-check-removed",
        "migd/state/paths.py",
        "    if st.st_nlink != 1:",
        "    if False:",
        ("tests/test_file_ownership.py", "tests/test_file_identity.py"),
    ),
    Mutant(
        "fifo-or-device-opened-before-its-kind-is-refused",
        "migd/state/paths.py",
        "if found is not None and not (stat.S_ISREG(found.st_mode) or stat.S_ISDIR("
        "found.st_mode)):",
        "if False:",
        ("tests/test_file_kinds.py",),
    ),
    Mutant(
        "another-users-symlink-followed",
        "migd/state/paths.py",
        "            if st.st_uid not in owners:\n                where",
        "            if False:\n                where",
        ("tests/test_file_ownership.py",),
    ),
    Mutant(
        "directory-another-user-controls-accepted",
        "migd/state/paths.py",
        "            _check_directory(path, there, st, owners)",
        "            pass",
        ("tests/test_file_ownership.py",),
    ),
    Mutant(
        "held-directory-not-rechecked",
        "migd/state/paths.py",
        "            if not self._allowed(os.path.join(held, name)):",
        "            if False:",
        ("tests/test_path_policy.py",),
    ),
    # --- the job's status machine and cancellation -------------------------------------
    Mutant(
        "status-transitions-unchecked",
        "migd/migration/engine.py",
        "        if status not in TRANSITIONS[job.status]:",
        "        if False:",
        ("tests/test_job_status.py::test_an_illegal_status_change_is_refused_and_changes_nothing",),
    ),
    Mutant(
        "pool-left-without-cancelling-its-threads",
        "migd/io/threads.py",
        "            cancel.set()\n            end_units()\n",
        "            end_units()\n",
        ("tests/test_job_status.py::test_a_job_task_cancelled_under_its_threads_tells_them_to_stop",),
    ),
    Mutant(
        "cancel-during-setup-goes-back-to-active",
        "migd/migration/engine.py",
        "        check_cancel(job)\n        job.setup_done = time.monotonic()",
        "        job.setup_done = time.monotonic()",
        (
            "tests/test_job_status.py::"
            "test_a_cancel_while_a_restore_plans_its_runs_ends_cancelled_memory_untouched",
        ),
    ),
    # --- memory backends, restores ----------------------------------------------------
    Mutant(
        "shrink-check-removed",
        "migd/io/engine.py",
        "        if shrunk is not None:\n            raise shrunk",
        "        if False:\n            raise shrunk",
        (G + "test_a_memory_file_cut_after_its_pages_were_restored_fails_the_restore",),
    ),
    Mutant(
        "room-check-removed",
        "migd/migration/plan.py",
        "        if total > have:",
        "        if False:",
        ("tests/test_restore.py::test_restore_into_a_filesystem_too_small_fails_before_changing_memory",),
    ),
    Mutant(
        "partial-restore-not-marked",
        "migd/migration/engine.py",
        "await job_thread(self.partial.set_all, job.backends, path)",
        "await asyncio.sleep(0)",
        ("tests/test_partial_restore.py",),
    ),
    Mutant(
        "created-file-not-claimed",
        "migd/state/paths.py",
        "            _claim(fd, fcntl.F_WRLCK)\n        st = os.fstat(fd)",
        "            pass\n        st = os.fstat(fd)",
        ("tests/test_file_identity.py::"
         "test_a_file_another_request_is_creating_is_refused_until_that_one_started",),
    ),
    Mutant(
        "a-file-being-created-opened-by-another-request",
        "migd/state/paths.py",
        "    if _claim(fd, fcntl.F_RDLCK) is False:",
        "    if False:",
        ("tests/test_file_identity.py::"
         "test_a_file_another_request_is_creating_is_refused_until_that_one_started",),
    ),
    Mutant(
        "created-file-claim-never-settled",
        "migd/io/target.py",
        "            settle_claim(self._main_fd)",
        "            pass",
        ("tests/test_file_identity.py::"
         "test_a_file_another_request_is_creating_is_refused_until_that_one_started",),
    ),
    Mutant(
        "refused-creator-removes-a-file-another-job-uses",
        "migd/state/paths.py",
        "    if not _claim(fd, fcntl.F_WRLCK):\n        log.info",
        "    if False:\n        log.info",
        ("tests/test_file_identity.py::"
         "test_a_save_refused_after_creating_its_file_leaves_it_to_the_job_that_opened_it",),
    ),
    Mutant(
        "opened-file-not-checked-still-there",
        "migd/state/paths.py",
        "    if os.fstat(fd).st_nlink == 0:",
        "    if False:",
        ("tests/test_file_identity.py::"
         "test_a_file_removed_by_its_creator_just_after_the_open_is_refused",),
    ),
    Mutant(
        "memory-with-no-file-saved-half-restored",
        "migd/state/partial.py",
        "            backend.partial_restore = value\n",
        "            pass\n",
        ("tests/test_partial_restore.py::"
         "test_memory_with_no_file_to_mark_is_not_saved_half_restored_either",),
    ),
    Mutant(
        "idle-time-earns-a-burst-over-the-cap",
        "migd/io/throttle.py",
        "            if self._start + self._granted / self._rate < earliest:",
        "            if False:",
        ("tests/test_jobs.py::test_time_without_io_earns_no_burst_over_a_cap",),
    ),
    Mutant(
        "accepted-cancel-then-completed",
        "migd/migration/engine.py",
        "            await body\n            if job.cancel.is_set():",
        "            await body\n            if False:",
        ("tests/test_job_status.py::"
         "test_a_cancel_accepted_as_a_restore_ends_says_its_memory_is_whole",),
    ),
    Mutant(
        "partial-backend-saved-as-whole",
        "migd/migration/engine.py",
        "        await blocking.to_thread(self.partial.check_save, backends)",
        "        await asyncio.sleep(0)",
        ("tests/test_partial_restore.py::"
         "test_a_backend_a_cancelled_restore_left_partial_is_not_saved_as_whole",),
    ),
    Mutant(
        "restore-during-a-save-start-unseen",
        "migd/migration/engine.py",
        "                if backend.restores_begun != begun:",
        "                if False:",
        ("tests/test_job_status.py::"
         "test_a_save_whose_backend_was_restored_into_while_it_started_is_refused",),
    ),
    # --- the QMP server ---------------------------------------------------------------
    Mutant(
        "reply-queue-bound-removed",
        "migd/qmp/server.py",
        "        if self._unsent.count > REPLY_LIMIT_BYTES:",
        "        if False:",
        ("tests/test_serving.py::test_a_client_whose_unread_events_pass_the_bound_is_dropped",),
    ),
    Mutant(
        "daemon-reply-bound-removed",
        "migd/qmp/server.py",
        "        while self.unsent.count > DAEMON_REPLY_LIMIT_BYTES:",
        "        while False:",
        ("tests/test_serving.py::test_silent_clients_together_cost_a_bounded_amount_and_readers_are_kept",),
    ),
    Mutant(
        "management-dropped-for-others-unread-replies",
        "migd/qmp/server.py",
        "if s.unsent_bytes > 0 and not is_root_or_migd(s.peer_uid) and s.stalled(now)",
        "if s.unsent_bytes > 0 and True and s.stalled(now)",
        ("tests/test_serving.py::test_silent_clients_together_cost_a_bounded_amount_and_readers_are_kept",),
    ),
    Mutant(
        "reading-client-dropped-for-others-unread-replies",
        "migd/qmp/server.py",
        "and not is_root_or_migd(s.peer_uid) and s.stalled(now)",
        "and not is_root_or_migd(s.peer_uid)",
        ("tests/test_serving.py::"
         "test_a_client_of_another_uid_reading_a_large_reply_is_not_dropped_for_others",),
    ),
    Mutant(
        "unsent-bytes-of-an-ended-session-still-counted",
        "migd/qmp/server.py",
        "                self._unsent.drop()  # whatever the writer had not sent counts no more",
        "                pass",
        ("tests/test_serving.py::test_silent_clients_together_cost_a_bounded_amount_and_readers_are_kept",),
    ),
    Mutant(
        "fd-room-counted-for-every-passed-fd",
        "migd/state/fdsets.py",
        "    if table is not None and table <= allowed:",
        "    if False:",
        ("tests/test_fd_passing.py::test_the_room_for_passed_fds_is_counted_only_when_the_fd_table_could_be_full",),
    ),
    Mutant(
        "sessions-not-capped",
        "migd/qmp/server.py",
        "            if len(self.sessions) >= MAX_SESSIONS - (",
        "            if False and len(self.sessions) >= MAX_SESSIONS - (",
        ("tests/test_serving.py::test_connections_over_the_cap_are_closed_and_the_connected_ones_served",),
    ),
    Mutant(
        "replies-checked-only-between-reads",
        "migd/qmp/server.py",
        "            await self._pause_while_replies_unread()\n            if self._unsent",
        "            if self._unsent",
        ("tests/test_serving.py::test_a_client_that_never_reads_its_replies_is_paused_within_a_reply_of_the_bound",),
    ),
    Mutant(
        "opaque-note-unbounded",
        "migd/api/fds.py",
        "if args.opaque is not None and len(args.opaque) > MAX_OPAQUE_CHARS:",
        "if False:",
        ("tests/test_fd_passing.py",),
    ),
    Mutant(
        "object-add-id-not-held",
        "migd/state/memory.py",
        "        self._reserved[id] = block_name\n",
        "",
        ("tests/test_memory.py",),
    ),
    Mutant(
        "closing-session-runs-requests-it-had-read",
        "migd/qmp/server.py",
        "            if self._unsent.dropped or self._closing:",
        "            if self._unsent.dropped:",
        ("tests/test_shutdown_order.py::test_a_closing_session_answers_the_request_it_handles_and_runs_no_other",),
    ),
    Mutant(
        "sessions-served-while-the-job-stops",
        "migd/app/daemon.py",
        "        await self.server.close_sessions(SESSION_GRACE)",
        "        await asyncio.sleep(0)",
        ("tests/test_shutdown_order.py::test_a_request_sent_once_the_job_is_being_cancelled_is_not_run",),
    ),
    Mutant(
        "message-size-limit-removed",
        "migd/qmp/wire.py",
        "        if not self._discarding and len(self._buf) > self._limit:",
        "        if False:",
        ("tests/test_qmp_framing.py",),
    ),
    # --- issue 16: checksums -------------------------------------------------------------
    Mutant(
        "restore-ignores-checksum-mismatch",
        "migd/io/checksums.py",
        "            if want[at : at + DIGEST_BYTES] != got:",
        "            if False:",
        ("tests/test_checksums.py::test_every_bit_flip_in_page_data_fails_the_restore_naming_block_and_offset",),
    ),
    Mutant(
        "absent-pages-left-out-of-the-unit-hash",
        "migd/io/checksums.py",
        "            hasher.update(_ZEROS[: (start - pos) * PAGE_SIZE])",
        "            pass",
        ("tests/test_checksums.py::test_a_save_records_a_checksum_of_every_mib_and_its_restore_is_verified",),
    ),
    Mutant(
        "before-write-skipped",
        "migd/migration/engine.py",
        "                if job.verify_before_write:",
        "                if False:",
        ("tests/test_checksums.py::test_with_verify_before_write_a_flip_changes_no_memory",),
    ),
    Mutant(
        "table-digest-not-checked",
        "migd/migration/mapped_ram/checksum_table.py",
        "    if digest(table).hex() != want_digest:",
        "    if False:",
        ("tests/test_checksums.py::test_a_flip_in_the_checksum_table_or_its_padding_is_refused_before_any_change",),
    ),
    Mutant(
        "extended-file-accepted",
        "migd/migration/mapped_ram/checksum_table.py",
        "    if file_size > end:",
        "    if False:",
        ("tests/test_checksums.py::test_a_file_cut_short_or_extended_is_refused_before_any_change",),
    ),
    Mutant(
        "memory-file-hashed-from-the-wrong-offset",
        "migd/io/checksums.py",
        "reader.pread(fd, page * PAGE_SIZE, count)",
        "reader.pread(fd, page * PAGE_SIZE // 2, count)",
        # A buffered save hashes its file now (session 13): a buffered restore's check
        # reads the memory file back.
        ("tests/test_checksums_changing_memory.py::"
         "test_a_buffered_save_records_the_checksums_of_what_its_file_holds",),
    ),
    Mutant(
        "readahead-left-on-for-cached-reads",
        "migd/io/threads.py",
        "            os.posix_fadvise(transfer.cached_fd, 0, 0, os.POSIX_FADV_RANDOM)",
        "            pass",
        ("tests/test_cache_aware.py::test_the_buffered_fd_reads_no_further_than_asked",),
    ),
    Mutant(
        "hashing-fault-left-unexplained",
        "migd/io/checksums.py",
        "                    explain = block.explain_fault\n",
        "                    explain = None\n",
        ("tests/test_shrink.py::test_a_memory_file_cut_short_while_units_wait_for_hashing_names_the_backend",),
    ),
    # --- many jobs (issue 17) ---------------------------------------------------------------
    Mutant(
        "workers-as-urgent-as-the-event-loop",
        "migd/io/threads.py",
        "WORKER_NICE = 5\n",
        "WORKER_NICE = 0\n",
        ("tests/test_worker_pool.py::test_workers_run_nicer_than_the_event_loop_thread_and_are_named_after_their_work",),
    ),
    Mutant(
        "populator-maps-runs-the-channels-took",
        "migd/io/threads.py",
        "                if index <= self.cursor.taken:\n",
        "                if False:\n",
        ("tests/test_worker_pool.py::test_the_populator_maps_only_runs_ahead_of_the_channels",),
    ),
    # --- whole-VM images (issue 18) ----------------------------------------------------
    Mutant(
        "vm-device-state-digest-unchecked",
        "migd/tools/vm.py",
        "    if vm_image.device_digest(fd, header.device) != header.device.sha256:\n        raise",
        "    if False:\n        raise",
        (V + "test_a_damaged_image_is_refused_before_anything_is_written[device byte]",),
    ),
    Mutant(
        "vm-ram-part-of-another-save-accepted",
        "migd/tools/vm.py",
        "    if ram.save_id != header.ram.save_id:",
        "    if False:",
        (V + "test_a_damaged_image_is_refused_before_anything_is_written[other ram part]",),
    ),
    Mutant(
        "vm-header-write-cut-short-unnoticed",
        "migd/tools/vm.py",
        "        _pwrite_all(fd, vm_image.encode(header), 0)",
        "        os.pwrite(fd, vm_image.encode(header), 0)",
        ("tests/test_vm_disk_full.py",),
    ),
    Mutant(
        "vm-restore-into-a-used-incoming-qemu",
        "migd/tools/vm.py",
        "        await _check_incoming_unused(qemu)\n",
        "",
        ("tests/test_vm_incoming.py",),
    ),
    Mutant(
        "verify-of-a-vm-image-checks-only-its-ram",
        "migd/app/cli.py",
        "        image = _vm_image_to_verify(path, offset)",
        "        image = None",
        ("tests/test_vm_verify.py",),
    ),
    Mutant(
        "vm-backend-size-unchecked",
        "migd/tools/vm.py",
        "        elif b.size != entry.size:",
        "        elif False:",
        (V + "test_a_mismatched_qemu_is_refused_before_anything_is_written[other size]",),
    ),
    Mutant(
        "vm-qemu-settings-left-changed",
        "migd/tools/vm.py",
        '        if not (done and opts.after == "quit"):\n            await settings.restore()',
        "        if False:\n            await settings.restore()",
        ("tests/test_vm_red_team.py::"
         "test_ctrl_c_while_qemu_writes_its_part_cancels_it_and_puts_the_settings_back",),
    ),
    Mutant(
        "vm-failed-save-leaves-the-guest-stopped",
        "migd/tools/vm.py",
        "        if not done and stopped and was_running:",
        "        if False:",
        (V + "test_a_save_that_fails_keeps_the_old_image_and_runs_the_vm_again",),
    ),
    Mutant(
        "vm-restore-names-the-image-to-migd",
        "migd/tools/vm.py",
        'f"file:/dev/fdset/{migd_fdset},offset={header.ram.offset}"',
        'f"file:{image},offset={header.ram.offset}"',
        (V + "test_restore_reads_the_image_it_checked_even_if_its_name_is_replaced",),
    ),
    Mutant(
        "vm-save-renames-whatever-the-temporary-name-is",
        "migd/tools/vm.py",
        "        _check_still_named(tmp, fd)\n",
        "",
        (V + "test_a_temporary_file_replaced_during_the_save_is_not_renamed_into_place",),
    ),
    # --- live save (issue 18): the update must find and save whatever changed -----------
    Mutant(
        "update-keeps-the-bits-of-pages-that-are-zero-now",
        "migd/migration/plan.py",
        "        block.present &= ~mask\n",
        "",
        ("tests/test_save_update.py::"
         "test_an_update_saves_what_changed_and_restores_the_memory_as_it_is_now",),
    ),
    # --- staged saves (issue 19): through a buffer, never the mapping ---------------------
    Mutant(
        "staged-save-hashes-each-unit-from-the-pieces-start",
        "migd/io/checksums.py",
        "at = (unit * UNIT_PAGES - first_page) * PAGE_SIZE",
        "at = 0",
        ("tests/test_save_staging.py::"
         "test_staged_and_mapped_saves_make_the_same_file_and_it_restores_verified",),
    ),
    Mutant(
        "staged-save-memory-still-populated",
        "migd/io/threads.py",
        " and run.block not in unmapped\n",
        "\n",
        ("tests/test_save_staging.py::"
         "test_a_direct_io_save_maps_none_of_the_memory_only_through_staging",),
    ),
    Mutant(
        "huge-pages-from-the-system-setting-only",
        "migd/state/memory.py",
        'return (option if option is not None else system) in ("always", "within_size")',
        'return system in ("always", "within_size")',
        ("tests/test_save_staging.py::test_which_memory_files_count_as_on_huge_pages",),
    ),
    Mutant(
        "staged-restore-stores-before-checking",
        "migd/io/threads.py",
        "        rest = sums.landed(run.block, run.first_page, data) if sums is not None else []\n"
        "        with self.store_lock:\n"
        "            started = time.thread_time()\n"
        "            store(data, run.first_page * PAGE_SIZE)\n"
        "            self.pages.wrote(len(data), time.thread_time() - started)\n",
        "        with self.store_lock:\n"
        "            started = time.thread_time()\n"
        "            store(data, run.first_page * PAGE_SIZE)\n"
        "            self.pages.wrote(len(data), time.thread_time() - started)\n"
        "        rest = sums.landed(run.block, run.first_page, data) if sums is not None else []\n",
        ("tests/test_save_staging.py::test_a_corrupt_unit_never_reaches_used_memory",),
    ),
    Mutant(
        "pages-written-through-not-checked-for-holes",
        "migd/io/engine.py",
        "            check_stored(block)\n",
        "            pass\n",
        ("tests/test_save_staging.py::test_pages_lost_from_a_file_written_through_are_found_after_the_restore",),
    ),
    Mutant(
        "staged-restore-memory-still-populated",
        "migd/migration/plan.py",
        "backend.allocate if stage else backend.populate,",
        "backend.populate,",
        ("tests/test_save_staging.py::test_a_restore_into_used_memory_maps_none_of_it",),
    ),
    Mutant(
        "restore-staging-buffers-unmapped-not-kept",
        "migd/io/threads.py",
        "        STAGING.give([buffer for buffer, _ in self.restore_buffers])\n",
        "        [buffer.close() for buffer, _ in self.restore_buffers]\n",
        ("tests/test_staging_pool.py::"
         "test_restores_reuse_the_buffers_and_an_idle_daemon_lets_them_go",),
    ),
    Mutant(
        "migrate-launches-on-backends-deleted-meanwhile",
        "migd/migration/engine.py",
        "            _refuse_changed_backends(candidates, admit())\n",
        "            admit()\n",
        ("tests/test_file_identity.py::"
         "test_a_backend_deleted_while_a_migration_starts_makes_it_refused",),
    ),
    Mutant(
        "buffered-save-hashes-memory-not-its-file",
        "migd/migration/engine.py",
        "                            job.checksums.set_file(read_fd)\n",
        "                            pass\n",
        ("tests/test_checksums_changing_memory.py::"
         "test_a_buffered_save_records_the_checksums_of_what_its_file_holds",),
    ),
    Mutant(
        "restore-mismatch-never-read-back-from-the-file",
        "migd/migration/engine.py",
        "                job.checksums.set_file(main_fd)  # tells changed memory from a bad file\n",
        "                pass\n",
        ("tests/test_checksums_changing_memory.py::"
         "test_a_restore_whose_memory_changes_under_it_blames_the_memory_not_the_file",),
    ),
    Mutant(
        "vm-trusts-a-mem-path-its-qemu-does-not-map",
        "migd/tools/qemu_peer.py",
        "        if not (_maps_shared_writable(peer.pid, st) and peer.alive()):\n",
        "        if False:\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_a_qemu_naming_a_file_it_does_not_map_is_refused_before_the_guest_stops",),
    ),
    Mutant(
        "vm-header-size-found-after-the-downtime",
        "migd/tools/vm.py",
        "        vm_image.encode(trial)\n",
        "        pass\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_names_too_long_for_the_header_are_refused_before_the_guest_stops",),
    ),
    Mutant(
        "vm-device-state-magic-not-checked",
        "migd/tools/vm.py",
        "    if os.pread(source, len(QEMU_STREAM_MAGIC), 0) != QEMU_STREAM_MAGIC:\n",
        "    if False:\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_a_device_state_that_is_not_a_qemu_stream_fails_the_save_and_the_guest_runs_again",),
    ),
    Mutant(
        "vmdescription-without-migd-object-read-as-qemus",
        "migd/migration/mapped_ram/format.py",
        "    if \"migd\" not in desc:\n",
        "    if False:\n",
        ("tests/test_format.py::"
         "test_a_vmdescription_right_after_the_ram_end_without_migd_object_is_refused",),
    ),
    Mutant(
        "migd-object-unknown-keys-ignored",
        "migd/migration/mapped_ram/format.py",
        "        unknown = sorted(set(migd) - _MIGD_KEYS)\n",
        "        unknown = []\n",
        ("tests/test_format.py::"
         "test_a_migd_object_with_a_flipped_key_or_a_bad_save_id_is_refused",),
    ),
    Mutant(
        "inspect-does-not-check-bitmaps",
        "migd/tools/inspect.py",
        "                    format.check_bitmap(reader, b)\n",
        "                    pass\n",
        ("tests/test_inspect.py::"
         "test_a_corrupt_bitmap_is_reported_as_restore_would_refuse_it",),
    ),
    Mutant(
        "save-into-a-file-others-may-read",
        "migd/migration/engine.py",
        "            await blocking.to_thread(target.refuse_shared)\n",
        "",
        ("tests/test_file_ownership.py::"
         "test_an_existing_save_file_readable_by_others_is_refused",),
    ),
    Mutant(
        "restore-into-memory-others-may-read",
        "migd/migration/engine.py",
        "                await blocking.to_thread(_refuse_readable_memory, backend)\n",
        "                pass\n",
        ("tests/test_restore_private_memory.py::"
         "test_a_restore_into_a_memory_file_others_may_read_is_refused",),
    ),
    Mutant(
        "socket-path-links-and-ancestors-unchecked",
        "migd/qmp/server.py",
        "        real, _ = resolve_trusted(path, {0, os.geteuid()})\n",
        "        real = os.path.realpath(path)\n",
        ("tests/test_file_ownership.py::"
         "test_a_socket_path_through_another_users_link_or_directory_is_refused",),
    ),
    Mutant(
        "client-trusts-any-socket-server",
        "migd/tools/client.py",
        "    if uid not in (0, os.geteuid()):\n",
        "    if False:\n",
        ("tests/test_file_ownership.py::"
         "test_the_client_refuses_a_socket_served_by_another_user",),
    ),
    Mutant(
        "vm-peer-pid-trusted-after-its-listener-exited",
        "migd/tools/qemu_peer.py",
        "                        return int(line.split()[1]) == self.pid\n",
        "                        return True\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_a_socket_whose_listener_exited_is_not_taken_for_any_process_with_its_pid",),
    ),
    Mutant(
        "passed-save-file-named-by-its-fdset-number",
        "migd/io/target.py",
        "        self._name = file_name(self.path, fd)\n",
        "        self._name = self.path\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_a_restore_that_failed_half_way_is_retried_with_accept_partial",),
    ),
    Mutant(
        "client-dies-on-sighup-leaving-its-backend",
        "migd/tools/client.py",
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):",
        "for sig in (signal.SIGINT, signal.SIGTERM):",
        ("tests/test_cli_client.py::"
         "test_ctrl_c_during_a_save_cancels_it_and_exits_1",),
    ),
    Mutant(
        "save-probe-reopens-its-scratch-file-by-name",
        "migd/tools/client.py",
        "                fcntl.fcntl(fd, fcntl.F_SETFL, "
        "fcntl.fcntl(fd, fcntl.F_GETFL) | o_direct)\n",
        "                os.close(fd)\n"
        "                fd = os.open(probe, os.O_WRONLY | o_direct)\n",
        ("tests/test_cli_client.py::"
         "test_the_direct_io_probe_never_writes_through_a_link_swapped_in",),
    ),
    Mutant(
        "save-cut-at-its-ram-end-read-as-qemus",
        "migd/migration/mapped_ram/format.py",
        "a flipped page and all (red-team, session 14).\n        raise FormatError(",
        "a flipped page and all (red-team, session 14).\n"
        "        return None\n        raise FormatError(",
        ("tests/test_format.py::"
         "test_a_migd_save_cut_at_its_ram_end_is_incomplete_not_qemus",),
    ),
    Mutant(
        "sessions-reserve-open-to-any-uid",
        "migd/qmp/server.py",
        "                0 if is_root_or_migd(uid) else ROOT_RESERVED_SESSIONS\n",
        "                0\n",
        ("tests/test_serving.py::"
         "test_the_last_sessions_are_kept_for_root_and_migds_own_clients",),
    ),
    Mutant(
        "files-of-migds-uid-trusted-for-any-client",
        "migd/state/paths.py",
        "    if peer_uid is None or is_root_or_migd(peer_uid):\n",
        "    if True:\n",
        ("tests/test_file_ownership.py::"
         "test_a_client_of_another_uid_cannot_reach_another_instances_memory",),
    ),
    Mutant(
        "group-writable-directory-trusted-on-the-way",
        "migd/state/paths.py",
        "    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:",
        "    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:",
        ("tests/test_file_ownership.py::"
         "test_a_directory_another_user_can_change_is_refused",),
    ),
    Mutant(
        "open-follows-a-link-swapped-in-after-the-walk",
        "migd/state/paths.py",
        "fd = open_file(real, flags | os.O_NONBLOCK | os.O_NOFOLLOW, 0o600)",
        "fd = open_file(real, flags | os.O_NONBLOCK, 0o600)",
        ("tests/test_file_ownership.py::"
         "test_a_link_swapped_in_after_the_walk_is_not_followed",),
    ),
    Mutant(
        "group-readable-save-file-accepted",
        "migd/io/target.py",
        "        if mode & 0o077:\n",
        "        if mode & 0o007:\n",
        ("tests/test_file_ownership.py::"
         "test_an_existing_save_file_readable_by_others_is_refused",),
    ),
    Mutant(
        "restore-into-a-group-readable-memory-file",
        "migd/migration/engine.py",
        "    if mode & 0o044:\n",
        "    if mode & 0o004:\n",
        ("tests/test_restore_private_memory.py::"
         "test_a_restore_into_a_memory_file_others_may_read_is_refused",),
    ),
    Mutant(
        "socket-directory-writable-by-its-group-accepted",
        "migd/qmp/server.py",
        "    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):\n        raise MigdError(",
        "    if st.st_mode & stat.S_IWOTH:\n        raise MigdError(",
        ("tests/test_file_ownership.py::"
         "test_a_socket_directory_its_group_may_write_is_refused_sticky_or_not",),
    ),
    Mutant(
        "fdset-dup-keeps-the-passed-fds-o-append",
        "migd/state/fdsets.py",
        "            fcntl.fcntl(dup, fcntl.F_SETFL, flags)\n",
        "",
        ("tests/test_fd_passing.py::"
         "test_a_save_through_an_o_append_fd_keeps_the_layout",),
    ),
    Mutant(
        "fdset-dups-inherited-across-exec",
        "migd/state/fdsets.py",
        "fcntl.fcntl(chosen, fcntl.F_DUPFD_CLOEXEC, 0)",
        "fcntl.fcntl(chosen, fcntl.F_DUPFD, 0)",
        ("tests/test_fd_passing.py::"
         "test_the_dups_an_fdset_hands_out_are_close_on_exec",),
    ),
    Mutant(
        "partial-mark-not-fsynced",
        "migd/state/partial.py",
        "                os.fsync(fd)  # an xattr is inode metadata",
        "                pass  # an xattr is inode metadata",
        ("tests/test_durability.py::"
         "test_the_partial_mark_is_fsynced_before_a_restore_changes_memory",),
    ),
    Mutant(
        "job-multifd-channels-zero-accepted",
        "migd/api/jobs.py",
        "        if self.multifd_channels == 0:",
        "        if self.multifd_channels is None and False:",
        ("tests/test_jobs.py::"
         "test_a_job_with_zero_multifd_channels_is_refused_with_qemus_text",),
    ),
    Mutant(
        "io-slot-kept-by-a-call-that-raises",
        "migd/io/share.py",
        "        try:\n            yield got\n        finally:\n            if got:\n"
        "                self._release(job)\n",
        "        yield got\n        if got:\n            self._release(job)\n",
        ("tests/test_jobs.py::test_an_io_call_that_raises_gives_its_slot_back",),
    ),
    Mutant(
        "stray-closing-brace-stalls-the-session",
        "migd/qmp/wire.py",
        "                if self._depth <= 0:\n",
        "                if self._depth == 0:\n",
        ("tests/test_qmp_wire.py::"
         "test_a_stray_closing_brace_is_answered_and_the_next_requests_are_read",),
    ),
    Mutant(
        "vm-image-table-digest-unchecked",
        "migd/tools/vm.py",
        "    if digest != header.ram.table_digest:\n",
        "    if False:\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_a_ram_part_whose_checksum_table_is_not_the_one_saved_is_refused_before_writing",),
    ),
    Mutant(
        "vm-image-overlapping-parts-accepted",
        "migd/tools/vm_image.py",
        "        if header.device.offset + header.device.length > header.ram.offset:\n",
        "        if False:\n",
        ("tests/test_vm_hostile_qemu.py::"
         "test_an_image_header_whose_device_state_overlaps_the_ram_part_is_malformed",),
    ),
    Mutant(
        "restore-into-a-backend-a-save-reads",
        "migd/migration/engine.py",
        "            self._check_backends_free([b for _, b in matched])\n",
        "",
        ("tests/test_jobs.py::"
         "test_a_restore_into_a_backend_a_running_save_reads_is_refused_naming_the_job",),
    ),
    Mutant(
        "room-check-counts-one-backend-per-filesystem",
        "migd/migration/plan.py",
        "by_device[dev] = (total + needed, have + allocated, [*names, backend.id])",
        "by_device[dev] = (needed, have + allocated, [*names, backend.id])",
        ("tests/test_restore.py::test_backends_sharing_a_filesystem_must_fit_in_it_together",),
    ),
    Mutant(
        "staged-unit-hashing-counts-from-the-unit-a-run-begins-in",
        "migd/io/checksums.py",
        "            unit = -(-first_page // UNIT_PAGES)\n",
        "            unit = first_page // UNIT_PAGES\n",
        ("tests/test_save_staging.py::"
         "test_a_memory_file_whose_data_starts_pages_in_saves_staged_and_restores_verified",),
    ),
    Mutant(
        "silent-clients-under-the-pause-bound-never-dropped",
        "migd/qmp/server.py",
        "            if biggest is None:\n                return\n",
        "            if biggest is None or biggest.unsent_bytes <= REPLY_PAUSE_BYTES:\n"
        "                return\n",
        ("tests/test_serving.py::"
         "test_many_silent_clients_each_under_the_pause_bound_are_bounded_together",),
    ),
    Mutant(
        "backends-walked-while-other-clients-change-them",
        "migd/state/memory.py",
        "        for other in list(self._backends.values()):",
        "        for other in self._backends.values():",
        ("tests/test_session_races.py::"
         "test_an_object_add_whose_check_another_client_overtakes_sees_a_copy",),
    ),
    Mutant(
        "object-del-unmaps-on-the-event-loop",
        "migd/api/memory.py",
        "\n    await blocking.to_thread(backend.close)",
        "\n    backend.close()",
        ("tests/test_session_races.py::"
         "test_another_client_is_answered_while_object_del_unmaps_a_backend",),
    ),
    Mutant(
        "remove-fd-closes-on-the-event-loop",
        "migd/api/fds.py",
        "    await blocking.to_thread(ctx.services.fdsets.remove_fd, args.fdset_id, args.fd, uid)",
        "    ctx.services.fdsets.remove_fd(args.fdset_id, args.fd, uid)",
        ("tests/test_session_races.py::"
         "test_another_client_is_answered_while_a_passed_fd_is_closed",),
    ),
    Mutant(
        "unused-passed-fds-closed-on-the-event-loop",
        "migd/qmp/server.py",
        "        await _close_off_loop(unused)",
        "        close_fds(unused)",
        ("tests/test_session_races.py::"
         "test_another_client_is_answered_while_a_clients_unused_fds_are_closed",),
    ),
    Mutant(
        "page-writes-append-under-o-append",
        "migd/state/fdsets.py",
        "            return os.pwritev(fd, [data], offset, RWF_NOAPPEND)",
        "            return os.pwritev(fd, [data], offset)",
        ("tests/test_session_races.py::"
         "test_a_restore_into_a_passed_memfd_lands_though_its_holder_set_o_append",),
    ),
    Mutant(
        "memory-file-sized-without-the-lock",
        "migd/state/memory.py",
        "        extending = _lock_extending(fd, mem_path)",
        "        extending = False",
        ("tests/test_session_races.py::"
         "test_two_object_adds_extending_one_empty_file_at_once_never_cut_the_added_one",),
    ),
    Mutant(
        "lone-surrogates-written-as-escapes",
        "migd/qmp/wire.py",
        '    if "\\\\ud" in text:',
        "    if False:",
        ("tests/test_session_races.py::"
         "test_a_reply_naming_a_file_whose_name_is_not_utf8_is_json_qemu_reads",),
    ),
    Mutant(
        "failed-save-keeps-its-end-section",
        "migd/migration/mapped_ram/save.py",
        "    except BaseException:\n        withdraw_end(job, layout, main_fd)\n        raise",
        "    except BaseException:\n        raise",
        ("tests/test_crash_consistency.py::"
         "test_a_save_whose_final_sync_fails_leaves_no_complete_file",),
    ),
    Mutant(
        "new-save-file-directory-not-synced",
        "migd/migration/mapped_ram/save.py",
        "    job.target.sync_name()  # a new",
        "    pass  # a new",
        ("tests/test_durability.py::"
         "test_a_save_to_a_new_file_syncs_its_directory_before_completed",),
    ),
    Mutant(
        "vm-save-misses-a-resume-by-another-client",
        "migd/tools/vm.py",
        "        await _check_still_stopped(qemu, resumes)",
        "        pass",
        ("tests/test_vm_red_team.py::"
         "test_a_guest_another_client_resumes_during_the_save_gives_no_image",),
    ),
    Mutant(
        "vm-restore-misses-another-clients-migrate-incoming",
        "migd/tools/vm.py",
        "            await _check_before_load(qemu, watch)\n            await _load_device_state(",
        "            await _load_device_state(",
        ("tests/test_vm_concurrent.py::"
         "test_a_migrate_incoming_by_another_client_during_a_restore_fails_it_naming_that",),
    ),
    Mutant(
        "vm-save-takes-no-lock-of-the-vm",
        "migd/tools/vm.py",
        "        lock_vm(backends, ram_fds, locks)\n",
        "        pass\n",
        ("tests/test_vm_concurrent.py::"
         "test_a_second_vm_save_of_the_same_vm_through_another_socket_fails_fast",),
    ),
    Mutant(
        "vm-save-ctrl-c-skips-qemus-cancel",
        "migd/tools/vm.py",
        "            if interrupted() and qemu not in _SILENT:",
        "            if False:",
        ("tests/test_vm_red_team.py::"
         "test_ctrl_c_while_qemu_writes_its_part_cancels_it_and_puts_the_settings_back",),
    ),
    Mutant(
        "vm-save-keeps-qemus-settings-until-the-end",
        "migd/tools/vm.py",
        "        await settings.restore()  # QEMU's part is written",
        "        pass  # QEMU's part is written",
        ("tests/test_vm_red_team.py::"
         "test_a_killed_vm_save_leaves_qemu_without_x_ignore_shared",),
    ),
    Mutant(
        "vm-restore-opens-any-image",
        "migd/tools/vm.py",
        "    fd = _open_image(image)",
        "    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)",
        ("tests/test_vm_red_team.py::"
         "test_an_image_another_user_could_have_planted_is_refused_by_vm_restore",),
    ),
    Mutant(
        "inspect-takes-an-unfinished-vm-save-for-foreign",
        "migd/tools/vm.py",
        "    return vm_image.is_image(fd) or vm_image.is_unfinished(fd)",
        "    return vm_image.is_image(fd)",
        ("tests/test_vm_red_team.py::"
         "test_inspect_of_a_save_killed_before_its_header_says_the_save_did_not_finish",),
    ),
    Mutant(
        "default-executor-of-six-threads",
        "migd/app/daemon.py",
        "DEFAULT_EXECUTOR_THREADS = 64\n",
        "DEFAULT_EXECUTOR_THREADS = 6\n",
        ("tests/test_faults.py::"
         "test_requests_stuck_on_a_dead_filesystem_do_not_hold_other_clients",),
    ),
    Mutant(
        "scoped-session-not-released",
        "migd/app/daemon.py",
        "        if not scope or (self._stop is not None and self._stop.is_set()):",
        "        if True:",
        ("tests/test_session_scope.py::"
         "test_a_scoped_session_s_backend_fdset_and_running_job_go_with_its_connection",),
    ),
    Mutant(
        "scoped-session-job-not-cancelled",
        "migd/api/scope.py",
        "                engine.cancel_job(job.id)",
        "                pass",
        ("tests/test_session_scope.py::"
         "test_a_scoped_session_s_backend_fdset_and_running_job_go_with_its_connection",),
    ),
    Mutant(
        "scope-deletes-a-backend-another-job-uses",
        "migd/api/scope.py",
        "        if owner is not None:",
        "        if False:",
        ("tests/test_session_scope.py::"
         "test_a_backend_another_session_s_job_uses_is_left",),
    ),
    Mutant(
        "scope-deletes-by-name",
        "migd/api/scope.py",
        "        if not any(b is backend for b in memory):",
        "        if not any(b.id == backend.id for b in memory):",
        ("tests/test_session_scope.py::"
         "test_what_the_client_deleted_itself_or_another_session_reused_is_left",),
    ),
    Mutant(
        "vm-save-not-scoped",
        "migd/tools/vm.py",
        "        migd = await connect(opts.socket, scoped=True)\n        tmp, fd",
        "        migd = await connect(opts.socket)\n        tmp, fd",
        ("tests/test_vm_red_team.py::"
         "test_a_killed_vm_save_leaves_nothing_of_it_in_migd",),
    ),
    Mutant(
        "passed-pipe-taken-for-a-file",
        "migd/io/target.py",
        "            _refuse_stream(self.path, fd, openers)\n",
        "            pass\n",
        ("tests/test_fd_passing.py::"
         "test_a_pipe_passed_as_the_file_is_refused_at_once_naming_it",),
    ),
    Mutant(
        "gone-clients-fds-closed-on-the-event-loop",
        "migd/qmp/server.py",
        "            self.server.close_later(fds)\n",
        "            close_fds(fds)\n",
        ("tests/test_session_races.py::"
         "test_another_client_is_answered_while_a_gone_clients_unused_fds_are_closed",),
    ),
    Mutant(
        "other-uids-share-the-default-executor",
        "migd/io/blocking.py",
        "    if uid is None or is_root_or_migd(uid):\n",
        "    if True:\n",
        ("tests/test_faults.py::"
         "test_one_uids_requests_stuck_on_a_dead_filesystem_do_not_hold_other_uids",),
    ),
    Mutant(
        "uid-pools-kept-for-the-daemons-life",
        "migd/io/blocking.py",
        "        if pool.pending > 0 or self._pools.get((uid, kind)) is not pool:\n",
        "        if True:\n",
        ("tests/test_uid_pools.py::test_a_uids_pool_is_let_go_once_its_calls_are_done",
         "tests/test_long_run.py"),
    ),
    Mutant(
        "other-uids-backends-uncapped-together",
        "migd/state/memory.py",
        "        if len(self._owners) >= OTHER_UIDS_MAX_BACKENDS:\n",
        "        if False:\n",
        ("tests/test_uid_backends.py::test_other_uids_together_list_at_most_their_backends",),
    ),
    Mutant(
        "other-uids-jobs-uncapped-together",
        "migd/migration/engine.py",
        "            if others >= OTHER_UIDS_MAX_JOBS:\n",
        "            if False:\n",
        ("tests/test_uid_jobs.py::"
         "test_many_uids_jobs_together_do_not_grow_the_job_table_for_ever",),
    ),
    Mutant(
        "other-uids-passed-fds-share-roots-cap",
        "migd/state/fdsets.py",
        "    if capped:\n        allowed //= 2\n",
        "    if False:\n        allowed //= 2\n",
        ("tests/test_uid_backends.py::test_one_uids_passed_fds_leave_root_room_to_pass_its_own",),
    ),
    Mutant(
        "other-uids-job-fds-unbounded",
        "migd/migration/engine.py",
        "        if held + _job_fds(settings) > budget:\n",
        "        if False:\n",
        ("tests/test_uid_jobs.py::test_other_uids_running_jobs_hold_a_bounded_share_of_fds",),
    ),
    Mutant(
        "sessions-run-as-the-daemon",
        "migd/qmp/server.py",
        "        blocking.serve_uid(session.peer_uid)\n",
        "",
        ("tests/test_faults.py::"
         "test_one_uids_requests_stuck_on_a_dead_filesystem_do_not_hold_other_uids",),
    ),
    Mutant(
        "shutdown-closes-a-stuck-jobs-backends",
        "migd/state/memory.py",
        "            if backend.in_use == 0:\n",
        "            if True:\n",
        ("tests/test_shutdown_order.py::"
         "test_a_backend_a_stuck_job_thread_uses_is_left_open_at_shutdown",),
    ),
    Mutant(
        "shutdown-waits-for-closes-for-ever",
        "migd/qmp/server.py",
        "            _, late = await asyncio.wait(set(self._fd_closes), timeout=FD_CLOSE_WAIT)\n",
        "            _, late = await asyncio.wait(set(self._fd_closes)), None\n",
        ("tests/test_faults.py::"
         "test_shutdown_goes_on_while_the_close_of_a_clients_unused_fd_waits",),
    ),
    Mutant(
        "gone-clients-fds-closed-behind-stuck-calls",
        "migd/qmp/server.py",
        "        closing = blocking.submit_cleanup(close_fds, fds)\n",
        "        closing = blocking.submit(close_fds, fds)\n",
        ("tests/test_faults.py::"
         "test_a_gone_clients_fds_are_closed_while_its_uids_calls_are_stuck",),
    ),
    Mutant(
        "job-file-not-held-against-other-processes",
        "migd/migration/engine.py",
        '        if target.hold(writes=direction == "save") is False:\n',
        "        if False:\n",
        ("tests/test_file_identity.py::"
         "test_two_migd_processes_never_run_jobs_on_one_file_that_either_writes",),
    ),
    Mutant(
        "memory-file-not-held-against-other-processes",
        "migd/migration/engine.py",
        "            if refusal is None and hold_for_job(fd, writes) is False:\n",
        "            if False:\n",
        ("tests/test_file_identity.py::"
         "test_two_migd_processes_never_run_jobs_on_one_memory_file_that_either_writes",),
    ),
    Mutant(
        "verify-of-a-file-a-save-writes-says-interrupted",
        "migd/tools/inspect.py",
        "    if written_by_a_job(fd):\n",
        "    if False:\n",
        ("tests/test_verify_cli.py::"
         "test_a_file_a_running_save_writes_is_said_to_be_written_not_interrupted",),
    ),
    Mutant(
        "save-into-another-processs-memory-file",
        "migd/migration/engine.py",
        '        if direction == "save" and mapped_as_memory(fd):\n',
        "        if False:\n",
        ("tests/test_file_identity.py::"
         "test_a_save_into_another_migd_processs_memory_file_is_refused",),
    ),
    Mutant(
        "job-holds-its-files-past-its-announced-end",
        "migd/migration/engine.py",
        "        await job_cleanup_thread(_let_go, job.target.close, job.memory_holds)\n"
        "        self._set_status(job, status)\n",
        "        self._set_status(job, status)\n",
        ("tests/test_file_identity.py::"
         "test_a_job_lets_go_of_its_files_before_its_end_goes_out",),
    ),
    Mutant(
        "partial-marks-beside-each-socket",
        "migd/app/daemon.py",
        "SIDECAR_DIR), shared_dir()",
        "SIDECAR_DIR), None",
        ("tests/test_partial_restore.py::"
         "test_on_ramfs_a_daemon_sees_another_daemons_mark_whatever_its_socket_dir",),
    ),
    Mutant(
        "partial-mark-of-another-uid-trusted",
        "migd/state/partial.py",
        "if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:",
        "if not stat.S_ISREG(st.st_mode):",
        ("tests/test_partial_restore.py::"
         "test_a_non_root_daemons_mark_is_seen_by_roots_and_squats_are_not_marks",),
    ),
    Mutant(
        "older-0700-marks-dir-kept-closed",
        "migd/state/partial.py",
        "            os.chmod(self.shared, 0o1777)\n",
        "            pass\n",
        ("tests/test_partial_restore.py::"
         "test_a_non_root_daemons_mark_is_seen_by_roots_and_squats_are_not_marks",),
    ),
    Mutant(
        "shared-marks-dir-of-another-user-trusted",
        "migd/state/partial.py",
        "            problem = _shared_dir_problem(st, euid)\n",
        "            problem = None\n",
        ("tests/test_partial_restore.py::"
         "test_a_shared_marks_directory_another_user_could_change_is_refused",),
    ),
    Mutant(
        "object-add-of-a-file-another-processs-job-writes",
        "migd/state/memory.py",
        "        _refuse_written_by_a_job(fd, mem_path)\n",
        "",
        ("tests/test_file_identity.py::"
         "test_object_add_of_a_file_another_migd_processs_job_writes_is_refused",),
    ),
    Mutant(
        "one-uids-jobs-fill-the-global-job-table",
        "migd/migration/engine.py",
        "        job.owner = blocking.capped_uid()  # the uid admission counted it for\n",
        "",
        ("tests/test_uid_jobs.py::test_one_uids_undismissed_jobs_do_not_fill_the_job_table",),
    ),
    Mutant(
        "a-cancel-waits-for-a-step-still-queued",
        "migd/migration/engine.py",
        "                step.drop()  # one still queued: its job_thread ends the job"
        " (JobCancelled)\n",
        "                pass\n",
        ("tests/test_uid_jobs.py::"
         "test_a_cancel_drops_a_job_step_queued_behind_its_uids_stuck_calls",),
    ),
    Mutant(
        "a-jobs-channel-closes-on-the-event-loop",
        "migd/migration/engine.py",
        "            await job_cleanup_thread(job.target.close_channels)"
        "  # may wait, as _conclude's\n",
        "            job.target.close_channels()\n",
        ("tests/test_faults.py::test_a_save_whose_file_close_waits_does_not_hold_the_daemon",),
    ),
    Mutant(
        "a-jobs-cleanups-queue-behind-its-uids-calls",
        "migd/migration/engine.py",
        "blocking.Step(func, *args, cleanup=True, **kwargs)",
        "blocking.Step(func, *args, cleanup=False, **kwargs)",
        ("tests/test_uid_jobs.py::"
         "test_a_cancel_drops_a_job_step_queued_behind_its_uids_stuck_calls",),
    ),
    Mutant(
        "add-fd-closes-a-refused-fd-on-the-event-loop",
        "migd/api/fds.py",
        "        await blocking.to_thread(os.close, fd)  # a close may wait (add_fd's comment)\n",
        "        os.close(fd)\n",
        ("tests/test_faults.py::test_a_refused_add_fd_of_a_file_whose_close_waits_does_not_hold"
         "_the_daemon[opaque-too-long]",),
    ),
    Mutant(
        "a-saves-file-stat-on-the-event-loop",
        "migd/migration/engine.py",
        "            identity = await blocking.to_thread(file_identity, main_fd)\n",
        "            identity = file_identity(main_fd)\n",
        ("tests/test_faults.py::"
         "test_whichever_stat_of_a_jobs_file_waits_the_daemon_answers_others[memory-save]",),
    ),
    Mutant(
        "memory-file-holds-on-the-event-loop",
        "migd/migration/engine.py",
        "            holds, refusal = await blocking.to_thread("
        "_hold_memory_files, backends, \"save\")\n",
        "            holds, refusal = _hold_memory_files(backends, \"save\")\n",
        ("tests/test_faults.py::"
         "test_a_memory_files_lock_server_that_stops_answering_does_not_hold_the_daemon",),
    ),
    Mutant(
        "bench-teardown-cut-short-by-a-second-signal",
        "migd/bench/__init__.py",
        "        with signals_deferred():\n",
        "        if True:\n",
        ("tests/test_bench.py::test_bench_fast_disk_failed_or_interrupted_leaves_nothing"
         "[15-hold-umount-mounted at-]",),
    ),
    Mutant(
        "a-failed-sd-notify-is-silent",
        "migd/app/daemon.py",
        "sdnotify.SystemdNotifier(debug=True)",
        "sdnotify.SystemdNotifier(debug=False)",
        ("tests/test_systemd.py::test_an_unreachable_notify_socket_is_logged_and_migd_serves",),
    ),
    Mutant(
        "migd-killed-said-in-qemu-qmps-words",
        "migd/tools/client.py",
        "        return \"migd closed it (it stopped or was killed)\"\n",
        "        return _error_text(exc)\n",
        ("tests/test_cli_client.py::"
         "test_the_daemon_killed_during_a_save_is_said_plainly_and_exits_1[migrate]",),
    ),
    Mutant(
        "bench-vm-killed-by-sigterm",
        "migd/bench/__init__.py",
        "        if getattr(args, \"vm\", False):\n            return run_vm(args)\n"
        "        return run_suite(args)\n",
        "        if getattr(args, \"vm\", False):\n"
        "            signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "            return run_vm(args)\n"
        "        return run_suite(args)\n",
        ("tests/test_bench.py::test_bench_vm_interrupted_leaves_nothing[15]",),
    ),
    Mutant(
        "optional-member-null-taken-as-absent",
        "migd/qmp/validation.py",
        "        if value is None and info.context is _REQUEST and info.field_name is not None:",
        "        if False:",
        ("tests/test_qemu_differential.py",),
    ),
    # --- round 10a: QEMU-exact answers to what libvirt-style clients probe --------------
    Mutant(
        "channel-address-members-unchecked",
        "migd/api/migration.py",
        "            channel.addr.check_variant((\"channels\", i, \"addr\"))",
        "            pass",
        ("tests/test_channel_addresses.py",),
    ),
    Mutant(
        "union-flattened-in-introspection",
        "migd/api/introspection.py",
        "        if isinstance(union, QapiUnion) and union.base is not None:",
        "        if False:",
        ("tests/test_introspection.py::test_libvirt_style_probes",),
    ),
    Mutant(
        "no-unstable-feature-markers",
        "migd/api/introspection.py",
        "features = [\"unstable\"] if name.startswith(\"x-\") and name not in _STABLE_X",
        "features = [] if name.startswith(\"x-\") and name not in _STABLE_X",
        ("tests/test_introspection.py::test_feature_markers",),
    ),
    Mutant(
        "prealloc-accepted-but-not-done",
        "migd/api/memory.py",
        "    if spec.prealloc:\n        backend.preallocate()",
        "    if False:\n        backend.preallocate()",
        ("tests/test_object_add_texts.py::test_merge_dump_and_prealloc_take_effect",),
    ),
    Mutant(
        "readonly-backend-taken-read-write",
        "migd/api/memory.py",
        "            bool(args.readonly),",
        "            False,",
        ("tests/test_object_add_texts.py",),
    ),
    Mutant(
        "fast-disk-left-mounted",
        "migd/bench/fastdisk.py",
        "    def close(self) -> None:\n        if self.mount is not None:",
        "    def close(self) -> None:\n        return\n        if self.mount is not None:",
        ("tests/test_bench.py::test_bench_fast_disk_runs_on_a_loop_over_tmpfs_and_leaves_nothing",),
    ),
    Mutant(
        "verify-splits-at-the-last-offset",
        "migd/tools/verify.py",
        "    path, option, value = text.partition(_OFFSET_OPTION)",
        "    path, option, value = text.rpartition(_OFFSET_OPTION)",
        ("tests/test_verify_cli.py::test_the_file_argument_is_split_as_a_file_uri_is",),
    ),
    Mutant(
        "trim-timer-keeps-the-job",
        "migd/io/threads.py",
        "StagingPool.IDLE + 0.5, STAGING.trim, context=contextvars.Context()",
        "StagingPool.IDLE + 0.5, STAGING.trim",
        ("tests/test_job_status.py::test_an_ended_and_dismissed_job_is_not_kept_alive_by_the_daemon",),
    ),
    Mutant(
        "device-state-buffer-failure-blamed-on-the-image",
        "migd/tools/vm.py",
        "        device_fd = _device_state_buffer()",
        '        device_fd = os.memfd_create("migd-vm-device-state", os.MFD_CLOEXEC)',
        ("tests/test_vm.py::test_a_device_state_buffer_that_cannot_be_made_is_named_not_the_image",),
    ),
    Mutant(
        "bench-vm-teardown-not-deferred",
        "migd/bench/vm.py",
        "        with signals_deferred():\n            await self._quit()",
        "        await self._quit()",
        ("tests/test_bench_vm_teardown.py",),
    ),
    # --- red-team round 10b: aliasing between objects and processes ---------------------
    Mutant(
        "partial-acceptance-of-any-mark",
        "migd/state/partial.py",
        "            if mark is not None and mark != backend.partial_accepted:",
        "            if mark is not None and backend.partial_accepted is None:",
        ("tests/test_partial_restore.py::"
         "test_a_partial_file_one_daemon_accepted_is_not_saved_once_another_left_it_partial_again",),
    ),
    Mutant(
        "private-backend-file-mark-unread",
        "migd/state/partial.py",
        "                if mark is None and self._shows_its_file(backend):",
        "                if False:",
        ("tests/test_partial_restore.py::"
         "test_a_private_backend_on_a_file_another_daemon_left_partial_is_not_saved_as_whole",),
    ),
    Mutant(
        "overlay-file-known-by-the-overlay",
        "migd/state/overlay.py",
        "    if fs_type(fd) == _OVERLAYFS_MAGIC:",
        "    if False:",
        ("tests/test_file_identity.py::"
         "test_object_add_refuses_a_second_backend_on_one_file_through_an_overlay",),
    ),
    Mutant(
        "overlay-job-holds-on-the-overlay",
        "migd/state/paths.py",
        "    opened = layer_file(fd, flags)",
        "    opened = None",
        ("tests/test_file_identity.py::"
         "test_two_migd_processes_on_one_file_through_an_overlay_and_its_layer_never_share_a_job",),
    ),
    Mutant(
        "overlay-memory-mark-on-the-overlay",
        "migd/state/memory.py",
        "        if layer is not None:\n            hold_as_memory(layer)",
        "        if layer is not None:\n            pass",
        ("tests/test_file_identity.py::"
         "test_a_save_into_another_migd_processs_memory_file_by_its_other_name_is_refused",),
    ),
    Mutant(
        "proc-magic-link-followed",
        "migd/state/paths.py",
        "            _refuse_magic_link(path, there, here, target)",
        "            pass",
        ("tests/test_file_kinds.py::test_a_name_through_a_magic_link_of_proc_is_refused",),
    ),
    # --- round 10c: the operator's world --------------------------------------------------
    Mutant(
        "sigusr1-kills-migd",
        "migd/app/daemon.py",
        '    signal.SIGUSR1: "migd has no use for it (it logs to stderr: no log file to reopen)",',
        "",
        ("tests/test_systemd.py::test_sigusr1_and_sigusr2_during_a_save_are_logged_and_ignored",),
    ),
    Mutant(
        "passed-socket-mode-from-the-config",
        "migd/app/daemon.py",
        "                mode = passed_socket_mode(listener, self.config.socket_mode)",
        "                mode = self.config.socket_mode",
        ("tests/test_systemd.py::"
         "test_a_passed_socket_open_to_others_is_warned_about_whatever_socket_mode_says",),
    ),
    Mutant(
        "stopped-migd-not-noticed",
        "migd/tools/client.py",
        "            if stopped is not None:\n                raise StoppedServer(stopped)",
        "            if False:\n                raise StoppedServer(stopped)",
        ("tests/test_cli_client.py::"
         "test_status_of_a_stopped_migd_says_it_is_stopped_and_how_to_continue_it",),
    ),
    Mutant(
        "file-left-migds-without-cap-chown",
        "migd/state/paths.py",
        "    except OSError as exc:\n        # Left migd's, the file was one",
        "    except OSError as exc:\n        return\n        # Left migd's, the file was one",
        ("tests/test_file_ownership.py::"
         "test_without_cap_chown_a_new_file_for_another_uid_is_refused_and_not_kept",),
    ),
    Mutant(
        "journal-lines-without-priority",
        "migd/app/cli.py",
        "    if stderr_is_journal():\n        handler.setFormatter(JournalFormatter(",
        "    if False:\n        handler.setFormatter(JournalFormatter(",
        ("tests/test_systemd.py::test_under_journald_each_line_carries_its_syslog_priority",),
    ),
    Mutant(
        "config-errors-exit-2",
        "migd/app/cli.py",
        "EXIT_CONFIG = 78",
        "EXIT_CONFIG = 2",
        ("tests/test_config.py::"
         "test_a_bad_config_file_is_one_error_line_naming_the_key_with_exit_code_78_and_no_socket",),
    ),
    Mutant(
        "serve-option-twice-taken",
        "migd/app/cli.py",
        "        if getattr(namespace, self.dest) is not None:",
        "        if False:",
        ("tests/test_config.py::test_an_option_of_serve_given_twice_is_a_usage_error",),
    ),
    Mutant(
        "failed-job-logged-at-info",
        "migd/migration/engine.py",
        "            logging.WARNING if status == MigrationStatus.failed else logging.INFO,",
        "            logging.INFO,",
        ("tests/test_save_errors.py::test_a_failed_save_is_logged_as_a_warning_naming_its_job_and_client",),
    ),
    Mutant(
        "unusable-allowed-dir-not-warned",
        "migd/app/daemon.py",
        "            problem = allowed_dir_problem(directory)",
        "            problem = None",
        ("tests/test_config.py::test_allowed_dirs_that_cannot_hold_files_are_warned_about_at_the_start",),
    ),
    Mutant(
        "fd-sets-seen-by-every-uid",
        "migd/state/fdsets.py",
        "(uid is None or self._owners.get(fdset_id) == uid)",
        "True",
        ("tests/test_fdset_ownership.py::test_another_uids_client_cannot_see_or_use_roots_fd_set",),
    ),
    Mutant(
        "a-jobs-fdset-opened-for-every-uid",
        "migd/app/daemon.py",
        "        return fdsets.open_path(path, flags, direct, blocking.capped_uid())",
        "        return fdsets.open_path(path, flags, direct)",
        ("tests/test_fdset_ownership.py::test_another_uids_client_cannot_see_or_use_roots_fd_set",),
    ),
    Mutant(
        "getfd-names-shared-by-every-uid",
        "migd/api/fds.py",
        "    await blocking.to_thread(ctx.services.fdsets.add_named, args.fdname, fd, uid)",
        "    await blocking.to_thread(ctx.services.fdsets.add_named, args.fdname, fd)",
        ("tests/test_fdset_ownership.py::test_getfd_names_are_the_uids_own",),
    ),
    # --- session 20: refusals logged; round 10d (a name means what the client sees,
    # shutdown's report, SIGTERM at start, config sizes) -----------------------------------
    Mutant(
        "refused-requests-not-logged",
        "migd/qmp/server.py",
        '            self.server.refusals.refused(self.number, command, reply["error"])',
        "            pass",
        ("tests/test_refusal_log.py::"
         "test_a_refused_command_is_logged_with_its_client_and_error",),
    ),
    Mutant(
        "refusal-log-writes-the-clients-newline",
        "migd/qmp/refusals.py",
        "    if not text.isprintable():",
        "    if False:",
        ("tests/test_refusal_log.py::test_a_command_name_with_a_newline_is_logged_on_one_line",),
    ),
    Mutant(
        "refusal-log-unbounded",
        "migd/qmp/refusals.py",
        "        if self._logged < LIMIT:",
        "        if True:",
        ("tests/test_refusal_log.py::"
         "test_a_flood_of_refused_requests_is_logged_at_most_limit_lines_then_counted",),
    ),
    Mutant(
        "client-view-not-compared",
        "migd/api/context.py",
        "    await blocking.to_thread(ctx.session.refuse_other_view, path)",
        "    return",
        ("tests/test_mount_namespace.py::"
         "test_a_file_in_a_directory_the_client_sees_elsewhere_is_refused",),
    ),
    Mutant(
        "client-view-no-mount-table-fallback",
        "migd/state/peer_view.py",
        "        if _tables_disagree(pid, pidfd, directory):",
        "        if False:",
        ("tests/test_mount_namespace.py::"
         "test_a_client_migd_may_not_look_into_is_refused_by_the_mount_tables",),
    ),
    Mutant(
        "mount-table-first-mount-on-a-point-wins",
        "migd/state/peer_view.py",
        "len(point) >= len(best[0])",
        "len(point) > len(best[0])",
        ("tests/test_mount_namespace.py::"
         "test_the_mount_holding_a_name_is_the_last_listed_on_the_longest_point",),
    ),
    Mutant(
        "shutdown-waits-silently-for-stuck-jobs",
        "migd/app/daemon.py",
        "        await self._wait_for_stuck_jobs(stopping_since)\n",
        "",
        ("tests/test_shutdown_order.py::"
         "test_shutdown_says_which_job_thread_stuck_in_io_its_exit_waits_for",),
    ),
    Mutant(
        "ready-after-a-sigterm-at-start",
        "migd/app/daemon.py",
        "            if self._stop.is_set():\n",
        "            if False:\n",
        ("tests/test_systemd.py::"
         "test_sigterm_while_the_configured_backends_are_made_stops_without_ready",),
    ),
    Mutant(
        "config-max-bandwidth-integers-only",
        "migd/app/config.py",
        "        return _size_text(value)",
        "        return value",
        ("tests/test_config.py::"
         "test_the_top_level_max_bandwidth_takes_a_size_as_object_adds_size_does",),
    ),
    Mutant(
        "dear-new-pages-still-staged",
        "migd/io/threads.py",
        "            and not self.storer.pages.dear  # then straight into the mapping (NewPages)\n",
        "",
        ("tests/test_save_staging.py::"
         "test_once_new_pages_are_dear_the_rest_is_read_into_the_mapping",),
    ),
    Mutant(
        "storer-writes-never-timed",
        "migd/io/threads.py",
        "            self.pages.wrote(len(data), time.thread_time() - started)\n",
        "",
        ("tests/test_save_staging.py::"
         "test_once_new_pages_are_dear_the_rest_is_read_into_the_mapping",),
    ),
    Mutant(
        "client-commands-load-the-daemons-config",
        "migd/app/cli.py",
        "from .locations import DEFAULT_CONFIG_PATH, default_socket_path\n",
        "from .config import DEFAULT_CONFIG_PATH, default_socket_path\n",
        ("tests/test_vm.py::test_restore_loads_none_of_the_daemons_modules",),
    ),
    Mutant(
        "inspect-decodes-bitmaps-with-numpy",
        "migd/tools/inspect.py",
        "        present += format.count_bitmap(data, pages)\n",
        "        present += int(format.decode_bitmap(data, pages).sum())\n",
        ("tests/test_vm.py::test_restore_loads_none_of_the_daemons_modules",),
    ),
    Mutant(
        "restore-start-up-from-the-wrong-stat-field",
        "migd/tools/vm.py",
        "        began = int(read_stat()[1][19]) / os.sysconf(\"SC_CLK_TCK\")",
        "        began = int(read_stat()[1][18]) / os.sysconf(\"SC_CLK_TCK\")",
        ("tests/test_vm.py::"
         "test_a_saved_vm_restores_into_a_new_qemu_byte_exact_and_runs",),
    ),
    Mutant(
        "restore-start-up-formatted-when-unknown",
        "migd/tools/vm.py",
        "    if startup is None:\n        return \"\"\n",
        "    if False:\n        return \"\"\n",
        ("tests/test_vm.py::"
         "test_a_restore_whose_start_is_unknown_reports_without_its_start_up",),
    ),
    Mutant(
        "postcopy-listen-without-a-discard",
        "migd/tools/postcopy_stream.py",
        "        out += command(CMD_POSTCOPY_RAM_DISCARD, discard)\n",
        "",
        ("tests/test_vm_postcopy.py::"
         "test_a_device_state_splits_into_blocks_records_and_devices",),
    ),
    Mutant(
        "postcopy-block-list-keeps-guest-addresses",
        "migd/tools/postcopy_stream.py",
        "_str8(b.name) + _BE64.pack(b.length) for b in s.blocks",
        "_str8(b.name) + _BE64.pack(b.length) + _BE64.pack(0) for b in s.blocks",
        ("tests/test_vm_postcopy.py::"
         "test_a_device_state_splits_into_blocks_records_and_devices",),
    ),
    Mutant(
        "postcopy-devices-take-the-eof-byte",
        "migd/tools/postcopy_stream.py",
        "            return at - 1\n",
        "            return at\n",
        ("tests/test_vm_postcopy.py::"
         "test_a_device_state_splits_into_blocks_records_and_devices",),
    ),
    Mutant(
        "postcopy-pages-sent-unchecked",
        "migd/tools/postcopy.py",
        "        if block.digests is not None:\n            self._check_units(",
        "        if False:\n            self._check_units(",
        ("tests/test_vm_postcopy.py::"
         "test_a_page_that_fails_its_checksum_never_reaches_the_guest",),
    ),
    Mutant(
        "postcopy-pages-not-marked-sent",
        "migd/tools/postcopy.py",
        "        block.sent[first + where] = True  # before sending",
        "        block.sent[first + where] = False  # before sending",
        ("tests/test_vm_postcopy.py::"
         "test_the_writer_sends_each_present_page_once_and_asked_for_zeros_as_zero_records",),
    ),
    Mutant(
        "postcopy-asked-for-zeros-never-sent",
        "migd/tools/postcopy.py",
        "            zeros = [p for p in range(start, start + count) if not block.sent[p]]",
        "            zeros: list[int] = []",
        ("tests/test_vm_postcopy.py::"
         "test_the_writer_sends_each_present_page_once_and_asked_for_zeros_as_zero_records",),
    ),
    Mutant(
        "postcopy-request-range-unchecked",
        "migd/tools/postcopy.py",
        "or length % PAGE_SIZE or start + length > size_bytes:",
        "or length % PAGE_SIZE:",
        ("tests/test_vm_postcopy.py::"
         "test_what_a_qemu_asks_outside_its_blocks_ends_the_stream_saying_what",),
    ),
    Mutant(
        "postcopy-request-beyond-one-buffer-dropped",
        "migd/tools/postcopy.py",
        "            for unit in range(first_unit, end_unit, CHUNK_UNITS):",
        "            for unit in range(first_unit, end_unit, end_unit):",
        ("tests/test_vm_postcopy.py::"
         "test_a_request_larger_than_the_writers_buffer_is_served_whole",),
    ),
    Mutant(
        "allocate-walks-a-file-without-holes",
        "migd/state/memory.py",
        "not self.share or self.fully_allocated():",
        "not self.share:",
        ("tests/test_memory.py::test_allocate_skips_a_file_without_holes_and_fills_one_with_holes",),
    ),
    Mutant(
        "fully-allocated-ignores-the-file-length",
        "migd/state/memory.py",
        "return st.st_size == self.size and st.st_blocks * 512 >= self.size",
        "return st.st_blocks * 512 >= self.size",
        ("tests/test_memory.py::test_a_file_longer_than_its_mapping_is_not_taken_as_fully_allocated",),
    ),
    Mutant(
        "proc-stat-split-at-the-first-parenthesis",
        "migd/procstat.py",
        'head, closing, rest = text.rpartition(")")',
        'head, closing, rest = text.partition(")")',
        ("tests/test_procstat.py::"
         "test_a_command_name_with_spaces_and_parentheses_leaves_the_fields_in_place",),
    ),
    Mutant(
        "save-slots-never-allocated-ahead",
        "migd/migration/mapped_ram/page_slots.py",
        "    if fs_type(fd) != EXT4_MAGIC or not runs:\n",
        "    if True:\n",
        ("tests/test_save_page_slots.py::test_slots_allocated_ahead_on_ext4_only_and_zero_pages_freed_after",),
    ),
    Mutant(
        "save-slots-allocated-on-any-filesystem",
        "migd/migration/mapped_ram/page_slots.py",
        "    if fs_type(fd) != EXT4_MAGIC or not runs:\n",
        "    if not runs:\n",
        ("tests/test_save_page_slots.py::test_slots_allocated_ahead_on_ext4_only_and_zero_pages_freed_after",),
    ),
    Mutant(
        "zero-page-slots-never-freed",
        "migd/migration/mapped_ram/page_slots.py",
        "            code = fallocate(fd, PUNCH_HOLE | KEEP_SIZE, io.page_offset(first + lo),",
        "            code = fallocate(fd, KEEP_SIZE, io.page_offset(first + lo),",
        ("tests/test_save_page_slots.py::test_slots_allocated_ahead_on_ext4_only_and_zero_pages_freed_after",),
    ),
    Mutant(
        "cancelled-save-keeps-its-unwritten-slots",
        "migd/migration/engine.py",
        "            if slots:\n                # Failed or cancelled",
        "            if False:\n                # Failed or cancelled",
        ("tests/test_save_page_slots.py::test_a_cancelled_save_leaves_no_room_taken_by_pages_it_never_wrote",),
    ),
    Mutant(
        "save-slots-allocated-without-room",
        "migd/migration/mapped_ram/page_slots.py",
        "    if st.f_bavail * st.f_frsize < needed + HEADROOM:\n",
        "    if False:\n",
        ("tests/test_save_page_slots.py::test_a_save_that_fits_only_without_its_zero_pages_is_not_allocated_ahead",),
    ),
    Mutant(
        "save-channels-read-memory-all-at-once",
        "migd/io/threads.py",
        "        copying = threading.Semaphore(COPY_THREADS)",
        "        copying = threading.Semaphore(64)",
        ("tests/test_save_page_slots.py::test_a_saves_channels_read_their_memory_one_at_a_time",),
    ),
    Mutant(
        "zero-scan-short-cut-where-any-sample-is-data",
        "migd/io/zero_scan.py",
        "    if samples.all():\n",
        "    if samples.any():\n",
        ("tests/test_zero_scan.py::test_zero_scan_finds_exactly_the_long_zero_runs",),
    ),
    Mutant(
        "run-without-zero-pages-not-written",
        "migd/io/zero_scan.py",
        "        return [(0, n)] if n else []\n",
        "        return []\n",
        ("tests/test_zero_scan.py::test_memory_without_zero_samples_is_written_whole",),
    ),
    Mutant(
        "bench-times-migrations-to-the-poll-that-saw-the-end",
        "migd/bench/processes.py",
        "    if ended is not None and 0 < ended - wall_start <= seconds:\n",
        "    if False:\n",
        ("tests/test_bench_timing.py::test_a_save_is_timed_to_its_completed_event",),
    ),
    Mutant(
        "save-head-written-before-the-file-is-sized",
        "migd/migration/mapped_ram/save.py",
        "    truncate(main_fd, layout.end_offset, path)\n",
        "",
        ("tests/test_save_page_slots.py::"
         "test_the_head_is_written_into_a_file_already_sized_to_its_end",),
    ),
    Mutant(
        "storer-never-found-the-bound",
        "migd/io/threads.py",
        "            self.inline = True\n",
        "",
        ("tests/test_save_staging.py::test_channels_that_store_their_own_runs_restore_whole_and_verified",
         "tests/test_save_staging.py::test_the_storer_is_the_bound_only_when_it_is_seldom_idle"),
    ),
    Mutant(
        "storer-found-the-bound-when-idle",
        "migd/io/threads.py",
        "            if share >= self.IDLE or self.inline:\n",
        "            if share < self.IDLE or self.inline:\n",
        ("tests/test_save_staging.py::test_channels_that_store_their_own_runs_restore_whole_and_verified",
         "tests/test_save_staging.py::test_the_storer_is_the_bound_only_when_it_is_seldom_idle"),
    ),
    Mutant(
        "storer-judged-in-its-warm-up-window",
        "migd/io/threads.py",
        "            if not self._warm:  # the first window (the job's start, the first reads,"
        " the\n",
        "            if False:  # the first window (the job's start, the first reads, the\n",
        ("tests/test_save_staging.py::test_the_storer_is_the_bound_only_when_it_is_seldom_idle",),
    ),
    Mutant(
        "channels-store-their-own-runs-unchecked",
        "migd/io/threads.py",
        "                    storer.store(run, data)\n",
        "                    block.store(data, run.first_page * PAGE_SIZE)  # type: ignore[misc]\n",
        ("tests/test_save_staging.py::test_a_corrupt_unit_never_reaches_used_memory",),
    ),
    Mutant(
        "bench-waiting-for-the-event-polls-all-the-same",
        "migd/bench/processes.py",
        "        if not poll and not qmp.wait_event(_final_migration_event, EVENT_SAMPLE):\n",
        "        if False:\n",
        ("tests/test_bench_timing.py::test_waiting_for_the_event_asks_query_migrate_once",),
    ),
    Mutant(
        "bench-paired-event-saves-polled",
        "migd/bench/suite.py",
        "            migd.qmp, \"migrate\", arguments, migd.proc.pid,"
        " poll=row.polled is not False\n",
        "            migd.qmp, \"migrate\", arguments, migd.proc.pid, poll=True\n",
        ("tests/test_bench.py::test_bench_end_to_end",),
    ),
    Mutant(
        "bench-headline-takes-a-paired-polling-row",
        "migd/bench/results.py",
        " or self.staging is not None or self.polled is not None\n",
        " or self.staging is not None\n",
        ("tests/test_bench.py::test_the_headline_figures_leave_the_paired_rows_out",),
    ),
    Mutant(
        "bench-headline-takes-a-paired-staging-row",
        "migd/bench/results.py",
        " or self.staging is not None or self.polled is not None\n",
        " or self.polled is not None\n",
        ("tests/test_bench.py::test_the_headline_figures_leave_the_paired_rows_out",),
    ),
    Mutant(
        "holds-every-page-on-any-filesystem",
        "migd/state/memory.py",
        "        if self._fd is None or not self.share or fs_type(self._fd) != _TMPFS_MAGIC:\n",
        "        if self._fd is None or not self.share:\n",
        ("tests/test_save_staging.py::test_pages_lost_from_a_memory_backend_are_found_where_its_blocks_count_too",),
    ),
    Mutant(
        "check-stored-never-walks",
        "migd/io/engine.py",
        "    if block.holds_every_page is not None and block.holds_every_page():\n",
        "    if True:\n",
        ("tests/test_save_staging.py::test_pages_lost_from_a_memory_backend_are_found_where_its_blocks_count_too",),
    ),
    Mutant(
        "check-stored-always-walks",
        "migd/io/engine.py",
        "    if block.holds_every_page is not None and block.holds_every_page():\n",
        "    if False:\n",
        ("tests/test_save_staging.py::test_a_whole_tmpfs_memory_file_is_checked_without_walking_its_pages",),
    ),
    Mutant(
        "staged-restores-walk-every-page",
        "migd/migration/plan.py",
        "                holds_every_page=backend.holds_every_page if stage else None,\n",
        "                holds_every_page=None,\n",
        ("tests/test_save_staging.py::test_a_restore_into_a_whole_tmpfs_file_ends_without_walking_its_pages",),
    ),
    Mutant(
        "saves-held-against-the-median-disk-write",
        "migd/bench/report.py",
        "            self.share_of_disk_per_round(save, \"write\"),",
        "            speed(save, self.best_disk(\"write\")),",
        ("tests/test_bench.py::test_saves_are_held_against_the_disk_write_of_their_own_round",
         "tests/test_bench.py::test_bench_end_to_end"),
    ),
    Mutant(
        "disk-passes-at-the-round-start-only",
        "migd/bench/report.py",
        "            min(r.times[i] for r in pool) / row.times[i] for i in range(rounds)",
        "            min(r.times[0] for r in pool) / row.times[i] for i in range(rounds)",
        ("tests/test_bench.py::test_saves_are_held_against_the_disk_write_of_their_own_round",),
    ),
]  # fmt: skip


def check_patches(tree: Path, mutants: list[Mutant]) -> list[str]:
    """Problems with the list: a patch whose original text is missing or ambiguous."""
    problems = []
    for m in mutants:
        if not (tree / m.path).is_file():  # the module moved or was split
            problems.append(f"{m.name}: no file {m.path}")
            continue
        text = (tree / m.path).read_text()
        found = text.count(m.original)
        if found != 1:
            problems.append(f"{m.name}: original text found {found} times in {m.path}")
    return problems


def copy_tree(into: Path) -> Path:
    """A copy of the tree to mutate: everything but the venv, git and caches."""
    tree = into / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"
        ),
    )
    return tree


def environment(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    # The editable install points at the real tree; PYTHONPATH (and the cwd) come first.
    where = subprocess.run(
        [sys.executable, "-c", "import migd; print(migd.__file__)"],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not where.startswith(str(tree)):
        raise SystemExit(f"mutants: the copy's migd is not the one imported ({where})")
    return env


def run_tests(
    tree: Path, env: dict[str, str], tests: tuple[str, ...], show: bool = False,
    timeout: float = TIMEOUT,
) -> tuple[int, float]:  # fmt: skip
    """pytest -x of `tests` in the copy -> (exit status, -1 on timeout; seconds)."""
    started = time.monotonic()
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            argv, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout
        )
        code = done.returncode
        if show:  # the failure pytest reports: why the mutant was caught
            lines = [line for line in done.stdout.splitlines() if line.startswith("E ")]
            failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
            print(*("      " + line for line in failed + lines[:6]), sep="\n")
    except subprocess.TimeoutExpired:
        code = -1
    return code, time.monotonic() - started


def run(mutants: list[Mutant], show: bool = False) -> int:
    problems = check_patches(ROOT, mutants)
    if problems:
        print("mutants: the list no longer matches the code:", *problems, sep="\n  ")
        return 2
    with tempfile.TemporaryDirectory(prefix="migd-mutants-") as tmp:
        tree = copy_tree(Path(tmp))
        env = environment(tree)
        selected = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        code, seconds = run_tests(tree, env, selected, True, BASELINE_TIMEOUT)  # show which
        if code != 0:
            print(f"unmutated tree: the selected tests FAIL (exit {code}); nothing to compare")
            return 2
        print(f"unmutated tree: the {len(selected)} selections pass ({seconds:.0f} s)")
        rows = []
        for m in mutants:
            path = tree / m.path
            original = path.read_text()
            try:
                path.write_text(original.replace(m.original, m.replacement, 1))
                code, seconds = run_tests(tree, env, m.tests, show)
            finally:
                path.write_text(original)
            verdict = {1: "caught", 0: "SURVIVED", -1: "TIMEOUT"}.get(code, f"ERROR ({code})")
            rows.append((m.name, " ".join(t.replace(G, "guards::") for t in m.tests), verdict))
            print(f"  {verdict:9} {m.name} ({seconds:.0f} s)", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'mutant':{width}} | result   | tests run |")
    print(f"|{'-' * (width + 2)}|----------|-----------|")
    for name, tests, verdict in rows:
        print(f"| {name:{width}} | {verdict:8} | {tests} |")
    survivors = [r for r in rows if r[2] != "caught"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants caught")
    return 1 if survivors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--show", action="store_true", help="print each failing assertion")
    args = parser.parse_args()
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutants: {', '.join(unknown)}")
    chosen = [by_name[n] for n in args.names] if args.names else MUTANTS
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.path}; {' '.join(m.tests)}")
        return 0
    return run(chosen, args.show)


if __name__ == "__main__":
    sys.exit(main())
