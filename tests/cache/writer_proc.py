"""The cache tests' subprocess writer: a rank writing its share of the test records, optionally killed mid-shard.

    python tests/cache/writer_proc.py FOLDER [--rank R --ranks W] [--kill MODE --kill-shard S]

Rank R writes records R, R + W, R + 2W, ... of ``make_records(23)`` in shards of 5 records and prints one JSON
line (records written, skipped, committed when the writer opened). With ``--barrier DIR`` the ranks wait for each
other before writing, so that they write at the same time. ``--kill`` SIGKILLs the process while it
writes shard S: ``mid-write`` (half of the temporary file written), ``before-rename`` (temporary file complete,
not renamed) or ``after-rename`` (renamed, folder not yet fsynced). The fault is patched in here, in the test's
process only; the library has no fault hook.
"""

import argparse
import json
import os
import signal
import time
from pathlib import Path

from conftest import make_records, spec_for  # this folder is sys.path[0] when run as a script

import mmkd.cache.shard as shard_module
from mmkd.cache import CacheWriter
from mmkd.cache.folder import shard_name, temp_name


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(mode: str, rank: int, seq: int) -> None:
    final, temp = shard_name(rank, seq), temp_name(rank, seq)
    if mode == "mid-write":
        write_all = shard_module._write_all

        def write_half(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(temp):
                write_all(fd, bytes(data)[: len(data) // 2])
                os.fsync(fd)
                _die()
            write_all(fd, data)

        shard_module._write_all = write_half
    elif mode == "before-rename":
        replace = os.replace

        def replace_or_die(src, dst):
            if Path(dst).name == final:
                _die()
            replace(src, dst)

        os.replace = replace_or_die
    elif mode == "after-rename":
        fsync_dir = shard_module.fsync_dir

        def fsync_or_die(folder):
            if (Path(folder) / final).exists():
                _die()
            fsync_dir(folder)

        shard_module.fsync_dir = fsync_or_die
    else:
        raise SystemExit(f"unknown kill mode {mode}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--kill")
    parser.add_argument("--kill-shard", type=int, default=2)
    parser.add_argument("--barrier", help="folder where all ranks check in before writing (so they overlap)")
    args = parser.parse_args()
    if args.kill:
        install_kill(args.kill, args.rank, args.kill_shard)
    records = make_records(23)[args.rank :: args.ranks]
    if args.barrier:
        barrier = Path(args.barrier)
        (barrier / f"rank-{args.rank}").touch()
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < args.ranks and time.monotonic() < deadline:
            time.sleep(0.01)
    written = 0
    with CacheWriter(args.folder, spec_for(), rank=args.rank, shard_records=5) as writer:
        committed = writer.committed
        for rec in records:
            written += writer.add(**rec)
            if args.barrier:
                time.sleep(0.01)  # spread the shard writes of the ranks over the same interval
    print(json.dumps({"written": written, "skipped": writer.skipped, "committed": committed}))


if __name__ == "__main__":
    main()
