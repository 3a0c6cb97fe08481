"""A GGUF file's header, read and checked before anything else opens the file.

llama.cpp, the `gguf` package's `GGUFReader` and transformers (through that reader) each
parse a GGUF header on their own, and a header that lies (a key "of 2⁶² bytes", 2⁶²
tensors) ends in a numpy `IndexError` deep inside the reader, or a log line from llama.cpp.
`read_gguf_header` walks the header once and refuses, as one `InputError` naming the file
and the field, every count or length that the file's remaining bytes cannot hold —
before any of them sizes a list, an array or a read.

The layout (GGUF v2 and v3, little-endian; `ggml/src/gguf.cpp` is the reference):

    magic "GGUF" · version u32 · tensor count u64 · key/value count u64
    each key/value: key (u64 length + UTF-8) · value type u32 · value
        value: a scalar, a string (u64 length + UTF-8), or an array
        (item type u32 · u64 count · items; arrays of arrays are refused, as llama.cpp does)
    each tensor: name (string, < 64 bytes) · n_dims u32 (≤ 4) · n_dims × u64 · ggml type u32
        · offset u64 (from the data section, each tensor right after the previous one,
        padded to the alignment)
    padding to `general.alignment` (default 32) · the tensor data

What is checked is what llama.cpp's own reader checks, plus that the tensor data is in
the file and that every string is UTF-8 (transformers decodes them). The result keeps the
scalar metadata (architecture, alignment, block counts…) and each tensor's name, type and
shape; arrays are kept as their item type and length only.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from muestra.errors import InputError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME = 63  # ggml's GGML_MAX_NAME (64) less the terminating NUL
MAX_DIMS = 4
MAX_STRING = 1 << 30  # llama.cpp's GGUF_MAX_STRING_LENGTH
INT64_MAX = (1 << 63) - 1

# value type → (struct format, size); STRING = 8, ARRAY = 9 (gguf's GGUFValueType)
SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
STRING, ARRAY = 8, 9
LENGTH = struct.Struct("<Q")
TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
              6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
              12: "float64"}  # fmt: skip
KEPT_STRING = 1024  # string values longer than this are checked but not kept


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """What a checked GGUF header says (see the module docstring)."""

    path: Path
    version: int
    metadata: dict[str, Any]  # scalars and strings; an array is ("array", item type, length)
    tensors: tuple[GGUFTensor, ...]
    data_offset: int  # where the tensor data starts in the file
    alignment: int = DEFAULT_ALIGNMENT
    types: dict[str, str] = field(default_factory=dict)  # each key's value type

    @property
    def architecture(self) -> str:
        value = self.metadata.get("general.architecture")
        if not isinstance(value, str) or not value:
            raise InputError(
                f"{self.path} is not a readable GGUF file (it has no general.architecture "
                "string); convert the model again with llama.cpp's convert_hf_to_gguf.py"
            )
        return value


def read_gguf_header(file: Path) -> GGUFHeader:
    """`file`'s header, checked (module docstring); an `InputError` naming the file and
    what is wrong otherwise. Cached by path, size and modification time."""
    path = Path(file)
    try:
        stat = path.stat()
    except OSError as err:
        raise InputError(f"{path} is not a readable GGUF file ({err.strerror})") from err
    return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    try:
        with open(path, "rb") as handle:
            if size == 0:
                return _Parser(Path(path), b"").header()
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _Parser(Path(path), data).header()
    except OSError as err:
        raise InputError(f"{path} is not a readable GGUF file ({err})") from err


class _Refused(Exception):
    """What is wrong, without the file's name (the parser adds it)."""


class _Parser:
    """One walk over a header: a cursor that refuses every read past the end."""

    def __init__(self, path: Path, data: Any) -> None:
        self.path, self.data, self.size, self.at = path, data, len(data), 0

    def header(self) -> GGUFHeader:
        try:
            return self._header()
        except _Refused as why:
            raise InputError(
                f"{self.path} is not a readable GGUF file ({why}); the file is damaged, "
                "truncated or not a GGUF: download or convert it again"
            ) from None

    # ---- reads ---------------------------------------------------------------------------

    def left(self) -> int:
        return self.size - self.at

    def take(self, count: int, what: str) -> int:
        """Advance over `count` bytes of `what`; the offset they start at."""
        if count > self.left():
            raise _Refused(
                f"{what} needs {count:,} bytes at offset {self.at:,}, and the file has "
                f"{self.left():,} left"
            )
        start, self.at = self.at, self.at + count
        return start

    def scalar(self, value_type: int, what: str) -> Any:
        fmt, size = SCALARS[value_type]
        return struct.unpack_from(fmt, self.data, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return int(self.scalar(4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(10, what))

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        length = self.u64(f"the length of {what}")
        if length > min(limit, self.left()):
            where = f"the {limit:,}-byte limit" if length > limit else "what the file holds"
            raise _Refused(f"{what} claims {length:,} bytes, over {where} ({self.left():,} left)")
        start = self.take(length, what)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(f"{what} at offset {start:,} is not UTF-8") from None

    def count(self, value: int, each: int, what: str) -> int:
        """`value` items of at least `each` bytes: refused when the file cannot hold them."""
        if value * each > self.left():
            raise _Refused(
                f"{what} is {value:,}, more than the {self.left():,} bytes left can hold"
            )
        return value

    # ---- the walk ------------------------------------------------------------------------

    def _header(self) -> GGUFHeader:
        if self.size < 24:
            raise _Refused(f"{self.size:,} bytes, shorter than a GGUF header (24)")
        magic = bytes(self.data[:4])
        if magic != MAGIC:
            raise _Refused(f"it starts with {magic!r}, not GGUF's magic b'GGUF'")
        self.at = 4
        version = self.u32("the version")
        if version not in VERSIONS:
            raise _Refused(_version_problem(version))
        tensors = self.u64("the tensor count")
        entries = self.u64("the key/value count")
        # each entry holds at least a 1-byte key, its length, a type and a 1-byte value;
        # each tensor at least its name's length, n_dims, a type and an offset
        self.count(entries, 8 + 1 + 4 + 1, "the header's key/value count")
        self.count(tensors, 8 + 4 + 4 + 8, "the header's tensor count")
        metadata, types = self._metadata(entries)
        alignment = _alignment(metadata, types)
        infos = [self._tensor_info(i) for i in range(self.count(tensors, 24, "tensor count"))]
        data_offset = -(-self.at // alignment) * alignment
        return GGUFHeader(
            self.path, version, metadata, self._placed(infos, data_offset, alignment),
            data_offset, alignment, types,
        )  # fmt: skip

    def _metadata(self, entries: int) -> tuple[dict[str, Any], dict[str, str]]:
        metadata: dict[str, Any] = {}
        types: dict[str, str] = {}
        for index in range(entries):
            key = self.string(f"the key of metadata entry {index}")
            if not key:
                raise _Refused(f"metadata entry {index} has an empty key")
            if key in metadata:
                raise _Refused(f"the metadata key {key!r} appears twice")
            value_type = self.u32(f"the type of {key!r}")
            metadata[key] = self._value(key, value_type)
            types[key] = TYPE_NAMES[value_type]
        return metadata, types

    def _value(self, key: str, value_type: int) -> Any:
        if value_type in SCALARS:
            return self.scalar(value_type, f"the value of {key!r}")
        if value_type == STRING:
            text = self.string(f"the value of {key!r}")
            return text if len(text) <= KEPT_STRING else None
        if value_type != ARRAY:
            raise _Refused(f"the metadata key {key!r} has value type {value_type}, not 0–12")
        item_type = self.u32(f"the item type of {key!r}")
        if item_type not in SCALARS and item_type != STRING:
            kind = "an array of arrays" if item_type == ARRAY else f"item type {item_type}"
            raise _Refused(f"the metadata array {key!r} has {kind}, which GGUF does not allow")
        length = self.u64(f"the length of {key!r}")
        each = 8 if item_type == STRING else SCALARS[item_type][1]
        self.count(length, each, f"the length of the array {key!r}")
        if item_type == STRING:
            self._strings(length, key)
        else:
            self.take(length * each, f"the array {key!r}")
        return ("array", TYPE_NAMES[item_type], length)

    def _strings(self, length: int, key: str) -> None:
        """Walk an array of `length` strings (a vocabulary: 10⁵ of them), as `string` does
        item by item, in one tight loop."""
        data, at, size, unpack = self.data, self.at, self.size, LENGTH.unpack_from
        for i in range(length):
            if at + 8 > size:
                self.at = at
                self.take(8, f"the length of item {i} of {key!r}")
            (count,) = unpack(data, at)
            if count > size - at - 8:
                self.at = at
                self.string(f"item {i} of {key!r}")
            try:
                data[at + 8 : at + 8 + count].decode("utf-8")
            except UnicodeDecodeError:
                raise _Refused(f"item {i} of {key!r} at offset {at + 8:,} is not UTF-8") from None
            at += 8 + count
        self.at = at

    def _tensor_info(self, index: int) -> tuple[str, int, tuple[int, ...], int]:
        name = self.string(f"the name of tensor {index}", MAX_NAME)
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise _Refused(f"tensor {name!r} has {n_dims:,} dimensions; GGUF allows {MAX_DIMS}")
        shape = tuple(self.u64(f"a dimension of tensor {name!r}") for _ in range(n_dims))
        elements = 1
        for dim in shape:
            elements *= dim
        if any(dim > INT64_MAX for dim in shape) or elements > INT64_MAX:
            raise _Refused(f"tensor {name!r} has shape {list(shape)}, over int64")
        ggml_type = self.u32(f"the type of tensor {name!r}")
        offset = self.u64(f"the data offset of tensor {name!r}")
        return name, ggml_type, shape, offset

    def _placed(
        self, infos: list[tuple[str, int, tuple[int, ...], int]], start: int, alignment: int
    ) -> tuple[GGUFTensor, ...]:
        """Each tensor's bytes, right after the previous tensor's (padded), in the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        tensors, names, expected = [], set(), 0
        for name, ggml_type, shape, offset in infos:
            if name in names:
                raise _Refused(f"the tensor name {name!r} appears twice")
            names.add(name)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                known = f"tensor {name!r} has ggml type {ggml_type}, not one gguf knows"
                raise _Refused(known) from None
            row = shape[0] if shape else 1
            if row % block:
                raise _Refused(
                    f"tensor {name!r} has rows of {row:,} values, not a multiple of its "
                    f"type's block of {block}"
                )
            elements = 1
            for dim in shape:
                elements *= dim
            nbytes = elements // block * type_size
            if offset != expected:
                raise _Refused(
                    f"tensor {name!r} claims data offset {offset:,}, and the tensors before "
                    f"it end at {expected:,}"
                )
            if start + offset + nbytes > self.size:
                raise _Refused(
                    f"tensor {name!r} needs bytes {start + offset:,}–{start + offset + nbytes:,}"
                    f" and the file ends at {self.size:,} (truncated)"
                )
            tensors.append(GGUFTensor(name, ggml_type, shape, offset, nbytes))
            expected = offset + -(-nbytes // alignment) * alignment
        return tuple(tensors)


def _version_problem(version: int) -> str:
    if version and not version & 0xFFFF:
        return (
            f"version field {version:#010x}: a big-endian GGUF, and llama.cpp and transformers "
            "read little-endian ones"
        )
    if version == 1:
        return "GGUF version 1, which llama.cpp no longer reads"
    return f"GGUF version {version}, and muestra reads versions 2 and 3"


def _alignment(metadata: dict[str, Any], types: dict[str, str]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if types["general.alignment"] != "uint32":
        raise _Refused(f"general.alignment is a {types['general.alignment']}, not a uint32")
    if value == 0 or value & (value - 1):
        raise _Refused(f"general.alignment is {value}, not a power of 2")
    return value
