"""A slow shared filesystem on this machine: a FUSE passthrough of a folder that adds a fixed
latency to every metadata call and read, as a cluster's network filesystem does under load.

    python bench/slowfs.py SOURCE MOUNTPOINT [--latency-ms 5]   # runs until unmounted
    fusermount3 -u MOUNTPOINT

Needs /dev/fuse, Debian's fuse3 (`scripts/slowfs.sh install`) and the mfusepy package (the
dev extra). Used by bench/stage.py; also handy to try any tl run against slow storage.
"""

from __future__ import annotations

import argparse
import errno
import os
import time

import mfusepy as fuse


class Slow(fuse.Operations):
    use_ns = True

    """Every call waits `latency` seconds, then does the same on the source folder."""

    def __init__(self, source: str, latency: float) -> None:
        self.source, self.latency = os.path.realpath(source), latency

    def _path(self, path: str) -> str:
        return os.path.join(self.source, path.lstrip("/"))

    def _wait(self) -> None:
        time.sleep(self.latency)

    def getattr(self, path, fh=None):
        self._wait()
        try:
            st = os.lstat(self._path(path))
        except FileNotFoundError:
            raise fuse.FuseOSError(errno.ENOENT) from None
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        out = {k: getattr(st, k) for k in keys}
        out.update(st_mtime_ns=st.st_mtime_ns, st_atime_ns=st.st_atime_ns, st_ctime_ns=st.st_ctime_ns)
        return out

    def readdir(self, path, fh):
        self._wait()
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path, flags):
        self._wait()
        return os.open(self._path(path), flags)

    def read(self, path, size, offset, fh):
        self._wait()
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    args = parser.parse_args()
    os.makedirs(args.mountpoint, exist_ok=True)
    # no kernel caching of data or attributes: every read and lookup reaches this server, as on a
    # network filesystem whose caches other clients' jobs keep evicting
    fuse.FUSE(
        Slow(args.source, args.latency_ms / 1000),
        args.mountpoint,
        foreground=True,
        ro=True,
        nothreads=False,
        direct_io=True,
        attr_timeout=0,
        entry_timeout=0,
    )


if __name__ == "__main__":
    main()
