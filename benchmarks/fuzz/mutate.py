"""A seeded mutation fuzzer for DICOM files: file ``i`` of seed ``s`` is always the same bytes.

Each fuzzed file starts from one of pydicom's test files (``pydicom.data.get_testdata_files()``;
the DICOM ones) and gets one to three mutations drawn from :data:`MUTATIONS`:

- ``bitflip``: 1 to 32 bits flipped, anywhere, in element headers or in the pixel data;
- ``bytes``: a run of 1 to 16 bytes overwritten with random or boundary values (00, FF, 7F, 80);
- ``truncate``: the file cut at a random offset or just around an element boundary;
- ``length``: an element's (or a sequence item's, or a pixel fragment's) declared length set to
  0, odd, off by a few, undefined (FFFFFFFF), 2**31 - 1, past the end of the file, or random;
- ``vr``: an explicit VR replaced by another (SQ, UN, OB, UT, US, ...) or by garbage;
- ``value``: an Image Pixel attribute (Rows, Columns, Bits Allocated / Stored, High Bit, Samples
  per Pixel, Planar Configuration, Number of Frames, Photometric Interpretation, Pixel
  Representation), the window or rescale, or the Transfer Syntax UID set to a boundary or wrong
  value, so that decoders get data that does not match its description;
- ``pixels``: bytes of the (encapsulated or native) pixel data overwritten, mostly at the start of
  a fragment (RLE header, JPEG markers, J2K codestream header);
- ``seq_bomb``: a sequence nested 50 to 20,000 levels deep, or one with up to 50,000 items,
  inserted into the data set (undefined lengths, as a hostile sender would write it);
- ``huge_length``: the last element's declared length (usually Pixel Data's) set to about 2**32,
  or Rows x Columns x Number of Frames set to billions of pixel values;
- ``deflate_bomb``: the file rewritten as Deflated Explicit VR Little Endian whose deflated data
  set inflates to 64 MiB .. 4 GiB (an OB element of zeros after the real data set).

The element walker (:func:`walk`) follows the data set's structure, sequences and encapsulated
fragments included, so that length and VR mutations hit real headers. numpy and pydicom only.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MUTATIONS = ("bitflip", "bytes", "truncate", "length", "vr", "value", "pixels", "seq_bomb",
             "huge_length", "deflate_bomb")
# how often each is drawn (the cheap, structural ones most; bombs rarely, they are big files)
WEIGHTS = (16, 8, 10, 16, 10, 16, 14, 4, 4, 2)

_VRS = [b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT",
        b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST",
        b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV"]
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class Element:
    """One element header found in a file: where its length field is and how wide."""

    offset: int            # of the tag
    vr_offset: int | None  # of the explicit VR, None for implicit VR and items
    length_offset: int
    length_size: int       # 2 or 4
    value_offset: int
    length: int
    tag: int
    depth: int


@dataclass
class Layout:
    """What :func:`walk` found: the data set's start, its encoding, its elements."""

    body: int = 0                  # offset of the data set after the File Meta Information
    explicit: bool = True
    little: bool = True
    deflated: bool = False
    elements: list[Element] = field(default_factory=list)
    fragments: list[Element] = field(default_factory=list)  # encapsulated pixel data items


def _meta(data: bytes) -> tuple[int, str]:
    """(offset of the data set, transfer syntax UID) of a file; (0, "") without File Meta."""
    pos = 132 if data[128:132] == b"DICM" else 0
    uid = ""
    while pos + 8 <= len(data):
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 2:
            break
        vr = data[pos + 4:pos + 6]
        if vr in _LONG:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            value = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            value = pos + 8
        if elem == 0x0010:
            uid = data[value:value + length].decode("ascii", "replace").strip("\x00 ")
        pos = value + length
    return pos, uid


def walk(data: bytes, max_elements: int = 20000) -> Layout:
    """The element headers of a little-endian file, top level and nested; tolerant of garbage
    (stops where the structure stops making sense)."""
    body, uid = _meta(data)
    out = Layout(body=body)
    out.explicit = uid != "1.2.840.10008.1.2"
    out.little = uid != "1.2.840.10008.1.2.2"
    out.deflated = uid == _DEFLATED
    if not out.little or out.deflated:
        return out
    n = len(data)

    def dataset(pos: int, end: int, depth: int) -> int:
        while pos + 8 <= end and len(out.elements) < max_elements:
            group, elem = struct.unpack_from("<HH", data, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:  # an item delimiter ends this (undefined length) item
                return pos + 8 if elem == 0xE00D else pos
            vr = data[pos + 4:pos + 6]
            if out.explicit and vr.isalpha() and vr.isupper():
                if vr in _LONG:
                    (length,) = struct.unpack_from("<L", data, pos + 8)
                    e = Element(pos, pos + 4, pos + 8, 4, pos + 12, length, tag, depth)
                else:
                    (length,) = struct.unpack_from("<H", data, pos + 6)
                    e = Element(pos, pos + 4, pos + 6, 2, pos + 8, length, tag, depth)
            else:
                (length,) = struct.unpack_from("<L", data, pos + 4)
                e = Element(pos, None, pos + 4, 4, pos + 8, length, tag, depth)
                vr = b"SQ" if length == _UNDEFINED else b""
            out.elements.append(e)
            if tag == 0x7FE00010 and length == _UNDEFINED:
                pos = fragments(e.value_offset, depth)
            elif vr == b"SQ" or (length == _UNDEFINED and vr in (b"UN", b"")):
                pos = items(e.value_offset, length, depth + 1)
            elif length == _UNDEFINED:
                return n
            else:
                pos = e.value_offset + length
        return pos

    def items(pos: int, length: int, depth: int) -> int:
        end = n if length == _UNDEFINED else min(n, pos + length)
        while pos + 8 <= end and depth < 64:
            group, elem = struct.unpack_from("<HH", data, pos)
            (ilen,) = struct.unpack_from("<L", data, pos + 4)
            if (group, elem) == (0xFFFE, 0xE0DD):
                return pos + 8
            if (group, elem) != (0xFFFE, 0xE000):
                return end
            out.elements.append(Element(pos, None, pos + 4, 4, pos + 8, ilen, 0xFFFEE000, depth))
            if ilen == _UNDEFINED:
                pos = dataset(pos + 8, n, depth)
            else:
                dataset(pos + 8, min(n, pos + 8 + ilen), depth)
                pos = pos + 8 + ilen
        return end

    def fragments(pos: int, depth: int) -> int:
        while pos + 8 <= n:
            group, elem = struct.unpack_from("<HH", data, pos)
            (flen,) = struct.unpack_from("<L", data, pos + 4)
            if (group, elem) != (0xFFFE, 0xE000):
                return pos + 8
            frag = Element(pos, None, pos + 4, 4, pos + 8, flen, 0xFFFEE000, depth)
            out.fragments.append(frag)
            out.elements.append(frag)
            pos += 8 + flen
        return n

    try:
        dataset(body, n, 0)
    except struct.error:
        pass
    return out


# -- the mutations: (rng, data, layout) -> bytes --------------------------------------------------

def _boundary(rng: random.Random) -> int:
    return rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, rng.randrange(256)])


def bitflip(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    buf = bytearray(data)
    where = rng.random()
    for _ in range(min(32, 1 + int(rng.expovariate(0.25)))):
        if where < 0.4 and layout.elements:
            e = rng.choice(layout.elements)
            pos = rng.randrange(e.offset, min(len(buf), e.value_offset + 2)) if e.offset < len(buf) else 0
        elif where < 0.7 and layout.fragments:
            f = rng.choice(layout.fragments)
            pos = min(len(buf) - 1, f.value_offset + int(rng.expovariate(1 / 64)))
        else:
            pos = rng.randrange(len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
    return bytes(buf)


def overwrite(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    buf = bytearray(data)
    pos = rng.randrange(len(buf))
    for i in range(pos, min(len(buf), pos + rng.randint(1, 16))):
        buf[i] = _boundary(rng)
    return bytes(buf)


def truncate(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    if layout.elements and rng.random() < 0.5:
        e = rng.choice(layout.elements)
        cut = e.offset + rng.randint(-2, 14)
    else:
        cut = rng.randrange(len(data))
    return data[:max(0, min(len(data) - 1, cut))]


def _new_length(rng: random.Random, old: int, size: int, file_size: int) -> int:
    top = 0xFFFF if size == 2 else 0xFFFFFFFF
    pick = rng.choice(["zero", "odd", "off", "undefined", "big", "past_end", "random"])
    value = {"zero": 0, "odd": old | 1, "off": old + rng.randint(-8, 8), "undefined": top,
             "big": top // 2, "past_end": file_size + rng.randint(1, 64),
             "random": rng.randrange(top + 1)}[pick]
    return max(0, min(top, value))


def length(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    if not layout.elements:
        return bitflip(rng, data, layout)
    e = rng.choice(layout.elements)
    buf = bytearray(data)
    value = _new_length(rng, e.length, e.length_size, len(data))
    struct.pack_into("<H" if e.length_size == 2 else "<L", buf, e.length_offset, value)
    return bytes(buf)


def vr(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    explicit = [e for e in layout.elements if e.vr_offset is not None]
    if not explicit:
        return length(rng, data, layout)
    e = rng.choice(explicit)
    buf = bytearray(data)
    new = rng.choice(_VRS + [b"ZZ", b"\x00\x00", b"ob", b"  "])
    buf[e.vr_offset:e.vr_offset + 2] = new
    return bytes(buf)


_VALUES = {
    "Rows": [0, 1, 3, 65535, 32768], "Columns": [0, 1, 7, 65535, 32768],
    "BitsAllocated": [0, 1, 7, 8, 12, 16, 24, 32, 64, 255],
    "BitsStored": [0, 1, 7, 12, 16, 33, 64], "HighBit": [0, 7, 15, 31, 63, 200],
    "SamplesPerPixel": [0, 1, 2, 3, 4, 255], "PlanarConfiguration": [0, 1, 2, 255],
    "PixelRepresentation": [0, 1, 2], "NumberOfFrames": ["0", "1", "2", "-1", "7", "1000000", "1e9", "x"],
    "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                  "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "ARGB", "", "HSV"],
    "WindowCenter": ["0", "-1e308", "nan", "inf", "1e400"], "WindowWidth": ["0", "-5", "nan", "1e-320"],
    "RescaleSlope": ["0", "nan", "-inf", "1e308"], "RescaleIntercept": ["nan", "1e308"],
    "VOILUTFunction": ["SIGMOID", "LINEAR_EXACT", "BOGUS"],
}
_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
             "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
             "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
             "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
             "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.1.99", "1.2.3.4"]


def value(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    """An Image Pixel (or VOI / rescale / transfer syntax) value changed through pydicom."""
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.15 and getattr(ds, "file_meta", None) is not None:
                    ds.file_meta.TransferSyntaxUID = rng.choice(_SYNTAXES)
                    continue
                keyword = rng.choice(sorted(_VALUES))
                setattr(ds, keyword, rng.choice(_VALUES[keyword]))
            out = io.BytesIO()
            # write in the encoding it was read in, whatever the (mutated) meta now says
            ds.save_as(out, enforce_file_format=False, implicit_vr=ds.original_encoding[0],
                       little_endian=ds.original_encoding[1])
            return out.getvalue()
    except Exception:  # noqa: BLE001 - a file pydicom cannot rewrite: mutate its bytes instead
        return bitflip(rng, data, layout)


def pixels(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    buf = bytearray(data)
    if layout.fragments:
        f = rng.choice(layout.fragments[1:] or layout.fragments)  # not the offset table, mostly
        start = f.value_offset
        span = max(1, min(f.length, len(buf) - start))
        head = rng.random() < 0.6  # the RLE header (64 bytes) or a codestream's markers
        for _ in range(rng.randint(1, 8)):
            pos = start + (rng.randrange(min(64, span)) if head else rng.randrange(span))
            if pos < len(buf):
                buf[pos] = _boundary(rng)
        return bytes(buf)
    pix = [e for e in layout.elements if e.tag == 0x7FE00010]
    if not pix:
        return overwrite(rng, data, layout)
    start = pix[0].value_offset
    for _ in range(rng.randint(1, 64)):
        pos = rng.randrange(start, len(buf)) if start < len(buf) else rng.randrange(len(buf))
        buf[pos] = _boundary(rng)
    return bytes(buf)


def _insert_point(layout: Layout, tag: int) -> int | None:
    """Where a top-level element with ``tag`` goes: before the first one with a larger tag."""
    top = [e for e in layout.elements if e.depth == 0]
    for e in top:
        if e.tag > tag:
            return e.offset
    return None


def _header(tag: int, vr: bytes, length: int, explicit: bool) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if not explicit or group == 0xFFFE:
        return struct.pack("<HHL", group, elem, length)
    return struct.pack("<HH2sHL", group, elem, vr, 0, length)


def seq_bomb(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    tag = 0x00400275  # Request Attributes Sequence: sorts before the Image Pixel group
    at = _insert_point(layout, tag)
    if at is None:
        return length(rng, data, layout)
    seq = _header(tag, b"SQ", _UNDEFINED, layout.explicit)
    item, item_end = _header(0xFFFEE000, b"", _UNDEFINED, False), _header(0xFFFEE00D, b"", 0, False)
    seq_end = _header(0xFFFEE0DD, b"", 0, False)
    if rng.random() < 0.6:  # deep
        depth = rng.choice([50, 200, 1000, 5000, 20000])
        bomb = (seq + item) * depth + (item_end + seq_end) * depth
    else:  # wide
        n = rng.choice([1000, 10000, 50000])
        bomb = seq + (item + item_end) * n + seq_end
    return data[:at] + bomb + data[at:]


def huge_length(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    if rng.random() < 0.5 and layout.elements:
        e = [x for x in layout.elements if x.depth == 0][-1]
        if e.length_size == 4 and e.length != _UNDEFINED:
            buf = bytearray(data)
            struct.pack_into("<L", buf, e.length_offset, rng.choice([0xFFFFFFF0, 0xFFFFFFFE, 0x7FFFFFFF,
                                                                     0x80000000, 0xFFFFFF00]))
            return bytes(buf)
    import warnings

    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.Rows, ds.Columns = rng.choice([(65535, 65535), (32768, 65535), (65535, 1), (1, 65535)])
            if rng.random() < 0.5:
                ds.NumberOfFrames = rng.choice(["100000", "2147483647", "65535"])
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=False, implicit_vr=ds.original_encoding[0],
                       little_endian=ds.original_encoding[1])
            return out.getvalue()
    except Exception:  # noqa: BLE001
        return length(rng, data, layout)


def deflate_stream(prefix: bytes, zeros: int) -> bytes:
    """A raw deflate stream (RFC 1951) of ``prefix`` followed by ``zeros`` zero bytes, built from
    one compressed MiB of zeros repeated (a full flush makes every repetition the same bytes), so
    that a 4 GiB bomb costs 4 MiB and milliseconds to make."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    mib = 1 << 20
    block = c.compress(b"\x00" * mib) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.compress(b"\x00" * (zeros % mib)) + c.flush(zlib.Z_FINISH)
    return head + block * (zeros // mib) + tail


def deflate_bomb(rng: random.Random, data: bytes, layout: Layout) -> bytes:
    """The data set, then an OB element of zeros declared at its full length, deflated (PS3.5
    A.5), under a File Meta Information that says Deflated Explicit VR Little Endian."""
    import pydicom
    from pydicom.filewriter import write_file_meta_info
    from pydicom.filebase import DicomBytesIO

    zeros = rng.choice([64, 256, 1024, 4096]) << 20
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            body = io.BytesIO()
            ds.save_as(body, enforce_file_format=False, implicit_vr=False, little_endian=True)
            raw = body.getvalue()
            start, _ = _meta(raw)
            dataset = raw[start:]
            meta = ds.file_meta if getattr(ds, "file_meta", None) is not None else pydicom.dataset.FileMetaDataset()
            meta.TransferSyntaxUID = _DEFLATED
            meta.setdefault("MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
            meta.setdefault("MediaStorageSOPInstanceUID", "1.2.3.4.5")
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_file_meta_info(fp, meta, enforce_standard=True)
    except Exception:  # noqa: BLE001
        return length(rng, data, layout)
    # a private element far after everything: (7FE1,0010) would sort after Pixel Data
    bomb_header = struct.pack("<HH2sHL", 0x7FE1, 0x1010, b"OB", 0, min(zeros, 0xFFFFFFFE))
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + deflate_stream(dataset + bomb_header, zeros)


_FUNCS = {"bitflip": bitflip, "bytes": overwrite, "truncate": truncate, "length": length, "vr": vr,
          "value": value, "pixels": pixels, "seq_bomb": seq_bomb, "huge_length": huge_length,
          "deflate_bomb": deflate_bomb}


# -- the corpus and the files -----------------------------------------------------------------------

def corpus() -> list[Path]:
    """pydicom's test files that are DICOM (a preamble and 'DICM', or no meta but a data set),
    sorted by name: the seeds. Text, JSON and gzip files are left out (they mutate into nothing)."""
    from pydicom.data import get_testdata_files

    out = []
    for name in sorted(get_testdata_files()):
        p = Path(name)
        if not p.is_file():
            continue
        head = p.read_bytes()[:132]
        if head[128:132] == b"DICM" or p.suffix == ".dcm":
            out.append(p)
    return sorted(out, key=lambda p: (p.name, str(p)))


@dataclass
class Fuzzed:
    """One fuzzed file: its bytes, the seed file and the mutations applied, in order."""

    index: int
    source: str
    mutations: list[str]
    data: bytes


def fuzz_one(seed: int, index: int, seeds: list[Path], *, only: str | None = None) -> Fuzzed:
    """File ``index`` of run ``seed``: the same bytes on every machine with the same pydicom."""
    rng = random.Random(f"medops-fuzz:{seed}:{index}")
    source = rng.choice(seeds)
    data = source.read_bytes()
    names = ([only] if only else
             rng.choices(MUTATIONS, WEIGHTS, k=rng.choice([1, 1, 1, 2, 2, 3])))
    applied = []
    for name in names:
        if not data:
            break
        data = _FUNCS[name](rng, data, walk(data))
        applied.append(name)
        if name in ("deflate_bomb", "seq_bomb"):
            break  # big already; more mutations would only slow generation
    return Fuzzed(index, source.name, applied, data)


def generate(seed: int, count: int, out_dir: Path, *, start: int = 0) -> list[Fuzzed]:
    """Write files ``start .. start + count - 1`` of run ``seed`` to ``out_dir`` as
    ``NNNNN-<mutations>.dcm``; returns them without their bytes."""
    seeds = corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(start, start + count):
        f = fuzz_one(seed, i, seeds)
        (out_dir / file_name(f)).write_bytes(f.data)
        made.append(Fuzzed(f.index, f.source, f.mutations, b""))
    return made


def file_name(f: Fuzzed) -> str:
    return f"{f.index:05d}-{'+'.join(f.mutations)}.dcm"
