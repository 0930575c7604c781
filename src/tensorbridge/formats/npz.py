"""The ``.npz`` format: a zip of ``.npy`` members, read strictly, written streaming.

An ``.npz`` file (``np.savez``, ``np.savez_compressed``) is a zip archive whose
members are ``NAME.npy`` files; the tensor names are the member names without
``.npy``. bfloat16/float8 members use the marker layout of :mod:`.npy`
(``descr = [('bfloat16', '<u2')]``), so plain ``np.load`` still opens them; raw-bytes
members (``'<V2'``: ``mx.savez``, ``np.savez`` of ``ml_dtypes`` arrays) are read as
:mod:`.npy` says (``void_as=``), and ``void=True`` writes them.

Reading (``NpzReader``) never calls ``np.load`` and never unpickles:

* every zip error (bad archive, CRC mismatch, truncation, encryption, an
  unknown compression method) becomes a :class:`FileFormatError` naming the file;
* every member must end in ``.npy`` and be stored or deflated;
* names pass :func:`~.names.check_unique`: duplicate members, ``../``,
  absolute names and NUL are refused;
* each member's ``.npy`` header is parsed by reading only the header bytes
  from the member stream, with the same rules as ``.npy`` files; opening the
  archive (and so ``inspect``) reads no other tensor data, except that a deflated
  member no longer than a header may be (:data:`~.npy.MAX_HEADER_SIZE` + 10 bytes) is
  inflated whole and kept for its first read (at most :data:`KEEP_INFLATED` bytes per
  archive), so that a load inflates each member once, as ``np.load`` does;
* the array size a header declares must equal the member's zip ``file_size``
  minus the header exactly;
* **decompression-bomb guard**: a stored member's ``file_size`` must equal its
  ``compress_size``; a deflated member is refused when its ``file_size`` is more
  than :data:`MAX_DEFLATE_RATIO` (1032, the most deflate can ever expand)
  times its ``compress_size`` and larger than :data:`BOMB_MIN_SIZE` (1 MiB).
  Such sizes cannot come from a real deflate stream, so they are lies meant to
  make a reader allocate memory. Honest, very compressible data (all zeros
  compresses about 1029:1) is read; if it does not fit in memory, the
  allocation failure is reported as a :class:`FileFormatError`.
* data is streamed in bounded chunks into a fresh array; a member that
  decompresses to fewer or more bytes than declared is refused.
* a stored member whose local header agrees with the central directory (no data
  descriptor; the same CRC and sizes, zip64 ones included) and whose array is C order,
  little-endian, not bool and not empty has a byte range (:meth:`NpzReader.raw_span`):
  ``load`` maps it or reads it with one ``pread``, and ``convert`` copies it
  kernel-side. Its CRC-32 is checked first (one read of the member), as
  :meth:`NpzReader.read` checks it.

Writing streams one member at a time through a bounded buffer into an
:func:`~.atomic.atomic_write` file, as zip64 members with a fixed timestamp
(reproducible output). Option ``compress=True`` deflates (like
``np.savez_compressed``); the default stores (like ``np.savez``), each member's array
data starting at a multiple of :data:`ALIGNMENT` bytes (padding in its extra field), so
that loads can map it.

>>> import numpy as np, tempfile, os
>>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> FORMAT.write(p, [TensorInfo("w", "float32", (2, 3))], lambda name: a)
>>> with FORMAT.open(p) as r:
...     (r.keys(), r.read("w").tobytes() == a.tobytes())
(['w'], True)
>>> np.load(p, allow_pickle=False)["w"].tobytes() == a.tobytes()
True
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ConversionError, FileFormatError, TensorBridgeError, UnsafeContentError
from .atomic import atomic_write
from .base import Format, RawSpan, Reader, TensorInfo, file_stamp, opening, writing_zip
from .names import check_name, check_unique
from .npy import FORMAT as NPY
from .npy import (
    MAGIC,
    MAX_HEADER_SIZE,
    PREFIX_MAX,
    NpyHeader,
    build_header,
    check_bool,
    check_void_as,
    check_void_option,
    parse_header,
    parse_header_bytes,
    read_into,
)
from .safetensors import check_fetched, iter_le_bytes, open_regular_stat

__all__ = [
    "FORMAT",
    "NpzFormat",
    "NpzReader",
    "MAX_DEFLATE_RATIO",
    "BOMB_MIN_SIZE",
    "CHUNK_BYTES",
    "KEEP_INFLATED",
]

#: Deflate cannot expand data by more than 1032:1; larger declared ratios are lies.
MAX_DEFLATE_RATIO = 1032
#: Below this declared size the bomb guard does not apply (tiny members, tiny risk).
BOMB_MIN_SIZE = 1 << 20
#: Bytes read or written per step of a member stream.
CHUNK_BYTES = 16 * 1024 * 1024
#: A deflated member is inflated into its array this much at a time: pieces that stay in
#: the CPU's cache (4 MiB members inflated whole took 1.4x the time, here)
INFLATE_CHUNK = 256 * 1024
#: At most this many bytes of small deflated members, inflated whole when their headers
#: were checked at open, are kept (per open archive) for their first read, which then
#: inflates nothing again; members past the budget are inflated again when read.
KEEP_INFLATED = 8 * 1024 * 1024
_SUFFIX = ".npy"
_LOCAL_SIZE = 30  # a zip local file header before its name and extra field
#: Stored members' data start at multiples of this (as torch's writer aligns its records).
ALIGNMENT = 64
_ALIGN_TAG = 0xD935  # the extra field record apksigner pads with
_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    struct.error,
    KeyError,
    IndexError,
    MemoryError,
    OverflowError,
    UnicodeDecodeError,
)


@contextlib.contextmanager
def _zip_errors(path: str, doing: str) -> Iterator[None]:
    """Turn whatever zipfile raises into a FileFormatError naming the file."""
    try:
        yield
    except TensorBridgeError:
        raise
    except _ZIP_ERRORS as exc:
        raise FileFormatError(
            f"{doing} failed: {type(exc).__name__}: {exc}. Fix: the file is not a valid .npz "
            "(zip) archive, or it is truncated or corrupt; copy or download it again.",
            path,
        ) from exc


def _zip64_sizes(extra: bytes) -> tuple[int, int] | None:
    """(uncompressed, compressed) size from a local header's zip64 extra field, or None
    when it has none or the extra field is malformed."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        pos += 4
        if pos + size > len(extra):
            return None
        if tag == 1:
            if size < 16:
                return None
            usize, csize = struct.unpack_from("<QQ", extra, pos)
            return usize, csize
        pos += size
    return None


def _align_extra(offset: int, name_len: int) -> bytes:
    """A local extra field that makes the data of a member whose header starts at ``offset``
    start at a multiple of :data:`ALIGNMENT` (after zipfile's 20-byte zip64 field): the
    alignment padding record of Android's apksigner (tag 0xD935). Every ``.npy`` header
    is a multiple of 64 bytes, so the array data is aligned too, and ``load`` can map it."""
    fixed = offset + _LOCAL_SIZE + name_len + 20 + 6
    return struct.pack("<HHH", _ALIGN_TAG, 2 + -fixed % ALIGNMENT, ALIGNMENT) + bytes(
        -fixed % ALIGNMENT
    )


def _header_end(prefix: bytes) -> int:
    """Where the ``.npy`` header that ``prefix`` (its first :data:`PREFIX_MAX` bytes) starts
    ends, as its magic, version and length say; past any header when they are not those of
    a ``.npy`` file (then the parser sees as many bytes as a header may hold)."""
    if len(prefix) < PREFIX_MAX or prefix[:6] != MAGIC:
        return PREFIX_MAX + MAX_HEADER_SIZE
    if (prefix[6], prefix[7]) == (1, 0):
        return 10 + int.from_bytes(prefix[8:10], "little")
    if (prefix[6], prefix[7]) in ((2, 0), (3, 0)):
        return 12 + int.from_bytes(prefix[8:12], "little")
    return PREFIX_MAX + MAX_HEADER_SIZE


def _in_member(exc: FileFormatError, member: str, path: str) -> FileFormatError:
    """The same error type, prefixed with the member it is about (and the same mark of an
    array that is not a tensor, see :func:`.npy._not_a_tensor`)."""
    new = type(exc)(f"member {member!r}: {exc}", path)
    for mark in ("not_a_tensor", "layout"):
        if hasattr(exc, mark):
            setattr(new, mark, getattr(exc, mark))
    return new


class NpzReader(Reader):
    """An open ``.npz`` archive whose member names, sizes and headers are validated."""

    def __init__(self, path: str, *, void_as: str | None = None, keep: bool = False) -> None:
        self.path = path
        self.metadata = {}
        self._lock = threading.Lock()
        self._zf: zipfile.ZipFile | None = None
        # small deflated members inflated whole at open, for their first read (bounded by
        # KEEP_INFLATED), by member file name: the bytes zipfile would return, CRC unchecked.
        # Only where every member is read at once (keep: load), not for a reader kept open
        # that may read few of them: many such readers would each hold their bytes.
        self._kept: dict[str, bytes] = {}
        self._kept_bytes = 0
        self._keep_limit = KEEP_INFLATED if keep else 0
        self._void_as = check_void_as(void_as, path)
        fd, st = open_regular_stat(path)  # (one fstat: its size, and its stamp before reading)
        self._size = st.st_size
        self._file = os.fdopen(fd, "rb")
        # (a file changed while it was opened is read again)
        with opening(fd, st, path, self.close):
            self._file_id = (st.st_dev, st.st_ino)
            self.stamp = file_stamp(st)
            with _zip_errors(path, "opening the zip archive"):
                self._zf = zipfile.ZipFile(self._file)
            members = self._zf.infolist()
            names = [self._member_name(zi) for zi in members]
            check_unique(names, path)
            self._members: dict[str, zipfile.ZipInfo] = dict(zip(names, members, strict=True))
            if os.pread(fd, 4, 0) not in (b"PK\x03\x04", b"PK\x05\x06"):
                raise FileFormatError(
                    "the file does not start with a zip member (something is prepended to "
                    "the archive; np.load refuses it too). Fix: re-save it with np.savez.",
                    path,
                )
            with _zip_errors(path, "reading the member headers"):
                firsts = {name: self._data_start(zi) for name, zi in self._members.items()}
            self._check_no_overlap({name: start for name, (start, *_) in firsts.items()})
            # members that are not tensors (strings, records, objects) are skipped, never
            # read, and listed in self.skipped; an archive of nothing else is refused
            self.skipped: dict[str, str] = {}
            self._headers: dict[str, NpyHeader] = {}
            for name, zi in self._members.items():
                try:
                    self._headers[name] = self._read_header(
                        zi, *firsts[name][:2], plain=firsts[name][3]
                    )
                except FileFormatError as exc:
                    why = getattr(exc, "not_a_tensor", None)
                    if why is None:
                        raise
                    self._check_skipped_size(zi, getattr(exc, "layout", None))
                    self.skipped[name] = why
                    last = exc
            if self.skipped and not self._headers:
                raise type(last)(
                    "no member can be read as a tensor: "
                    + "; ".join(f"{k!r}: {v}" for k, v in list(self.skipped.items())[:10])
                    + (" ..." if len(self.skipped) > 10 else "")
                    + ". Fix: save numeric arrays in it (e.g. a.astype(np.float32)).",
                    path,
                ) from last
            # where each stored member's data starts, if its local header agrees with the
            # central directory (what raw_span may hand out); see _local_agrees
            self._stored: dict[str, int] = {
                name: start for name, (start, _, agrees, _) in firsts.items() if agrees
            }
            self._crc_checked: set[str] = set()  # stored members whose CRC raw_span checked
            self._end_of_data: int = self._zf.start_dir  # where the central directory starts

    def _member_name(self, zi: zipfile.ZipInfo) -> str:
        original = zi.orig_filename
        if "\x00" in original:  # zipfile cuts names at NUL; refuse what it would hide
            check_name(original, self.path)
        name = zi.filename
        if not name.endswith(_SUFFIX):
            raise FileFormatError(
                f"member {name!r} does not end in '.npy'; tensorbridge refuses npz members "
                "that are not .npy arrays (they could hold anything). Fix: rebuild the archive "
                "with np.savez, keeping only arrays.",
                self.path,
            )
        if zi.flag_bits & 0x1:
            raise FileFormatError(
                f"member {name!r} is encrypted. Fix: decrypt the archive and re-save it with "
                "np.savez.",
                self.path,
            )
        if zi.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise FileFormatError(
                f"member {name!r} uses zip compression method {zi.compress_type}, but .npz "
                "members are stored or deflated. Fix: re-save with np.savez or "
                "np.savez_compressed.",
                self.path,
            )
        return name[: -len(_SUFFIX)]

    def _check_sizes(self, zi: zipfile.ZipInfo) -> None:
        name = zi.filename
        if zi.compress_type == zipfile.ZIP_STORED and zi.file_size != zi.compress_size:
            raise FileFormatError(
                f"member {name!r} is stored (not compressed), yet declares {zi.file_size} bytes "
                f"from {zi.compress_size} stored bytes. Fix: the archive is corrupt or hostile; "
                "re-save it.",
                self.path,
            )
        if zi.file_size > BOMB_MIN_SIZE and zi.file_size > MAX_DEFLATE_RATIO * max(
            zi.compress_size, 1
        ):
            raise UnsafeContentError(
                f"member {name!r} declares {zi.file_size} bytes from {zi.compress_size} "
                f"compressed bytes, a ratio over {MAX_DEFLATE_RATIO}:1 that deflate cannot "
                "produce (a decompression bomb: the sizes are lies meant to exhaust memory). "
                "Fix: do not use this file; re-create it from a trusted source.",
                self.path,
            )

    def _data_start(self, zi: zipfile.ZipInfo) -> tuple[int, bytes, bool, bool]:
        """Where member ``zi``'s (compressed) data starts, after its local header, whose
        signature and name must match the central directory (as zipfile checks); the
        first data bytes that came with the same read; whether the member is stored
        and its local header agrees with the central directory (:meth:`_local_agrees`);
        and whether ``zipfile.ZipFile.open`` would open the member without an error (its
        flags, and its local name decoded strictly as zipfile decodes it), so that its bytes
        may be inflated here instead (:meth:`_read_kept`)."""
        at = zi.header_offset
        block = os.pread(self._file.fileno(), _LOCAL_SIZE + 2 * len(zi.orig_filename) + 512, at)
        if len(block) < _LOCAL_SIZE or block[:4] != b"PK\x03\x04":
            raise FileFormatError(
                f"member {zi.filename!r} has no local file header at byte {at}. Fix: the "
                "archive is corrupt; re-save it.",
                self.path,
            )
        name_len, extra_len = struct.unpack_from("<HH", block, 26)
        raw = block[_LOCAL_SIZE : _LOCAL_SIZE + name_len]
        if len(raw) < name_len:
            raw = os.pread(self._file.fileno(), name_len, at + _LOCAL_SIZE)
        name = raw.decode("utf-8" if zi.flag_bits & 0x800 else "cp437", "replace")
        if name != zi.orig_filename:
            raise FileFormatError(
                f"member {zi.orig_filename!r} is named {name!r} in its local header. Fix: the "
                "archive is corrupt or crafted; re-save it.",
                self.path,
            )
        skip = _LOCAL_SIZE + name_len + extra_len
        agrees = zi.compress_type == zipfile.ZIP_STORED and self._local_agrees(
            zi, block, at, name_len, extra_len
        )
        return at + skip, block[skip:], agrees, self._opens_plainly(zi, block, raw)

    @staticmethod
    def _opens_plainly(zi: zipfile.ZipInfo, block: bytes, raw: bytes) -> bool:
        """Whether ``zipfile.ZipFile.open`` of ``zi`` passes its checks of the local header
        (``block``, name bytes ``raw``): no patched data, strong or plain encryption, and
        the name decoded by the local header's own UTF-8 flag equals the central one."""
        if zi.flag_bits & 0x61:
            return False
        (flags,) = struct.unpack_from("<H", block, 6)
        try:
            return raw.decode("utf-8" if flags & 0x800 else "cp437") == zi.orig_filename
        except UnicodeDecodeError:
            return False

    def _local_agrees(
        self, zi: zipfile.ZipInfo, block: bytes, at: int, name_len: int, extra_len: int
    ) -> bool:
        """Whether stored member ``zi``'s local header says what the central directory says:
        no data descriptor, no encryption, stored, the same CRC and sizes (zip64 sizes from
        the local zip64 extra field). zipfile reads by the central directory alone; a member
        whose two headers disagree is read through it, never handed out as a byte range."""
        flags, method = struct.unpack_from("<HH", block, 6)
        crc, csize, usize = struct.unpack_from("<III", block, 14)
        if (flags | zi.flag_bits) & 0x9 or method != zipfile.ZIP_STORED or crc != zi.CRC:
            return False
        if 0xFFFFFFFF in (csize, usize):  # zip64 (np.savez always writes it): sizes in extra
            begin = _LOCAL_SIZE + name_len
            extra = block[begin : begin + extra_len]
            if len(extra) < extra_len:
                extra = os.pread(self._file.fileno(), extra_len, at + begin)
            sizes = _zip64_sizes(extra)
            if sizes is None:
                return False
            usize, csize = sizes
        return (usize, csize) == (zi.file_size, zi.compress_size)

    def _check_no_overlap(self, starts: dict[str, int]) -> None:
        """Each member's bytes belong to it alone, before the central directory.

        Python 3.11's zipfile does not check this; overlapping members let a small file
        declare the same compressed bytes many times (a 40 KB file inflating to 1 GB)."""
        assert self._zf is not None
        spans = sorted(
            (zi.header_offset, starts[name] + zi.compress_size, zi.filename)
            for name, zi in self._members.items()
        )
        end_of_data = self._zf.start_dir
        if not spans:  # np.savez() with no arrays
            return
        for (start, end, member), nxt in zip(
            spans, [*spans[1:], (end_of_data, 0, None)], strict=True
        ):
            if end > nxt[0]:
                other = f"member {nxt[2]!r}" if nxt[2] is not None else "the central directory"
                raise UnsafeContentError(
                    f"member {member!r} (bytes {start}..{end}) overlaps {other} (from byte "
                    f"{nxt[0]}): the same bytes would be read twice, which only a crafted "
                    "archive does. Fix: do not use this file; re-create it with np.savez.",
                    self.path,
                )

    def _header_bytes(
        self, zi: zipfile.ZipInfo, start: int, first: bytes, plain: bool = False
    ) -> bytes | None:
        """The first bytes of member ``zi``'s data (enough for any .npy header), read
        directly; None if a deflate stream needs more than the window (then stream it).

        A deflated member whose whole stream came in the window (it ended, from all of
        its compressed bytes) is kept for its first read while :data:`KEEP_INFLATED`
        allows and zipfile would open it (``plain``), as the bytes zipfile would return:
        the inflated stream cut at the declared size."""
        want = PREFIX_MAX + MAX_HEADER_SIZE
        if zi.compress_type == zipfile.ZIP_STORED:
            if len(first) >= 10 and len(first) >= 10 + int.from_bytes(first[8:10], "little"):
                return first[: zi.compress_size]  # np.save's header came with the local one
            return os.pread(self._file.fileno(), min(want, zi.compress_size), start)
        window = min(zi.compress_size, 2 * want + 1024)
        raw = os.pread(self._file.fileno(), window, start)
        inflate = zlib.decompressobj(-15)
        if zi.file_size <= want:  # (all of it, to keep: a small member is read at once)
            head = inflate.decompress(raw, want)
        else:  # the header alone: the rest is inflated when the member is read
            head = inflate.decompress(raw, PREFIX_MAX)
            want = min(want, _header_end(head))
            if want > len(head) and not inflate.eof:  # (output may wait without input)
                head += inflate.decompress(inflate.unconsumed_tail, want - len(head))
        if len(head) < want and not inflate.eof and window < zi.compress_size:
            return None
        if (
            plain
            and inflate.eof
            and len(raw) == zi.compress_size
            and self._kept_bytes + len(head) <= self._keep_limit
        ):
            member = head[: zi.file_size] if len(head) > zi.file_size else head
            self._kept[zi.filename] = member
            self._kept_bytes += len(member)
        return head

    def _read_header(
        self, zi: zipfile.ZipInfo, start: int, first: bytes, *, plain: bool = False
    ) -> NpyHeader:
        self._check_sizes(zi)
        assert self._zf is not None
        with _zip_errors(self.path, f"reading member {zi.filename!r}"):
            head = self._header_bytes(zi, start, first, plain)
            try:
                if head is not None:
                    header = parse_header_bytes(head, void_as=self._void_as)
                else:
                    with self._zf.open(zi) as stream:
                        header = parse_header(stream.read, void_as=self._void_as)
            except FileFormatError as exc:
                raise _in_member(exc, zi.filename, self.path) from exc
        self._check_data_len(
            zi, header.header_size, header.nbytes, f" ({header.dtype}{list(header.shape)})"
        )
        return header

    def _check_data_len(self, zi: zipfile.ZipInfo, header_size: int, nbytes: int, of: str) -> None:
        """The member must hold the ``nbytes`` of data its header declares (``of``: what)."""
        data_len = zi.file_size - header_size
        if data_len != nbytes:
            what = "it is truncated" if data_len < nbytes else "it has trailing bytes"
            raise FileFormatError(
                f"member {zi.filename!r}: the header declares {nbytes} bytes of data{of} but "
                f"the member holds {data_len} after the header ({what}). Fix: the archive "
                "is corrupt; re-save it.",
                self.path,
            )

    def _check_skipped_size(
        self, zi: zipfile.ZipInfo, layout: tuple[int, int | None] | None
    ) -> None:
        """A member skipped as not a tensor must still hold what its header declares (a
        cut or padded member is a corrupt archive, as it is for a tensor)."""
        nbytes = None if layout is None else layout[1]
        if layout is not None and nbytes is not None:  # (an object array's pickle: unread)
            self._check_data_len(zi, layout[0], nbytes, "")

    def keys(self) -> list[str]:
        return list(self._headers)

    def info(self, name: str) -> TensorInfo:
        header = self._headers.get(name) if isinstance(name, str) else None
        if header is None:
            raise self.missing(name)
        return header.info(name)

    def read(self, name: str) -> np.ndarray:
        self.info(name)
        header = self._headers[name]
        zi = self._members[name]
        with self._lock:
            if self._zf is None:
                raise FileFormatError("the file is closed. Fix: open it again.", self.path)
            start = self._stored.get(name)
            if start is not None:
                out = self._read_stored(name, zi, header, start)
                check_bool(out, name, self.path)
                return out
            kept = self._kept.pop(zi.filename, None)
            if kept is not None:
                self._kept_bytes -= len(kept)
                out = self._read_kept(zi, header, kept)
                check_bool(out, name, self.path)
                return out
            with _zip_errors(self.path, f"reading member {zi.filename!r}"):
                with self._zf.open(zi) as stream:
                    skip = stream.read(header.header_size)
                    if len(skip) != header.header_size:
                        raise FileFormatError(
                            f"member {zi.filename!r} ended inside its header. Fix: the "
                            "archive is corrupt; re-save it.",
                            self.path,
                        )

                    def fill(view: memoryview) -> None:
                        done = 0
                        while done < len(view):
                            n = stream.readinto(view[done : done + INFLATE_CHUNK])  # type: ignore[attr-defined]
                            if not n:
                                raise FileFormatError(
                                    f"member {zi.filename!r} ended after {done} of "
                                    f"{len(view)} data bytes (it is truncated). Fix: copy or "
                                    "download the archive again.",
                                    self.path,
                                )
                            done += n

                    out = read_into(fill, header, self.path)
                    if stream.read(1):
                        raise FileFormatError(
                            f"member {zi.filename!r} holds more data than its header "
                            "declares. Fix: the archive is corrupt; re-save it.",
                            self.path,
                        )
        check_bool(out, name, self.path)
        return out

    def _read_kept(self, zi: zipfile.ZipInfo, header: NpyHeader, member: bytes) -> np.ndarray:
        """Deflated member ``zi`` from ``member``, its bytes inflated at open (what zipfile
        would return: see :meth:`_header_bytes`), with the checks, in the order and with
        the messages, of reading it through zipfile: its CRC-32 (checked when the read
        reaches the end of the member), a member that ends inside its header or before
        its data does. The caller holds the lock."""
        size = header.header_size
        doing = f"reading member {zi.filename!r}"

        def check_crc() -> None:
            crc = zlib.crc32(member)
            if crc != zi.CRC:
                with _zip_errors(self.path, doing):
                    raise zipfile.BadZipFile(f"Bad CRC-32 for file {zi.filename!r}")

        if len(member) <= size:  # zipfile reaches the end while skipping the header
            check_crc()
            if len(member) < size:
                raise FileFormatError(
                    f"member {zi.filename!r} ended inside its header. Fix: the "
                    "archive is corrupt; re-save it.",
                    self.path,
                )

        def fill(view: memoryview) -> None:
            data = memoryview(member)[size:]
            if len(data):
                check_crc()  # (the read that reaches the end of the member checks it)
            n = min(len(data), len(view))
            view[:n] = data[:n]
            if n < len(view):
                raise FileFormatError(
                    f"member {zi.filename!r} ended after {n} of "
                    f"{len(view)} data bytes (it is truncated). Fix: copy or "
                    "download the archive again.",
                    self.path,
                )

        return read_into(fill, header, self.path)

    def raw_span(self, name: str) -> RawSpan | None:
        """Where member ``name``'s array data lies in the archive, when :meth:`read` returns
        those bytes unchanged: the member is stored (not deflated, no data descriptor, its
        local header agreeing with the central directory), its ``.npy`` header is C order
        (or Fortran order of at most one axis longer than 1, the same bytes), this
        machine's byte order (little-endian), not bool (whose bytes are checked), not
        empty. Otherwise ``None``: read it.

        The first call for a member reads it once to check its CRC-32, as :meth:`read`
        does (a mismatch raises :class:`FileFormatError`); the span is handed out only
        for bytes that passed it.
        """
        info = self.info(name)
        h = self._headers[name]
        start = self._stored.get(name)
        if (
            start is None
            or self._file is None
            or h.swap
            or sys.byteorder != "little"
            or info.dtype == "bool"
            or h.nbytes == 0
            or (h.fortran_order and sum(d != 1 for d in h.shape) > 1)
        ):
            return None
        zi = self._members[name]
        offset = start + h.header_size
        end = offset + h.nbytes
        if end != start + zi.compress_size or end > self._end_of_data or end > self._size:
            return None  # (checked at open; never hand out bytes outside the member)
        if name not in self._crc_checked:
            self._check_crc(zi, start)
            self._crc_checked.add(name)
        return RawSpan(self.path, offset, h.nbytes, self._file_id)

    def _check_crc(self, zi: zipfile.ZipInfo, start: int) -> None:
        """Read stored member ``zi`` (data at ``start``) in bounded chunks and compare its
        CRC-32 with the central directory's, as zipfile does on a whole read."""
        size = zi.compress_size
        buf = memoryview(bytearray(min(size, CHUNK_BYTES)))
        crc = done = 0
        with self._lock:
            if self._file is None:
                raise FileFormatError("the file is closed. Fix: open it again.", self.path)
            fd = self._file.fileno()
            while done < size:
                view = buf[: min(len(buf), size - done)]
                self._pread(fd, zi, start + done, view)
                crc = zlib.crc32(view, crc)
                done += len(view)
        self._compare_crc(zi, crc)

    def _read_stored(
        self, name: str, zi: zipfile.ZipInfo, header: NpyHeader, start: int
    ) -> np.ndarray:
        """Member ``name`` read with ``pread`` straight into a fresh array (stored, its local
        header agreeing: see :meth:`_local_agrees`), its CRC-32 taken on the way unless
        :meth:`raw_span` already checked it. The caller holds the lock."""
        assert self._file is not None
        fd = self._file.fileno()
        todo = name not in self._crc_checked
        crc = 0
        if todo:
            head = memoryview(bytearray(header.header_size))
            self._pread(fd, zi, start, head)
            crc = zlib.crc32(head)
        at = start + header.header_size

        def fill(view: memoryview) -> None:
            nonlocal crc
            for lo in range(0, len(view), CHUNK_BYTES):
                part = view[lo : lo + CHUNK_BYTES]
                self._pread(fd, zi, at + lo, part)
                if todo:
                    crc = zlib.crc32(part, crc)

        out = read_into(fill, header, self.path)
        if todo:
            self._compare_crc(zi, crc)
            self._crc_checked.add(name)
        return out

    def _pread(self, fd: int, zi: zipfile.ZipInfo, at: int, view: memoryview) -> None:
        """Fill ``view`` from byte ``at`` of the file (member ``zi``'s bytes)."""
        done = 0
        while done < len(view):
            with _zip_errors(self.path, f"reading member {zi.filename!r}"):
                n = os.preadv(fd, [view[done:]], at + done)
            if not n:
                raise FileFormatError(
                    f"member {zi.filename!r} ended early (the file was truncated after it was "
                    "opened). Fix: copy or download it again.",
                    self.path,
                )
            done += n

    def _compare_crc(self, zi: zipfile.ZipInfo, crc: int) -> None:
        if crc != zi.CRC:
            raise FileFormatError(
                f"member {zi.filename!r} fails its CRC-32 check (the central directory says "
                f"{zi.CRC:#010x}, its bytes give {crc:#010x}). Fix: the archive is corrupt; "
                "copy or download it again.",
                self.path,
            )

    def descriptor(self) -> int | None:
        f = self._file
        return None if f is None else f.fileno()

    def close(self) -> None:
        with self._lock:
            self._kept.clear()
            self._kept_bytes = 0
            if self._zf is not None:
                with contextlib.suppress(Exception):
                    self._zf.close()
                self._zf = None
            if self._file is not None:
                self._file.close()
                self._file = None  # type: ignore[assignment]


class NpzFormat(Format):
    """NumPy ``.npz``: a zip of ``.npy`` members, strictly checked."""

    name = "npz"
    suffixes = (".npz",)
    holds_metadata = False
    description = (
        "NumPy .npz (zip of .npy). Holds every tensorbridge dtype; bfloat16/float8 "
        "as a one-field structured dtype of raw bits. Option compress=True deflates; "
        "void=True writes bfloat16/float8 as np.save writes ml_dtypes arrays ('<V2', what "
        "mx.load reads as bfloat16)."
    )

    options = ("compress", "void")

    def check_write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        metadata: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, str]:
        meta = super().check_write(path, infos, metadata, options)
        compress = (options or {}).get("compress", False)
        if not isinstance(compress, bool):
            raise ConversionError(
                f"{path}: compress={compress!r} is not True or False. Fix: pass a bool."
            )
        check_void_option(options, path)
        return meta

    def check_info(self, info: TensorInfo, path: str) -> None:
        NPY.check_info(info, path)  # every member is a .npy file

    def open(self, path: str, *, void_as: str | None = None, keep: bool = False) -> NpzReader:
        """Open ``path``; ``void_as`` is the dtype raw-bytes members hold
        (:func:`~.npy.check_void_as`); ``keep``: every member is about to be read once
        (``load``), so small deflated members inflated for their header check are kept
        for that read (at most :data:`KEEP_INFLATED` bytes)."""
        return NpzReader(os.fspath(path), void_as=void_as, keep=keep)

    def write(
        self,
        path: str,
        infos: Sequence[TensorInfo],
        fetch: Callable[[str], np.ndarray],
        metadata: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        """Stream ``infos`` into a zip at ``path`` atomically, one member at a time.

        ``compress=True`` deflates members (as ``np.savez_compressed`` does).
        """
        path = os.fspath(path)
        infos = list(infos)
        self.check_write(path, infos, metadata, options)
        compress = options.get("compress", False)
        void = options.get("void", False)
        headers = [build_header(i.dtype, i.shape, void=void) for i in infos]
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with atomic_write(path) as f:
            with writing_zip(f, method) as zf:
                for info, header in zip(infos, headers, strict=True):
                    arr = check_fetched(fetch(info.name), info, path)
                    zi = zipfile.ZipInfo(info.name + _SUFFIX, date_time=_DATE)
                    zi.compress_type = method
                    zi.external_attr = 0o644 << 16
                    if not compress:
                        zi.extra = _align_extra(f.tell(), len(zi.filename.encode("utf-8")))
                    with zf.open(zi, "w", force_zip64=True) as member:
                        member.write(header)
                        for piece in iter_le_bytes(arr, CHUNK_BYTES):
                            for start in range(0, len(piece), CHUNK_BYTES):
                                member.write(piece[start : start + CHUNK_BYTES])
                    del arr


FORMAT = NpzFormat()
