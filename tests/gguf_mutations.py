"""Malformed GGUF files for the hostile-surfaces fuzz: a small, well-formed GGUF written by
the `gguf` package, and mutations of each header field (magic, version, counts, key and
string lengths, value and item types, array lengths, tensor infos, alignment) and
truncations. Field offsets are found in the written bytes (each key and tensor name occurs
once), not computed from muestra's own reader."""

from __future__ import annotations

import struct
from pathlib import Path

U32, U64 = struct.Struct("<I"), struct.Struct("<Q")
HUGE = [2**62, 2**64 - 1, 2**32, 10**9]


def base_gguf(path: Path) -> bytes:
    """A GGUF of two small tensors and metadata of each value kind."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz")
    writer.add_uint32("llama.context_length", 64)
    writer.add_float32("fuzz.scale", 0.5)
    writer.add_bool("fuzz.flag", True)
    writer.add_int32("fuzz.other", -1)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    writer.add_array("tokenizer.ggml.scores", [0.1, 0.2, 0.3])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_k.weight", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _put(data: bytes, at: int, packer: struct.Struct, value: int) -> bytes:
    out = bytearray(data)
    packer.pack_into(out, at, value % (1 << (8 * packer.size)))
    return bytes(out)


def _key(data: bytes, key: str) -> tuple[int, int]:
    """(offset of the key's length, offset of its value type)."""
    at = data.index(key.encode())
    return at - 8, at + len(key)


def mutations(data: bytes) -> list[tuple[str, bytes]]:
    """(label, bytes) for each malformed file: at least 50."""
    cases: list[tuple[str, bytes]] = []
    for magic in (b"GGUG", b"\0\0\0\0", b"FUGG", b"ggml"):
        cases.append((f"magic {magic!r}", magic + data[4:]))
    for version in (0, 1, 4, 0x03000000, 2**32 - 1):
        cases.append((f"version {version}", _put(data, 4, U32, version)))
    for count in (*HUGE, 3, 1000):
        cases.append((f"tensor count {count}", _put(data, 8, U64, count)))
    for count in (*HUGE, 7, 100, 0):
        cases.append((f"kv count {count}", _put(data, 16, U64, count)))
    for key in ("general.architecture", "fuzz.scale"):
        length_at, type_at = _key(data, key)
        for length in (*HUGE, 0, len(key) + 1, len(key) - 1):
            cases.append((f"{key} key length {length}", _put(data, length_at, U64, length)))
        for value_type in (13, 255, 2**32 - 1, 9, 8):
            cases.append((f"{key} value type {value_type}", _put(data, type_at, U32, value_type)))
    _, type_at = _key(data, "general.architecture")
    for length in (*HUGE, 100):
        cases.append((f"string length {length}", _put(data, type_at + 4, U64, length)))
    cases.append(("string not UTF-8", data.replace(b"llama", b"ll\xffma", 1)))
    _, type_at = _key(data, "tokenizer.ggml.tokens")
    for length in (*HUGE, 4, 1000):
        cases.append((f"array length {length}", _put(data, type_at + 8, U64, length)))
    for item_type in (9, 13, 2**31):
        cases.append((f"array item type {item_type}", _put(data, type_at + 4, U32, item_type)))
    cases.append(("array item length huge", _put(data, type_at + 16, U64, 2**62)))
    cases += _tensor_cases(data)
    header_end = data.index(b"output_norm.weight") + len("output_norm.weight") + 4 + 8 + 4 + 8
    for size in (0, 3, 4, 8, 16, 23, 24, 40, type_at + 20, header_end - 3, header_end + 40,
                 len(data) - 1):  # fmt: skip
        cases.append((f"truncated at {size}", data[:size]))
    return cases


def _tensor_cases(data: bytes) -> list[tuple[str, bytes]]:
    name = b"token_embd.weight"
    at = data.index(name)
    dims_at = at + len(name)  # n_dims u32, then 2 × u64
    type_at, offset_at = dims_at + 4 + 16, dims_at + 4 + 16 + 4
    second = data.index(b"output_norm.weight")
    second_offset_at = second + len(b"output_norm.weight") + 4 + 8 + 4
    return [
        ("tensor name length huge", _put(data, at - 8, U64, 2**62)),
        ("tensor name length 100", _put(data, at - 8, U64, 100)),
        ("tensor n_dims 5", _put(data, dims_at, U32, 5)),
        ("tensor n_dims 2**32-1", _put(data, dims_at, U32, 2**32 - 1)),
        ("tensor dim 2**63", _put(data, dims_at + 4, U64, 2**63)),
        ("tensor dim 2**40", _put(data, dims_at + 4, U64, 2**40)),
        ("tensor dims overflow", _put(_put(data, dims_at + 4, U64, 2**40), dims_at + 12, U64,
                                      2**40)),
        ("tensor type 99", _put(data, type_at, U32, 99)),
        ("tensor type Q4_0 on 8-wide rows", _put(data, type_at, U32, 2)),
        ("tensor offset huge", _put(data, offset_at, U64, 2**62)),
        ("tensor offset misplaced", _put(data, offset_at, U64, 8)),
        ("second tensor offset past the end", _put(data, second_offset_at, U64, 2**20)),
        ("duplicate tensor name", data.replace(b"blk.0.attn_k", b"blk.0.attn_q")),
        ("duplicate key", data.replace(b"fuzz.other", b"fuzz.scale", 1)),
    ]  # fmt: skip
