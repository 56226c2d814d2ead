"""Read the tensor table of a GGUF file (names, shapes, ggml types) without loading any data.

``mx.load`` hides the on-disk type of each tensor and silently drops tensors it cannot decode,
so the importer reads the header itself to check every tensor before converting.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"

#: ggml tensor type ids, as numbered in ggml.h (names only used in messages and metadata).
GGML_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64",
    29: "IQ1_M", 30: "BF16",
}  # fmt: skip

# GGUF metadata value types -> struct format of a scalar (8 = string, 9 = array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table."""

    name: str
    shape: tuple[int, ...]
    """Row-major shape (outermost first), as MLX reports it."""
    ggml_type: int

    @property
    def type_name(self) -> str:
        """The ggml name of the tensor's type, e.g. ``Q4_1``."""
        return GGML_TYPE_NAMES.get(self.ggml_type, f"ggml type {self.ggml_type}")


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("truncated GGUF header")
    value: int | float | bool = struct.unpack("<" + fmt, data)[0]
    return value


def _read_string(f: BinaryIO) -> str:
    length = int(_read(f, "Q"))
    data = f.read(length)
    if len(data) != length:
        raise GGUFHeaderError("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _skip_value(f: BinaryIO, value_type: int) -> None:
    if value_type == _STRING:
        f.seek(int(_read(f, "Q")), 1)
    elif value_type == _ARRAY:
        item_type = int(_read(f, "I"))
        count = int(_read(f, "Q"))
        if item_type in _SCALAR_FORMATS:
            f.seek(count * struct.calcsize("<" + _SCALAR_FORMATS[item_type]), 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    elif value_type in _SCALAR_FORMATS:
        f.seek(struct.calcsize("<" + _SCALAR_FORMATS[value_type]), 1)
    else:
        raise GGUFHeaderError(f"unknown GGUF metadata value type {value_type}")


@dataclass(frozen=True)
class GGUFHeader:
    """The scalar and string metadata (arrays skipped) and the tensor table of a GGUF file."""

    metadata: dict[str, str | int | float | bool]
    tensors: list[TensorInfo]


def read_header(path: Path) -> GGUFHeader:
    """Read the header of the GGUF file at ``path`` (versions 2 and 3)."""
    metadata: dict[str, str | int | float | bool] = {}
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise GGUFHeaderError(f"{path} is not a GGUF file (bad magic)")
        version = int(_read(f, "I"))
        if version not in (2, 3):
            raise GGUFHeaderError(f"unsupported GGUF version {version}")
        n_tensors = int(_read(f, "Q"))
        n_kv = int(_read(f, "Q"))
        for _ in range(n_kv):
            key = _read_string(f)
            value_type = int(_read(f, "I"))
            if value_type == _STRING:
                metadata[key] = _read_string(f)
            elif value_type in _SCALAR_FORMATS:
                metadata[key] = _read(f, _SCALAR_FORMATS[value_type])
            else:
                _skip_value(f, value_type)
        infos = []
        for _ in range(n_tensors):
            name = _read_string(f)
            n_dims = int(_read(f, "I"))
            dims = [int(_read(f, "Q")) for _ in range(n_dims)]
            ggml_type = int(_read(f, "I"))
            _read(f, "Q")  # data offset
            infos.append(TensorInfo(name, tuple(reversed(dims)), ggml_type))
    return GGUFHeader(metadata, infos)
