"""FFN layers read whole from flash, through a ring of chunk buffers that reader threads keep filling.

The layers a plan streams are read in execution order, token after token: weights never change, so the
sequence of reads (layer, chunk of rows) is the same every token, and a read may run as far ahead of the
compute as the ring has free slots, across layers and across tokens (the next token's first streamed
layer is read while this token's last layers, attention and lm_head compute). Each of `threads` reader
threads loops: claim the next chunk of the sequence (one lock), read it with one preadv (O_DIRECT: the
GIL is released, the page cache is not used) into its slot, check it (numba without the GIL, or zlib),
mark it ready. The compute thread takes the layer it runs and frees its slots: with a ring of at least
two layers each layer's chunks sit in consecutive slots and the kernel runs once over the whole layer
(the same call on the same bytes as dense mode: identical results) while the readers fill the next
layers; with a smaller ring the kernel runs over each chunk as it arrives (the FFN is a sum over
neurons; the order of that sum is fixed by the chunks, not by timing). Either way the disk is never idle
while a slot is free. Nothing is allocated per token: slots, views and the read sequence are built once.

Where the rows come from (RowSource): the packed copy (ffn_packed.safetensors, rows back to back,
chunks of whole checksum groups, runtime/packed_rows.py) or, in folders without one, ffn.safetensors
(rows at their padded stride, checked by their CRC-32 from conversion). Both hold the same row bytes,
so a layer computes the same function from either and as in dense mode.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np

from .modelfile import ModelFileError, ModelFolder, RowCheck
from .group_sums import first_bad_group
from .packed_rows import BLOCK

CHUNK_BYTES = 3 << 19          # ~1.5 MiB per read: >= 1 MiB reads reach the disk's sequential rate here


@dataclass(frozen=True)
class RowSource:
    """Whole-layer reads of one file: layer i's row r is at layer_offsets[i] + r * stride (bytes)."""
    path: str
    layer_offsets: tuple[int, ...]
    stride: int                 # bytes between rows in the file
    n_rows: int
    unit_rows: int              # chunks are whole multiples of this many rows (aligned reads, whole check groups)
    dtype: np.dtype             # the kernels' view of a row
    sums: np.ndarray | None = None      # packed: [n_layers, n_groups] uint64 (unit_rows = group rows)
    row_crc: RowCheck | None = None     # bundle file: its rows' CRC-32 (each row checked once per process)
    direct: bool = True         # O_DIRECT (RuntimeConfig.io "direct"), else through the page cache

    @property
    def layer_bytes(self) -> int:
        return self.n_rows * self.stride

    @classmethod
    def of_folder(cls, folder: ModelFolder, row_crc=None, *, verify: bool = True, direct: bool = True) -> "RowSource":
        """The packed copy when the folder has one, else the bundle file itself."""
        b = folder.bundles
        p = folder.packed
        if p is not None:
            sums = None
            if verify:
                with open(folder.file(p.file), "rb") as f:
                    f.seek(p.sums_offset)
                    n = folder.config.n_layers * p.n_groups
                    sums = np.frombuffer(f.read(n * 8), np.uint64).reshape(folder.config.n_layers, p.n_groups).copy()
            return cls(str(folder.file(p.file)), p.layer_offsets, p.row_bytes, p.n_rows, p.group_rows, b.dtype,
                       sums=sums, direct=direct)
        unit = unit_rows_of(b.stride_bytes, False, b.row_bytes)
        return cls(str(folder.file(b.file)), b.layer_offsets, b.stride_bytes, b.n_rows, unit, b.dtype,
                   row_crc=row_crc if verify else None, direct=direct)

    def chunk_rows(self, ring_bytes: int) -> int:
        return ring_shape(self.stride, self.unit_rows, self.n_rows, ring_bytes)[0]

    def slot_bytes(self, chunk_rows: int) -> int:
        return -(-chunk_rows * self.stride // BLOCK) * BLOCK

    def check(self, layer: int, lo: int, hi: int, rows: np.ndarray) -> None:
        """Raise ModelFileError if rows lo..hi-1 of `layer` (as read into `rows`) differ from the conversion's."""
        if self.sums is not None:
            g0 = lo // self.unit_rows
            words = rows.view(np.uint8).reshape(-1)[:(hi - lo) * self.stride].view(np.uint16)
            g1 = -(-hi // self.unit_rows)
            bad = first_bad_group(words, self.unit_rows * self.stride // 2, words.shape[0], self.sums[layer, g0:g1])
            if bad >= 0:
                raise ModelFileError(f"{self.path}: layer {layer} rows {lo + bad * self.unit_rows}.. fail their "
                                     "checksum: the packed FFN file is corrupt; re-convert the model")
        elif self.row_crc is not None:
            self.row_crc.check(rows[:hi - lo], np.arange(lo, hi), layer)

    def open(self) -> int:
        """An O_DIRECT descriptor (buffered where the filesystem refuses O_DIRECT)."""
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        if not self.direct:
            return os.open(self.path, flags)
        try:
            fd = os.open(self.path, flags | getattr(os, "O_DIRECT", 0))
            probe = mmap.mmap(-1, BLOCK)
            try:
                os.preadv(fd, [probe], 0)
            finally:
                probe.close()
            return fd
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise ModelFileError(f"{self.path}: cannot open for flash reads ({e.strerror or e})") from None
            try:
                os.close(fd)
            except (OSError, UnboundLocalError):
                pass
            return os.open(self.path, flags)

    def read_layer(self, layer: int, out: np.ndarray) -> None:
        """Read a whole layer into out [n_rows, stride / itemsize] (page-aligned) and check it: resident layers."""
        fd = self.open()
        try:
            mv = memoryview(out.view(np.uint8).reshape(-1))
            need = self.layer_bytes
            # O_DIRECT reads whole blocks: the whole blocks straight into out, a layer's last partial
            # block (packed rows of a small layer, e.g. 160 q8_0 rows of 204 B) through a bounce block
            head = need // BLOCK * BLOCK
            if head:
                _read_full(fd, mv[:head], self.layer_offsets[layer], head, self.path, layer)
            if need > head:
                bounce = mmap.mmap(-1, BLOCK)
                try:
                    _read_full(fd, memoryview(bounce), self.layer_offsets[layer] + head, need - head, self.path, layer)
                    mv[head:need] = bounce[:need - head]
                finally:
                    bounce.close()
        finally:
            os.close(fd)
        self.check(layer, 0, self.n_rows, out)


def unit_rows_of(stride: int, packed: bool, row_bytes: int) -> int:
    """Rows per chunk unit: packed rows in whole checksum groups, padded rows in whole blocks."""
    if packed:
        return BLOCK // math.gcd(row_bytes, BLOCK)
    return 1 if stride >= BLOCK else BLOCK // stride


def ring_shape(stride: int, unit_rows: int, n_rows: int, ring_bytes: int) -> tuple[int, int, int]:
    """(rows per chunk, slots, bytes per slot) of a ring of about ring_bytes: chunks of ~CHUNK_BYTES, at most
    a quarter of the ring (several reads in flight), whole units, slots rounded up to whole blocks; never
    fewer than two slots (the planner counts n_slots * slot bytes, which may then exceed ring_bytes)."""
    unit_bytes = unit_rows * stride
    units = max(1, min(CHUNK_BYTES, ring_bytes // 4) // unit_bytes)
    total = -(-n_rows // unit_rows)
    # a divisor of the layer's units when one is near (8960 rows of 2592 B: 14 chunks of 640 rows), so a
    # ring of two layers holds exactly two layers' chunks
    near = [k for k in range(max(1, units // 2), 2 * units + 1) if total % k == 0 and k * unit_bytes <= max(ring_bytes // 2, unit_bytes)]
    units = min(near, key=lambda k: abs(math.log(k / units))) if near else units
    chunk = min(n_rows, units * unit_rows)
    slot = -(-chunk * stride // BLOCK) * BLOCK
    return chunk, max(2, ring_bytes // slot), slot


def _read_full(fd, mv, offset, need, path, layer) -> tuple[int, int]:
    """Read at least `need` bytes into mv from offset (a read past the file's end stops at it)."""
    want = mv.nbytes
    got, calls = 0, 0
    while got < need:
        try:
            n = os.preadv(fd, [mv[got:want]], offset + got)
        except OSError as e:
            raise ModelFileError(f"{path}: reading layer {layer} failed ({e.strerror or e}); the file is "
                                 "truncated or unreadable") from None
        calls += 1
        if n <= 0:
            raise ModelFileError(f"{path}: layer {layer} ends after {got} of {need} bytes: the file is truncated")
        got += n
    return got, calls


def aligned_length(nbytes: int, cap: int) -> int:
    return min(cap, -(-nbytes // BLOCK) * BLOCK)


class _Ring:
    """What the reader threads share with the compute thread (no reference to the streamer: an abandoned
    streamer is collected and its finalizer stops the readers)."""

    def __init__(self, source: RowSource, order: list[int], chunk_rows: int, n_slots: int):
        self.source = source
        self.cond = threading.Condition()
        self.n_slots = n_slots
        slot_bytes = source.slot_bytes(chunk_rows)
        self.mem = mmap.mmap(-1, n_slots * slot_bytes)
        flat = np.frombuffer(self.mem, np.uint8)
        items = source.stride // source.dtype.itemsize
        self.slot_mv = [memoryview(self.mem)[k * slot_bytes:(k + 1) * slot_bytes] for k in range(n_slots)]
        self.slot_rows = [flat[k * slot_bytes:k * slot_bytes + chunk_rows * source.stride].view(source.dtype)
                          .reshape(chunk_rows, items) for k in range(n_slots)]
        # Slots without padding are one [n_slots * chunk_rows, items] array (a whole layer's chunks in one view).
        contiguous = slot_bytes == chunk_rows * source.stride
        self.all_rows = flat.view(source.dtype).reshape(n_slots * chunk_rows, items) if contiguous else None
        # The read sequence, one cycle: (layer, rows lo..hi, file offset, bytes to read, bytes needed).
        self.item_layer, self.item_lo, self.item_hi, self.item_off, self.item_len, self.item_need = ([] for _ in range(6))
        for layer in order:
            for lo in range(0, source.n_rows, chunk_rows):
                hi = min(source.n_rows, lo + chunk_rows)
                need = (hi - lo) * source.stride
                self.item_layer.append(layer)
                self.item_lo.append(lo)
                self.item_hi.append(hi)
                self.item_off.append(source.layer_offsets[layer] + lo * source.stride)
                self.item_len.append(aligned_length(need, slot_bytes))
                self.item_need.append(need)
        self.n_items = len(self.item_layer)
        self.claimed = 0             # next sequence number a reader takes
        self.freed = 0               # sequence numbers < freed are consumed (their slots free)
        self.in_flight = 0
        self.ready = [-1] * n_slots  # the sequence number whose rows slot k holds, checked
        self.paused = False
        self.horizon = float("inf")  # no read past this sequence number (without read-ahead: the current layer's end)
        self.closed = False
        self.error: BaseException | None = None
        self.bytes_read = self.reads = 0
        self.read_s = 0.0            # summed duration of the reads (their rate: bytes / read_s per reader)
        self.busy_s = 0.0            # wall time with at least one read in flight
        self._busy_since = 0.0
        self.fd = source.open()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


def _reader(ring: _Ring) -> None:
    cond, src = ring.cond, ring.source
    while True:
        with cond:
            while not ring.closed and (ring.paused or ring.claimed >= min(ring.freed + ring.n_slots, ring.horizon)):
                cond.wait()
            if ring.closed:
                return
            seq = ring.claimed
            ring.claimed += 1
            if ring.in_flight == 0:
                ring._busy_since = time.perf_counter()
            ring.in_flight += 1
        item, slot = seq % ring.n_items, seq % ring.n_slots
        layer = ring.item_layer[item]
        error = None
        got = calls = 0
        t0 = time.perf_counter()
        try:
            got, calls = _read_full(ring.fd, ring.slot_mv[slot][:ring.item_len[item]], ring.item_off[item],
                                    ring.item_need[item], src.path, layer)
            t1 = time.perf_counter()
            src.check(layer, ring.item_lo[item], ring.item_hi[item], ring.slot_rows[slot])
        except BaseException as e:  # noqa: BLE001 - handed to the compute thread, which raises it
            error, t1 = e, time.perf_counter()
        with cond:
            ring.in_flight -= 1
            if ring.in_flight == 0:
                ring.busy_s += time.perf_counter() - ring._busy_since
            if error is not None:
                ring.error = ring.error or error
            else:
                ring.ready[slot] = seq
                ring.bytes_read += got
                ring.reads += calls
                ring.read_s += t1 - t0
            cond.notify_all()


def _shutdown(ring: _Ring, threads: list[threading.Thread]) -> None:
    ring.close()
    for t in threads:
        if t is not threading.current_thread():
            t.join(timeout=10)
    try:
        os.close(ring.fd)
    except OSError:
        pass


class RingStreamer:
    """compute(layer, h, out): the FFN of a streamed layer over its rows as they arrive (see the module doc).

    `order` lists the streamed layers in execution order; `ring_bytes` is what the plan gave the buffers.
    Counters (bytes_read, reads, read_s, busy_s) are the readers'; stats (an FFNStats) gets the compute
    thread's waits (io_s), kernel time (ffn_s) and streamed_layers."""

    def __init__(self, source: RowSource, kernel, biases: list, order: list[int], ring_bytes: int, stats, *,
                 threads: int = 4, read_ahead: bool = True):
        if not order:
            raise ValueError("a ring streamer needs at least one streamed layer")
        chunk, n_slots, _ = ring_shape(source.stride, source.unit_rows, source.n_rows, ring_bytes)
        self.source, self.kernel, self.biases, self.stats = source, kernel, biases, stats
        self.chunk_rows, self.n_slots = chunk, n_slots
        n_chunks = -(-source.n_rows // chunk)
        # A ring of whole layers: each layer's chunks then sit in consecutive slots (every layer starts at a
        # multiple of n_chunks), and the kernel runs once over the whole layer once it is in: the same call,
        # on the same bytes, as dense mode's (identical results), while the readers fill the other layers.
        self.whole_layers = n_slots >= 2 * n_chunks and chunk * source.stride % BLOCK == 0
        if self.whole_layers:
            n_slots -= n_slots % n_chunks
        self.ring = ring = _Ring(source, list(order), chunk, n_slots)
        self.ring_bytes = n_slots * source.slot_bytes(chunk)
        self.n_chunks = n_chunks
        self.first_item = {layer: k * self.n_chunks for k, layer in enumerate(order)}
        self.all_ids = all_neurons = np.arange(source.n_rows, dtype=np.int32)
        self.ids = [all_neurons[ring.item_lo[i]:ring.item_hi[i]] for i in range(ring.n_items)]
        self.tmp = np.zeros((1, kernel.d), np.float32)        # grows once to a prompt chunk
        self.next_seq = 0            # the compute thread's next sequence number
        self.read_ahead = read_ahead     # False: a layer's reads start when it runs (the --no-pipeline baseline)
        if not read_ahead:
            ring.horizon = 0
        self.threads = [threading.Thread(target=_reader, args=(ring,), daemon=True, name=f"flashlm-stream-{i}")
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()
        self._finalizer = weakref.finalize(self, _shutdown, ring, self.threads)

    def compute(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        ring, st = self.ring, self.stats
        if ring.item_layer[self.next_seq % ring.n_items] != layer or ring.item_lo[self.next_seq % ring.n_items]:
            self._resync(layer)
        T = h.shape[0]
        if self.tmp.shape[0] < T:
            self.tmp = np.zeros((T, self.kernel.d), np.float32)
        tmp = self.tmp[:T]
        cond = ring.cond
        if not self.read_ahead:
            with cond:
                ring.horizon = self.next_seq + self.n_chunks
                cond.notify_all()
        # whole layers: wait for all its chunks, one kernel call; else one call per chunk as it arrives
        step = self.n_chunks if self.whole_layers else 1
        for k in range(0, self.n_chunks, step):
            seq = self.next_seq
            slot, item = seq % ring.n_slots, seq % ring.n_items
            t0 = time.perf_counter()
            with cond:
                for j in range(step):
                    while ring.ready[slot + j] != seq + j:
                        if ring.error is not None:
                            raise ring.error
                        cond.wait()
            t1 = time.perf_counter()
            if step == 1:
                rows, ids = ring.slot_rows[slot], self.ids[item]
            else:
                rows = ring.all_rows[slot * self.chunk_rows:slot * self.chunk_rows + self.source.n_rows]
                ids = self.all_ids
            self.kernel(h, rows, len(ids), ids, self.biases[layer], out if k == 0 else tmp)
            if k:
                out += tmp
            t2 = time.perf_counter()
            with cond:
                for j in range(step):
                    ring.ready[slot + j] = -1
                ring.freed += step
                cond.notify_all()
            self.next_seq = seq + step
            st.io_s += t1 - t0
            st.ffn_s += t2 - t1
        st.streamed_layers += 1

    def _resync(self, layer: int) -> None:
        """Restart the read sequence at `layer` (a forward pass that did not follow the order, e.g. after
        an error mid-token): wait for the reads in flight, drop what the ring holds."""
        ring = self.ring
        if layer not in self.first_item:
            raise ValueError(f"layer {layer} is not streamed")
        with ring.cond:
            ring.paused = True
            while ring.in_flight:
                ring.cond.wait()
            base = ring.freed + ring.n_items       # past everything claimed so far, at the layer's first chunk
            seq = base - base % ring.n_items + self.first_item[layer]
            ring.claimed = ring.freed = self.next_seq = seq
            if not self.read_ahead:
                ring.horizon = seq
            ring.ready = [-1] * ring.n_slots
            ring.error = None
            ring.paused = False
            ring.cond.notify_all()

    def io_counts(self) -> tuple[int, int]:
        with self.ring.cond:
            return self.ring.bytes_read, self.ring.reads

    def settle(self) -> None:
        """Wait for the reads in flight (their bytes are then counted)."""
        ring = self.ring
        with ring.cond:
            while ring.in_flight and ring.error is None:
                ring.cond.wait()

    def reset_stats(self) -> None:
        ring = self.ring
        with ring.cond:
            ring.bytes_read = ring.reads = 0
            ring.read_s = ring.busy_s = 0.0
            ring._busy_since = time.perf_counter()

    def close(self) -> None:
        self._finalizer()
