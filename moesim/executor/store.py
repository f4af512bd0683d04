"""The expert store: one safetensors file per (layer, expert), read cold from disk.

A miss must cost what it costs on the machine, not a page-cache copy: files are opened with
``O_DIRECT`` where the file system allows it (reads go to the device, into a page-aligned
buffer), otherwise the file's cached pages are dropped with ``posix_fadvise(DONTNEED)`` just
before it is read. Tensors are views of the read buffer (no second copy).

Payload bytes (the tensors) are what the simulator counts as an expert's bytes; the file adds
a small safetensors header, and an ``O_DIRECT`` read is rounded up to whole 4 KiB blocks.

``read_gbps`` emulates a storage device of a given bandwidth on top of the real reads
(``ReadLimiter``): a target device slower than this machine's disk (a phone's UFS, a SATA SSD),
or a steady device on a disk whose speed drifts (a cloud VM's shared block device).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moesim.errors import MoesimError

BLOCK = 4096
MATRICES = ("w_gate", "w_up", "w_down")  # SwiGLU: down(silu(gate x) * up x)


class ExecutorError(MoesimError):
    """A real-run setting or file a user can fix."""


@dataclass
class ReadResult:
    key: int
    tensors: dict  # name -> torch tensor (views of ``buffer``)
    payload_bytes: int  # bytes of the tensors
    file_bytes: int  # bytes of the file (payload + header)
    read_bytes: int  # bytes the read call moved (block-rounded under O_DIRECT)
    buffer: object = None


_ST_DTYPE = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32"}


def _uint8():
    import torch

    return torch.uint8


def _torch_dtype(name: str):
    import torch

    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[name]


class ReadLimiter:
    """A storage device of ``gbps`` GB/s serving reads one after another (first come, first
    served across I/O threads), laid over the real reads.

    A read of n bytes that reaches the device at t ends at max(t, device free) + n / bandwidth;
    the real read runs inside that window and the thread then sleeps to its end. When the real
    read takes longer (the disk is slower than the emulated device), it ends when it ends and
    the device stays busy until then; ``slow_reads`` counts those, so a run can show that the
    emulated bandwidth was not held."""

    def __init__(self, gbps: float):
        if not gbps > 0:
            raise ExecutorError(f"read bandwidth {gbps} GB/s must be positive; omit it for the "
                                "disk's own speed")
        self.bytes_per_s = float(gbps) * 1e9
        self._free_at = 0.0
        self._lock = threading.Lock()
        self.reads = 0
        self.slow_reads = 0

    def reserve(self, nbytes: int) -> float:
        """Book the device for a read of ``nbytes`` starting now; return when it ends."""
        with self._lock:
            start = max(time.perf_counter(), self._free_at)
            self._free_at = start + nbytes / self.bytes_per_s
            return self._free_at

    def finish(self, end_at: float) -> None:
        """Wait until the booked end of a read whose real bytes have arrived."""
        now = time.perf_counter()
        with self._lock:
            self.reads += 1
            if now > end_at:
                self.slow_reads += 1
                self._free_at = max(self._free_at, now)
        if now < end_at:
            time.sleep(end_at - now)


class ExpertStore:
    """Folder of ``L{layer:03d}_E{expert:04d}.safetensors`` files plus ``store.json``."""

    def __init__(self, root: str | os.PathLike, num_experts: int, cold: str = "direct",
                 read_gbps: float | None = None):
        self.root = Path(root)
        self.num_experts = int(num_experts)
        if cold not in ("direct", "fadvise", "none"):
            raise ExecutorError(f"unknown cold-read mode {cold!r}; choose direct, fadvise or none")
        self.cold = cold
        self.limiter = ReadLimiter(read_gbps) if read_gbps is not None else None
        self._direct_ok: bool | None = None
        self._free: dict[int, list] = {}  # size -> read buffers handed back (pages faulted in)
        self._lock = threading.Lock()

    def path(self, key: int) -> Path:
        layer, expert = divmod(int(key), self.num_experts)
        return self.root / f"L{layer:03d}_E{expert:04d}.safetensors"

    def has(self, key: int) -> bool:
        return self.path(key).exists()

    # ----- writing -------------------------------------------------------------------------------
    def write(self, key: int, tensors: dict) -> None:
        """Write one expert's tensors (atomically: temporary name, fsync, rename).

        The safetensors header is padded with spaces (which the format allows) so the data
        starts on a 4 KiB boundary: tensors read into a page-aligned buffer are then aligned
        as the GEMM kernels want them."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        tmp = final.with_suffix(".tmp")
        names = sorted(tensors)
        header, offset, blobs = {}, 0, []
        for name in names:
            t = tensors[name].contiguous()
            raw = t.view(-1).view(_uint8()).numpy().tobytes()
            header[name] = {"dtype": _ST_DTYPE[str(t.dtype)], "shape": list(t.shape),
                            "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
            blobs.append(raw)
        text = json.dumps(header, separators=(",", ":")).encode()
        hlen = -(-(8 + len(text)) // BLOCK) * BLOCK - 8
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", hlen))
            f.write(text + b" " * (hlen - len(text)))
            for raw in blobs:
                f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    # ----- reading -------------------------------------------------------------------------------
    def drop_cache(self, keys) -> None:
        """Evict the files' pages from the page cache (clean pages: no root needed)."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            p = self.path(key)
            if p.exists():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def _open(self, p: Path) -> tuple[int, bool]:
        if self.cold == "direct" and self._direct_ok is not False and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
                self._direct_ok = True
                return fd, True
            except OSError:
                self._direct_ok = False  # e.g. tmpfs: fall back to dropping pages
        fd = os.open(p, os.O_RDONLY)
        if self.cold != "none" and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd, False

    @property
    def mode(self) -> str:
        """The cold-read mode actually in use (``direct`` falls back to ``fadvise``)."""
        if self.cold == "direct" and self._direct_ok is False:
            return "fadvise"
        return self.cold

    def _buffer(self, size: int):
        """A page-aligned buffer (as O_DIRECT requires), reused when one was released."""
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return mmap.mmap(-1, size)

    def preallocate(self, count: int, file_bytes: int) -> None:
        """Fault in ``count`` read buffers for expert files of ``file_bytes`` up front, as an
        engine allocates its cache slots before serving (no page zeroing inside the run)."""
        size = -(-max(file_bytes, BLOCK) // BLOCK) * BLOCK
        for _ in range(int(count)):
            buf = mmap.mmap(-1, size)
            buf.write(b"\0" * size)
            with self._lock:
                self._free.setdefault(size, []).append(buf)

    def release(self, result: ReadResult) -> None:
        """Hand an evicted expert's buffer back; its tensors must no longer be used."""
        buf = result.buffer
        if buf is not None:
            result.tensors, result.buffer = {}, None
            with self._lock:
                self._free.setdefault(len(buf), []).append(buf)

    def read(self, key: int) -> ReadResult:
        """Read one expert from disk and parse it; raises ExecutorError if it is missing."""
        import torch

        p = self.path(key)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ExecutorError(f"{p}: expert file missing from the store; rebuild it "
                                f"('moesim run-real' writes the store)") from None
        fd, direct = self._open(p)
        try:
            n = -(-size // BLOCK) * BLOCK if direct else size
            end_at = self.limiter.reserve(n) if self.limiter else None
            buf = self._buffer(-(-max(n, BLOCK) // BLOCK) * BLOCK)
            view = memoryview(buf)
            got = 0
            while got < n:
                r = os.preadv(fd, [view[got:n]], got)
                if r <= 0:
                    break
                got += r
        finally:
            os.close(fd)
        if end_at is not None:
            self.limiter.finish(end_at)
        if got < size:
            raise ExecutorError(f"{p}: short read ({got} of {size} bytes)")
        (hlen,) = struct.unpack_from("<Q", buf, 0)
        header = json.loads(bytes(view[8:8 + hlen]))
        base = 8 + hlen
        tensors, payload = {}, 0
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            lo, hi = spec["data_offsets"]
            dt = _torch_dtype(spec["dtype"])
            t = torch.frombuffer(buf, dtype=dt, count=(hi - lo) // dt.itemsize, offset=base + lo)
            tensors[name] = t.view(spec["shape"])
            payload += hi - lo
        return ReadResult(int(key), tensors, payload, size, got, buf)
