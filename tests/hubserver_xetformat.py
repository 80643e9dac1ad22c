"""Xet's binary formats, as the test Hub's CAS (tests/hubserver_xet.py) reads and writes them (stdlib only).

Written from the Xet protocol specification (xet-core's docs: hashing, xorb, shard, api) and its
format sources; no code copied. What is here:

- BLAKE3 in keyed mode (pure Python: fine for the small inputs the merkle and verification hashes
  hash; far too slow to re-hash every chunk's data, which is why the CAS checks content by sha256 and
  by hf_xet's own file hash instead);
- Xet hashes: the string form of a 32-byte hash (four little-endian u64 in hex), the aggregated
  merkle hash (xorb hash; file hash = that, keyed with 32 zero bytes), term verification hashes;
- LZ4 frame decompression and the byte-grouping (BG4) inverse, the chunk compressions a xorb uses;
- xorbs as uploaded: chunk header + compressed chunk, one after the other (no footer on the wire);
- shards (MDB, header v2): the file info and CAS info sections of an uploaded shard (no footer), and
  a full shard with footer and lookup tables, as the global deduplication API answers.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# ----------------------------------------------------------------------------- BLAKE3 (keyed)
_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_CHUNK_START, _CHUNK_END, _PARENT, _ROOT, _KEYED = 1, 2, 4, 8, 16
_M32 = 0xFFFFFFFF
_BLAKE3_CHUNK = 1024


def _g(s: list, a: int, b: int, c: int, d: int, x: int, y: int) -> None:
    s[a] = (s[a] + s[b] + x) & _M32
    t = s[d] ^ s[a]
    s[d] = ((t >> 16) | (t << 16)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    t = s[b] ^ s[c]
    s[b] = ((t >> 12) | (t << 20)) & _M32
    s[a] = (s[a] + s[b] + y) & _M32
    t = s[d] ^ s[a]
    s[d] = ((t >> 8) | (t << 24)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    t = s[b] ^ s[c]
    s[b] = ((t >> 7) | (t << 25)) & _M32


def _compress(cv: tuple, block: bytes, counter: int, block_len: int, flags: int) -> list:
    m = list(struct.unpack("<16I", block.ljust(64, b"\0")))
    s = [*cv, *_IV[:4], counter & _M32, (counter >> 32) & _M32, block_len, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1])
        _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5])
        _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9])
        _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13])
        _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[i] for i in _PERM]
    return [s[i] ^ s[i + 8] for i in range(8)] + [s[i + 8] ^ cv[i] for i in range(8)]


def _chunk_output(key: tuple, data: bytes, index: int, flags: int) -> tuple:
    """(cv, last block, counter, block length, flags) of one 1 KiB BLAKE3 chunk, before its last compression."""
    blocks = [data[i:i + 64] for i in range(0, len(data), 64)] or [b""]
    cv = key
    for n, block in enumerate(blocks[:-1]):
        cv = tuple(_compress(cv, block, index, 64, flags | (_CHUNK_START if n == 0 else 0))[:8])
    start = _CHUNK_START if len(blocks) == 1 else 0
    return cv, blocks[-1], index, len(blocks[-1]), flags | start | _CHUNK_END


def _subtree_output(key: tuple, data: bytes, first_chunk: int, flags: int) -> tuple:
    n_chunks = max(1, -(-len(data) // _BLAKE3_CHUNK))
    if n_chunks == 1:
        return _chunk_output(key, data, first_chunk, flags)
    left_chunks = 1 << ((n_chunks - 1).bit_length() - 1)  # largest power of two leaving one chunk on the right
    split = left_chunks * _BLAKE3_CHUNK
    left = _compress(*_subtree_output(key, data[:split], first_chunk, flags))[:8]
    right = _compress(*_subtree_output(key, data[split:], first_chunk + left_chunks, flags))[:8]
    return key, struct.pack("<16I", *left, *right), 0, 64, flags | _PARENT


def blake3_keyed(key: bytes, data: bytes) -> bytes:
    """BLAKE3 keyed hash (32 bytes) of ``data`` under the 32-byte ``key``."""
    key_words = struct.unpack("<8I", key)
    cv, block, counter, block_len, flags = _subtree_output(key_words, bytes(data), 0, _KEYED)
    return struct.pack("<8I", *_compress(cv, block, counter, block_len, flags | _ROOT)[:8])


# ----------------------------------------------------------------------------- Xet hashes
DATA_KEY = bytes([102, 151, 245, 119, 91, 149, 80, 222, 49, 53, 203, 172, 165, 151, 24, 28, 157, 228, 33, 16, 155,
                  235, 43, 88, 180, 208, 176, 75, 147, 173, 242, 41])
INTERNAL_NODE_KEY = bytes([1, 126, 197, 199, 165, 71, 41, 150, 253, 148, 102, 102, 180, 138, 2, 230, 93, 221, 83, 111,
                           55, 199, 109, 210, 248, 99, 82, 230, 74, 83, 113, 63])
VERIFICATION_KEY = bytes([127, 24, 87, 214, 206, 86, 237, 102, 18, 127, 249, 19, 231, 165, 195, 243, 164, 205, 38, 213,
                          181, 219, 73, 230, 65, 36, 152, 127, 40, 251, 148, 195])
ZERO_KEY = bytes(32)
BOOKEND = b"\xff" * 32
MERKLE_BRANCHING = 4


def hash_hex(raw: bytes) -> str:
    """The string form of a Xet hash: each 8-byte group read as a little-endian u64, in hex."""
    return "".join(f"{w:016x}" for w in struct.unpack("<4Q", raw))


def hash_raw(text: str) -> bytes:
    """The inverse of ``hash_hex``; raises ValueError on anything but 64 lowercase hex digits."""
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise ValueError(f"not a Xet hash: {text!r}")
    return struct.pack("<4Q", *(int(text[i:i + 16], 16) for i in range(0, 64, 16)))


def chunk_hash(data: bytes) -> bytes:
    return blake3_keyed(DATA_KEY, data)


def _merge(entries: list[tuple[bytes, int]]) -> tuple[bytes, int]:
    text = "".join(f"{hash_hex(h)} : {size}\n" for h, size in entries)
    return blake3_keyed(INTERNAL_NODE_KEY, text.encode()), sum(size for _, size in entries)


def _next_cut(entries: list[tuple[bytes, int]]) -> int:
    """Where the next group of nodes ends: a node whose hash is 0 mod 4 closes it (2 to 9 nodes)."""
    if len(entries) <= 2:
        return len(entries)
    end = min(2 * MERKLE_BRANCHING + 1, len(entries))
    for i in range(2, end):
        if struct.unpack_from("<Q", entries[i][0], 24)[0] % MERKLE_BRANCHING == 0:
            return i + 1
    return end


def aggregated_hash(entries: list[tuple[bytes, int]]) -> bytes:
    """The root of Xet's aggregated merkle tree over (chunk hash, chunk size) pairs: the xorb hash."""
    if not entries:
        return ZERO_KEY
    level = list(entries)
    while len(level) > 1:
        merged, i = [], 0
        while i < len(level):
            cut = i + _next_cut(level[i:])
            merged.append(_merge(level[i:cut]))
            i = cut
        level = merged
    return level[0][0]


def file_hash(entries: list[tuple[bytes, int]]) -> bytes:
    return blake3_keyed(ZERO_KEY, aggregated_hash(entries)) if entries else ZERO_KEY


def verification_hash(chunk_hashes: list[bytes]) -> bytes:
    return blake3_keyed(VERIFICATION_KEY, b"".join(chunk_hashes))


# ----------------------------------------------------------------------------- chunk compression
class FormatError(ValueError):
    """A xorb or shard that does not parse; the CAS answers 400 with the message."""


def _lz4_length(src: bytes, i: int, length: int) -> tuple[int, int]:
    """A sequence's literal or match length: its 4-bit nibble, extended by bytes while they are 255."""
    if length == 15:
        while True:
            b = src[i]
            i += 1
            length += b
            if b != 255:
                break
    return length, i


def lz4_block(src: bytes, out: bytearray) -> None:
    """Decode one LZ4 block, appending to ``out`` (earlier output serves as the match window)."""
    i, n = 0, len(src)
    while i < n:
        token = src[i]
        i += 1
        length, i = _lz4_length(src, i, token >> 4)
        out += src[i:i + length]
        i += length
        if i >= n:
            return  # the last sequence carries literals only
        offset = src[i] | (src[i + 1] << 8)
        i += 2
        length, i = _lz4_length(src, i, token & 15)
        length += 4
        start = len(out) - offset
        if offset == 0 or start < 0:
            raise FormatError("LZ4 match points before the start of the data")
        if offset >= length:
            out += out[start:start + length]
        else:  # overlapping match: the last `offset` bytes repeat
            pattern = bytes(out[start:])
            out += (pattern * (length // offset + 1))[:length]


def lz4_frame(data: bytes) -> bytes:
    """Decompress LZ4 frames (the format lz4_flex's FrameEncoder writes), checksums not verified."""
    out, i = bytearray(), 0
    while i < len(data):
        magic = struct.unpack_from("<I", data, i)[0]
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
            i += 8 + struct.unpack_from("<I", data, i + 4)[0]
            continue
        if magic != 0x184D2204:
            raise FormatError(f"not an LZ4 frame (magic {magic:#x})")
        flg = data[i + 4]
        if flg >> 6 != 1:
            raise FormatError("unsupported LZ4 frame version")
        i += 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1  # FLG, BD, [size], [dict], HC
        while True:
            size = struct.unpack_from("<I", data, i)[0]
            i += 4
            if size == 0:
                break
            block, i = data[i:i + (size & 0x7FFFFFFF)], i + (size & 0x7FFFFFFF)
            if size & 0x80000000:
                out += block
            else:
                lz4_block(block, out)
            i += 4 if flg & 0x10 else 0
        i += 4 if flg & 0x04 else 0
    return bytes(out)


def bg4_regroup(grouped: bytes) -> bytes:
    """Undo byte grouping: the data was split into 4 groups (byte k of every 4 into group k), concatenated."""
    n = len(grouped)
    sizes = [n // 4 + (1 if k < n % 4 else 0) for k in range(4)]
    out, pos = bytearray(n), 0
    for k, size in enumerate(sizes):
        out[k::4] = grouped[pos:pos + size]
        pos += size
    return bytes(out)


def decompress_chunk(scheme: int, payload: bytes) -> bytes:
    if scheme == 0:
        return payload
    if scheme == 1:
        return lz4_frame(payload)
    if scheme == 2:
        return bg4_regroup(lz4_frame(payload))
    raise FormatError(f"unknown chunk compression scheme {scheme}")


# ----------------------------------------------------------------------------- xorbs
CHUNK_HEADER = struct.Struct("<B3sB3s")  # version, compressed size (u24), scheme, uncompressed size (u24)
MAX_XORB_BYTES = 64 * 1024 * 1024


@dataclass
class Xorb:
    """A stored xorb: its serialized bytes (chunk header + payload, one after the other) and, per
    chunk, where it ends and how large it unpacks. The chunk hashes are what a shard's CAS info
    declared for it (the upload itself carries none), checked against the xorb hash."""
    hash: str
    data: bytes
    boundaries: list[int]             # packed end offset of each chunk: chunk k is [boundaries[k-1], boundaries[k])
    chunk_sizes: list[int]            # unpacked
    chunk_hashes: list[bytes] | None = None

    @property
    def unpacked_starts(self) -> list[int]:
        starts, pos = [], 0
        for size in self.chunk_sizes:
            starts.append(pos)
            pos += size
        return starts

    def packed_range(self, start: int, end: int) -> tuple[int, int]:
        """Byte range [first, last] (inclusive, for an HTTP Range) of chunks [start, end)."""
        return (self.boundaries[start - 1] if start else 0), self.boundaries[end - 1] - 1

    def chunk_bytes(self, start: int, end: int) -> bytes:
        first, last = self.packed_range(start, end)
        return b"".join(data for data, _ in read_chunks(self.data[first:last + 1]))

    def attest(self, info: XorbRecord) -> None:
        """Take the chunk hashes a shard declares for this xorb, if they are consistent with it: same
        chunk layout and sizes, and their merkle hash is the xorb's hash. Raises FormatError."""
        if (info.chunk_sizes, info.unpacked_starts) != (self.chunk_sizes, self.unpacked_starts) \
                or info.packed_size not in (0, len(self.data)):  # hf_xet leaves the packed size 0
            raise FormatError(f"the shard's chunk list for xorb {self.hash} does not match the xorb's layout")
        if hash_hex(aggregated_hash(list(zip(info.chunk_hashes, info.chunk_sizes)))) != self.hash:
            raise FormatError(f"the chunk hashes a shard declares for xorb {self.hash} do not hash to it")
        self.chunk_hashes = list(info.chunk_hashes)


def read_chunks(data: bytes) -> list[tuple[bytes, int]]:
    """Decompress a run of serialized chunks: [(chunk data, packed end offset)]. Raises FormatError."""
    out, i = [], 0
    while i < len(data):
        if i + CHUNK_HEADER.size > len(data):
            raise FormatError("truncated chunk header")
        version, packed, scheme, unpacked = CHUNK_HEADER.unpack_from(data, i)
        packed, unpacked = int.from_bytes(packed, "little"), int.from_bytes(unpacked, "little")
        if version != 0:
            raise FormatError(f"unknown chunk header version {version}")
        i += CHUNK_HEADER.size
        if i + packed > len(data):
            raise FormatError("truncated chunk")
        chunk = decompress_chunk(scheme, data[i:i + packed])
        if len(chunk) != unpacked:
            raise FormatError("chunk does not decompress to its declared size")
        i += packed
        out.append((chunk, i))
    return out


def parse_xorb(xorb_hash: str, data: bytes) -> Xorb:
    """Parse an uploaded xorb (chunks, each decompressed to check it). Raises FormatError."""
    if len(data) > MAX_XORB_BYTES:
        raise FormatError(f"xorb larger than {MAX_XORB_BYTES} bytes")
    chunks = read_chunks(data)
    if not chunks:
        raise FormatError("empty xorb")
    return Xorb(xorb_hash, bytes(data), [end for _, end in chunks], [len(c) for c, _ in chunks])


# ----------------------------------------------------------------------------- shards
SHARD_TAG = b"HFRepoMetaData\x00" + bytes([85, 105, 103, 69, 106, 123, 129, 87, 131, 165, 189, 217, 92, 205, 209, 74,
                                           169])
FLAG_VERIFICATION, FLAG_METADATA_EXT = 1 << 31, 1 << 30
ENTRY = struct.Struct("<32sIIII")          # hash + 4 u32 (a term, or a CAS info header)
FILE_HEADER = struct.Struct("<32sIIQ")     # file hash, flags, num entries, unused
CHUNK_ENTRY = struct.Struct("<32sIIQ")     # chunk hash, unpacked start, unpacked size, unused


@dataclass
class Term:
    xorb: str
    unpacked_bytes: int
    start: int
    end: int


@dataclass
class FileRecord:
    hash: str
    terms: list[Term]
    verification: list[bytes] = field(default_factory=list)
    sha256: str | None = None

    @property
    def size(self) -> int:
        return sum(t.unpacked_bytes for t in self.terms)


@dataclass
class XorbRecord:
    hash: str
    chunk_hashes: list[bytes]
    unpacked_starts: list[int]        # where each chunk starts in the xorb's unpacked content
    chunk_sizes: list[int]
    packed_size: int


def parse_shard(data: bytes) -> tuple[list[FileRecord], list[XorbRecord]]:
    """The file infos and CAS (xorb) infos of a shard. Raises FormatError."""
    try:
        return _parse_shard(data)
    except struct.error as e:
        raise FormatError(f"truncated shard ({e})") from None


def _parse_shard(data: bytes) -> tuple[list[FileRecord], list[XorbRecord]]:
    if data[:32] != SHARD_TAG:
        raise FormatError("not a shard (wrong magic tag)")
    version, _footer_size = struct.unpack_from("<QQ", data, 32)
    if version != 2:
        raise FormatError(f"unsupported shard header version {version}")
    p, files = 48, []
    while data[p:p + 32] != BOOKEND:
        raw, flags, n, _ = FILE_HEADER.unpack_from(data, p)
        p += 48
        terms = []
        for _ in range(n):
            xorb, _flags, unpacked, start, end = ENTRY.unpack_from(data, p)
            terms.append(Term(hash_hex(xorb), unpacked, start, end))
            p += 48
        record = FileRecord(hash_hex(raw), terms)
        if flags & FLAG_VERIFICATION:
            record.verification = [data[p + 48 * k:p + 48 * k + 32] for k in range(n)]
            p += 48 * n
        if flags & FLAG_METADATA_EXT:
            record.sha256 = hash_hex(data[p:p + 32])  # stored like the other hashes, as four u64 words
            p += 48
        files.append(record)
        if p + 32 > len(data):
            raise FormatError("shard file info section has no bookend")
    p += 48
    xorbs = []
    while data[p:p + 32] != BOOKEND:
        raw, _flags, n, _unpacked_total, packed_size = ENTRY.unpack_from(data, p)
        p += 48
        entries = [CHUNK_ENTRY.unpack_from(data, p + 48 * k) for k in range(n)]
        p += 48 * n
        xorbs.append(XorbRecord(hash_hex(raw), [e[0] for e in entries], [e[1] for e in entries],
                                [e[2] for e in entries], packed_size))
        if p + 32 > len(data):
            raise FormatError("shard CAS info section has no bookend")
    return files, xorbs


def dedup_shard(xorbs: list[Xorb], created: int, expiry: int) -> bytes:
    """A full shard (with lookup tables and footer) listing ``xorbs`` and no files, as the global
    deduplication API answers; chunk hashes are sent in clear (HMAC key zero)."""
    out = bytearray(SHARD_TAG + struct.pack("<QQ", 2, 200))
    file_info_offset = len(out)
    out += BOOKEND + bytes(16)
    cas_info_offset = len(out)
    xorb_lookup, chunk_lookup, index = [], [], 0
    for x in sorted(xorbs, key=lambda x: x.hash):  # the hex form sorts as the hash's u64 words do
        xorb_lookup.append((struct.unpack_from("<Q", hash_raw(x.hash))[0], index))
        out += ENTRY.pack(hash_raw(x.hash), 0, len(x.chunk_hashes), sum(x.chunk_sizes), len(x.data))
        for k, (h, start, size) in enumerate(zip(x.chunk_hashes, x.unpacked_starts, x.chunk_sizes)):
            chunk_lookup.append((struct.unpack_from("<Q", h)[0], index, k))
            out += CHUNK_ENTRY.pack(h, start, size, 0)
        index += 1 + len(x.chunk_hashes)
    out += BOOKEND + bytes(16)
    file_lookup_offset = xorb_lookup_offset = len(out)
    for key, idx in sorted(xorb_lookup):
        out += struct.pack("<QI", key, idx)
    chunk_lookup_offset = len(out)
    for key, idx, k in sorted(chunk_lookup):
        out += struct.pack("<QII", key, idx, k)
    stored = sum(sum(x.chunk_sizes) for x in xorbs)
    footer_offset = len(out)
    out += struct.pack("<9Q", 1, file_info_offset, cas_info_offset, file_lookup_offset, 0,
                       xorb_lookup_offset, len(xorb_lookup), chunk_lookup_offset, len(chunk_lookup))
    out += ZERO_KEY + struct.pack("<2Q", created, expiry) + bytes(48)
    out += struct.pack("<4Q", sum(len(x.data) for x in xorbs), stored, stored, footer_offset)
    return bytes(out)
