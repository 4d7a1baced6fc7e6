"""What a hostile client sends a model server, built from the formats' own markers: image bombs,
stalled gRPC calls, silent reconnecting sockets. ``bench.serving`` measures the server under them;
``tests/test_serve_hostile.py`` keeps each as a test. Every loop here is bounded and every
target is the caller's own server on 127.0.0.1."""

from __future__ import annotations

import selectors
import socket
import threading
import time
import zlib


def png_bomb(width: int = 6300, height: int = 6300, depth: int = 16, color: int = 6) -> bytes:
    """A PNG of zeros whose pixels would take gigabytes, compressed to a few hundred kB (the
    default: 6300x6300 16-bit RGBA, 308 kB that decode to 2 GB)."""
    def chunk(kind, payload):
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    row = b"\0" * (1 + width * depth // 8 * {0: 1, 2: 3, 4: 2, 6: 4}[color])
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, color, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


class _Bits:
    """Entropy-coded bits, most significant first, with JPEG's 0xFF byte stuffing."""

    def __init__(self):
        self.out, self.acc, self.n = bytearray(), 0, 0

    def put(self, value: int, bits: int) -> None:
        for i in reversed(range(bits)):
            self.acc = self.acc << 1 | (value >> i & 1)
            self.n += 1
            if self.n == 8:
                self.out += b"\xff\x00" if self.acc == 0xFF else bytes([self.acc])
                self.acc, self.n = 0, 0

    def done(self) -> bytes:
        if self.n:
            self.put((1 << (8 - self.n)) - 1, 8 - self.n)  # padded with ones
        return bytes(self.out)


def jpeg_bomb(width: int, height: int, components: int = 1, ac_scans: int = 0, dc_bytes: int | None = None) -> bytes:
    """A progressive JPEG written marker by marker: one DC scan of every component (each block 0),
    then ``ac_scans`` AC scans that are nothing but end-of-band runs (a few bytes each, and a pass
    over every block of the image for libjpeg). ``dc_bytes`` cuts the DC scan's data short
    (libjpeg pads the rest, having allocated the whole image's coefficients first).

    ``jpeg_bomb(2000, 2000, ac_scans=60_000)``: ~850 kB, 14 s of libjpeg's CPU;
    ``jpeg_bomb(13000, 13000, 3, dc_bytes=900)``: ~1 kB, ~970 MB of coefficient buffers."""
    ids = range(1, components + 1)
    out = b"\xff\xd8" + _segment(0xDB, b"\x00" + b"\x01" * 64)  # SOI, a quantisation table of ones
    out += _segment(0xC2, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([components])
                    + b"".join(bytes([c, 0x11, 0]) for c in ids))  # SOF2: progressive, no subsampling
    one_code = bytes([1] + [0] * 15)  # a Huffman table of one 1-bit code, "0"
    out += _segment(0xC4, b"\x00" + one_code + b"\x00" + b"\x10" + one_code + b"\xe0")  # DC: diff 0; AC: EOB run
    blocks = -(-width // 8) * -(-height // 8)
    dc = _Bits()
    for _ in range(blocks * components if dc_bytes is None else min(blocks * components, 8 * dc_bytes)):
        dc.put(0, 1)
    out += _segment(0xDA, bytes([components]) + b"".join(bytes([c, 0x00]) for c in ids) + b"\x00\x00\x00") + dc.done()
    for scan in range(ac_scans):
        bits, left = _Bits(), blocks
        while left > 0:  # end-of-band runs of up to 32,767 blocks: symbol 0xE0 and 14 bits
            run = min(left, 32767)
            bits.put(0, 1)
            bits.put(run - 16384, 14)
            left -= run
        out += _segment(0xDA, bytes([1, ids[scan % components], 0x00, 1, 63, 0])) + bits.done()
    return out + b"\xff\xd9"


class SilentSockets:
    """``count`` connections to ``port`` that never send a byte and reconnect as soon as the server
    closes one, until ``stop()`` (or ``seconds``): a client that keeps a server's connection slots
    full. ``reconnects`` counts how often the server closed one. Runs in one thread (selectors)."""

    def __init__(self, port: int, count: int, seconds: float = 120):
        self.port, self.count, self.seconds = port, count, seconds
        self.reconnects, self.open = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 60
        while self.open < self.count and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _connect(self, selector) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        selector.register(s, selectors.EVENT_READ)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        end = time.monotonic() + self.seconds
        try:
            for _ in range(self.count):
                self._connect(selector)
                self.open += 1
            while not self._stop.is_set() and time.monotonic() < end:
                for key, _ in selector.select(timeout=0.1):
                    try:
                        data = key.fileobj.recv(4096)
                    except OSError:
                        data = b""
                    if not data:  # closed by the server: in again at once
                        selector.unregister(key.fileobj)
                        key.fileobj.close()
                        self.reconnects += 1
                        self._connect(selector)
        finally:
            for key in list(selector.get_map().values()):
                key.fileobj.close()
            selector.close()


def stalled_grpc_calls(target: str, count: int, method: str = "/tensorflow.serving.PredictionService/Predict"):
    """``count`` gRPC calls to ``target`` that open their request stream and never send a message
    (no deadline). Returns ``release()``, which lets them go (they end cancelled)."""
    import grpc  # the grpc extra

    channel = grpc.insecure_channel(target)
    gate = threading.Event()

    def never():
        gate.wait(600)
        return
        yield  # a generator that sends nothing

    call = channel.stream_unary(method, request_serializer=lambda m: m, response_deserializer=lambda b: b)
    futures = [call.future(never()) for _ in range(count)]

    def release() -> None:
        gate.set()
        for f in futures:
            f.cancel()
        channel.close()
    return release
