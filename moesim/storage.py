"""Edge storage hierarchies and the flash I/O model.

Experts live on flash/SSD, are read into DRAM (and, on a discrete-GPU box, copied to the
accelerator). ``FlashIO`` turns the reads of one token into time the way an expert-streaming
engine spends it: each read costs a per-read latency plus its bytes (rounded up to whole pages)
at one I/O thread's bandwidth; ``threads`` threads share the reads, so the summed thread time
(what ``qwen.metrics`` calls io_ms) divided by the threads is the I/O wall time, of which a
calibrated fraction is exposed as stall; cache management (mapping, copies) costs time per
byte and per read. ``calibrate`` fits these constants to a measured run by least squares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from moesim.errors import MoesimError, unknown_name


class StorageError(MoesimError):
    """A storage preset or calibration a user can fix."""


@dataclass(frozen=True)
class FlashIO:
    """Per-token flash read model (seconds, bytes)."""

    thread_bw: float  # bytes/s one I/O thread sustains
    threads: int = 4
    read_latency: float = 100e-6  # seconds per read request
    page_size: int = 4096  # reads are whole pages
    token_overhead: float = 0.0  # seconds of thread time per token with reads
    exposed: float = 1.0  # fraction of the I/O wall time not hidden behind compute
    mgmt_per_byte: float = 0.0  # seconds per byte of cache management
    mgmt_per_read: float = 0.0
    source: str = ""

    def __post_init__(self):
        if self.thread_bw <= 0 or self.threads < 1 or self.page_size < 1:
            raise StorageError("flash I/O needs thread_bw > 0, threads >= 1 and page_size >= 1")

    def paged(self, nbytes) -> np.ndarray:
        nbytes = np.asarray(nbytes, dtype=float)
        return np.ceil(nbytes / self.page_size) * self.page_size

    def thread_time(self, total_bytes, reads) -> np.ndarray:
        """Summed I/O-thread seconds for ``reads`` reads of ``total_bytes`` (arrays per token)."""
        total_bytes, reads = np.asarray(total_bytes, float), np.asarray(reads, float)
        per_read = np.divide(total_bytes, reads, out=np.zeros_like(total_bytes), where=reads > 0)
        t = reads * (self.read_latency + self.paged(per_read) / self.thread_bw)
        return np.where(reads > 0, t + self.token_overhead, 0.0)

    def wall_time(self, total_bytes, reads) -> np.ndarray:
        return self.thread_time(total_bytes, reads) / self.threads

    def stall_time(self, total_bytes, reads) -> np.ndarray:
        return self.exposed * self.wall_time(total_bytes, reads)

    def mgmt_time(self, total_bytes, reads) -> np.ndarray:
        return self.mgmt_per_byte * np.asarray(total_bytes, float) + self.mgmt_per_read * np.asarray(reads, float)

    def token_time(self, compute_s, total_bytes, reads) -> np.ndarray:
        """Per-token wall time: compute + exposed I/O + cache management."""
        return np.asarray(compute_s, float) + self.stall_time(total_bytes, reads) + self.mgmt_time(total_bytes, reads)

    # the replay's interface
    def read_time(self, nbytes: float, reads: int | None = None) -> float:
        reads = reads if reads is not None else (1 if nbytes > 0 else 0)
        return float(self.wall_time(nbytes, reads))

    def batch_time(self, stream, b: int, nbytes: float, reads: int) -> float:
        return float(self.stall_time(nbytes, reads) + self.mgmt_time(nbytes, reads))

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(total_bytes, reads, io_s, stall_s=None, mgmt_s=None, *, threads: int = 4,
              page_size: int = 4096, read_latency: float | None = None, source: str = "") -> FlashIO:
    """Fit a FlashIO to measured tokens: io_s = summed thread seconds (least squares on
    reads x latency + paged bytes / bandwidth + overhead), stall_s = exposed x io_s / threads,
    mgmt_s = a x bytes + b x reads. Arrays are per token. When reads are all about the same size,
    bytes and reads are collinear: pass the device's ``read_latency`` to fit only the bandwidth."""
    b = np.asarray(total_bytes, float)
    r = np.asarray(reads, float)
    io = np.asarray(io_s, float)
    if not (len(b) == len(r) == len(io)) or len(b) < 3:
        raise StorageError("calibration needs at least 3 tokens with bytes, reads and I/O time")
    mask = r > 0
    if read_latency is None:
        X = np.c_[r[mask], b[mask], np.ones(mask.sum())]
        (lat, inv_bw, over), *_ = np.linalg.lstsq(X, io[mask], rcond=None)
    else:
        lat = float(read_latency)
        X = np.c_[b[mask], np.ones(mask.sum())]
        (inv_bw, over), *_ = np.linalg.lstsq(X, io[mask] - lat * r[mask], rcond=None)
    if inv_bw <= 0:
        raise StorageError("calibration found no positive bandwidth: are bytes and I/O time aligned?")
    model = FlashIO(thread_bw=1.0 / inv_bw, threads=threads, read_latency=max(lat, 0.0), page_size=page_size,
                    token_overhead=max(over, 0.0), source=source)
    exposed, mpb, mpr = 1.0, 0.0, 0.0
    wall = model.wall_time(b, r)
    if stall_s is not None:
        st = np.asarray(stall_s, float)
        exposed = float(np.dot(wall, st) / max(np.dot(wall, wall), 1e-30))
    if mgmt_s is not None:
        mg = np.asarray(mgmt_s, float)
        (mpb, mpr), *_ = np.linalg.lstsq(np.c_[b, r], mg, rcond=None)
    return FlashIO(**{**model.to_dict(), "exposed": exposed, "mgmt_per_byte": float(mpb),
                      "mgmt_per_read": float(mpr)})


def mape(pred, actual) -> float:
    """Mean absolute percentage error, in percent."""
    pred, actual = np.asarray(pred, float), np.asarray(actual, float)
    return float(np.mean(np.abs(pred - actual) / np.abs(actual)) * 100.0)


# ----- hierarchies -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageHierarchy:
    """Where offloaded experts come from and how they reach the compute device.

    ``flash`` reads (per-thread bandwidth, latency, pages) bring an expert into DRAM; on a
    discrete accelerator ``host_link_bw`` then copies it to device memory (0 = unified memory).
    """

    name: str
    flash: FlashIO
    dram_bytes: float
    accel_bytes: float
    host_link_bw: float = 0.0
    host_link_latency: float = 0.0
    source: str = ""

    def load_time(self, nbytes: float, tier: str = "flash") -> float:
        """Seconds to bring one expert of ``nbytes`` to the compute device from ``tier``."""
        if tier not in ("flash", "dram"):
            raise StorageError(f"unknown source tier {tier!r}; choose flash or dram")
        t = self.flash.read_time(nbytes) if tier == "flash" else 0.0
        if self.host_link_bw > 0:
            t += self.host_link_latency + nbytes / self.host_link_bw
        return t


def _from_machine(name: str, threads: int) -> StorageHierarchy:
    from moesim.hardware import get_machine

    m = get_machine(name)
    link = m.storage_link
    # one I/O thread of `threads` gets an equal share of the device's sequential bandwidth
    flash = FlashIO(thread_bw=link.bandwidth / threads, threads=threads, read_latency=link.latency,
                    page_size=4096, source=link.source)
    dram = m.host.memory.capacity
    accel = m.accelerator.memory.capacity if m.accelerator is not None and m.host_link is not None else 0.0
    host_bw = m.host_link.bandwidth if m.host_link is not None else 0.0
    host_lat = m.host_link.latency if m.host_link is not None else 0.0
    return StorageHierarchy(name, flash, dram, accel, host_bw, host_lat, m.source)


STORAGE_PRESETS = {
    "phone-ufs4": ("phone-sd8g3", 4),
    "orin-nvme": ("jetson-agx-orin", 4),
    "desktop-4090": ("desktop-4090", 4),
}


def storage_names() -> list[str]:
    return sorted(STORAGE_PRESETS)


def get_storage(name: str) -> StorageHierarchy:
    if name not in STORAGE_PRESETS:
        raise unknown_name("storage preset", name, STORAGE_PRESETS)
    machine, threads = STORAGE_PRESETS[name]
    return _from_machine(machine, threads)


@dataclass(frozen=True)
class LinkIO:
    """Demand loads over one link (e.g. PCIe host -> GPU): per-read latency + bytes / bandwidth,
    loads serialised; the replay's stall model for a GPU with experts in host memory."""

    bandwidth: float
    latency: float = 0.0

    def read_time(self, nbytes: float, reads: int | None = None) -> float:
        reads = reads if reads is not None else (1 if nbytes > 0 else 0)
        return reads * self.latency + nbytes / self.bandwidth

    def batch_time(self, stream, b, nbytes, reads) -> float:
        return self.read_time(nbytes, reads)


def io_for(device: str):
    """The replay's I/O model for a device preset name: flash presets stream from flash; the
    desktop reads experts from DRAM over PCIe."""
    h = get_storage(device)
    if h.host_link_bw > 0:
        return LinkIO(h.host_link_bw, h.host_link_latency)
    return h.flash


# ----- a disk shared by concurrent reads ------------------------------------------------------------
@dataclass(frozen=True)
class SharedDisk:
    """One disk read by several I/O threads at once (seconds, bytes, bytes/s).

    A read costs ``latency`` (its own, overlapping other reads) and then moves its bytes on the
    disk. ``stream_bw`` is what one read reaches alone; ``total_bw`` what all concurrent reads
    reach together. While ``n`` reads move bytes each gets ``min(stream_bw, total_bw / n)``
    (fair sharing): ``total_bw = n * stream_bw`` is ``n`` independent channels, ``total_bw =
    stream_bw`` one disk split evenly. A read's bytes are its payload plus ``header_bytes``,
    rounded up to ``block`` (O_DIRECT reads whole blocks)."""

    latency: float
    stream_bw: float
    total_bw: float
    header_bytes: int = 0
    block: int = 1

    def __post_init__(self):
        if self.latency < 0 or self.stream_bw <= 0 or self.total_bw <= 0 or self.block < 1:
            raise StorageError("a shared disk needs latency >= 0, bandwidths > 0 and block >= 1")

    def disk_bytes(self, payload: float) -> float:
        return float(np.ceil((payload + self.header_bytes) / self.block) * self.block)

    def solo_s(self, payload: float) -> float:
        """Seconds of one read with the disk to itself."""
        return self.latency + self.disk_bytes(payload) / self.stream_bw

    def rate(self, active: int) -> float:
        """Bytes/s each of ``active`` concurrent reads gets."""
        return min(self.stream_bw, self.total_bw / max(int(active), 1))


class FairShare:
    """SimPy fluid model of a :class:`SharedDisk`: ``transfer(nbytes)`` returns an event that
    fires when those bytes have moved, every active transfer progressing at ``disk.rate(n)``."""

    def __init__(self, env, disk: SharedDisk):
        self.env, self.disk = env, disk
        self._active: list[list] = []  # [remaining bytes, event]
        self._last = env.now
        self._changed = env.event()
        env.process(self._serve())

    def transfer(self, nbytes: float):
        done = self.env.event()
        self._advance()
        self._active.append([float(nbytes), done])
        if not self._changed.triggered:
            self._changed.succeed()
        return done

    def _advance(self) -> None:
        dt = self.env.now - self._last
        if dt > 0 and self._active:
            moved = self.disk.rate(len(self._active)) * dt
            for item in self._active:
                item[0] -= moved
        self._last = self.env.now

    def _serve(self):
        env = self.env
        while True:
            if not self._active:
                self._changed = env.event()
                yield self._changed
                continue
            rate = self.disk.rate(len(self._active))
            next_done = max(min(item[0] for item in self._active) / rate, 0.0)
            self._changed = env.event()
            yield env.any_of([env.timeout(next_done), self._changed])
            self._advance()
            # a transfer is done when less than a nanosecond of its bytes is left
            left = []
            for item in self._active:
                if item[0] <= rate * 1e-9:
                    item[1].succeed()
                else:
                    left.append(item)
            self._active = left
