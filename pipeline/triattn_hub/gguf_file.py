"""Read the metadata and tensors of a GGUF file (llama.cpp's model format, versions 2 and 3).

`gguf.GGUFReader` builds a numpy view for every string of every array field, which took
9 to 20 s for the 262144-token vocabulary of Gemma 3 on a 2-core CPU (measured). This reader parses the header
with `struct` in a fraction of a second and leaves dequantization to `gguf.quants.dequantize`.

GGUF lists tensor dimensions innermost first (`ne`), so a row-major numpy shape is `ne`
reversed: a [out_features, in_features] weight is stored with ne = [in_features, out_features].
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)
from gguf.quants import dequantize

from .errors import GGUFFormatError

logger = logging.getLogger(__name__)

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_SUPPORTED_VERSIONS = (2, 3)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: its type, numpy shape and byte range in the file."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


@dataclass
class GGUFFile:
    """Parsed header of a GGUF file, with the file mapped read-only for tensor access."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.memmap

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def raw(self, name: str) -> np.ndarray:
        """Return the stored bytes of tensor `name` as uint8 rows, the input `dequantize` expects."""
        info = self.tensors[name]
        row_count = math.prod(info.shape[:-1]) if len(info.shape) > 1 else 1
        return self.data[info.offset : info.offset + info.n_bytes].reshape(row_count, -1)

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize tensor `name` to a float32 array of its numpy shape.

        Raises GGUFFormatError when `gguf.quants` has no dequantizer for the tensor's type.
        """
        info = self.tensors[name]
        try:
            values = dequantize(self.raw(name), info.ggml_type)
        except NotImplementedError as error:
            raise GGUFFormatError(
                f"tensor {name!r} in {self.path.name} has type {info.ggml_type.name}, which the "
                f"installed gguf package cannot dequantize. Upgrade it with `pip install -U gguf`."
            ) from error
        return np.ascontiguousarray(values, dtype=np.float32).reshape(info.shape)


class _Cursor:
    """Little-endian reader over a buffer that raises GGUFFormatError when it runs past the end."""

    def __init__(self, buffer: memoryview, file_name: str):
        self.buffer = buffer
        self.position = 0
        self.file_name = file_name

    def _check(self, size: int) -> None:
        if self.position + size > len(self.buffer):
            raise GGUFFormatError(
                f"{self.file_name} ends inside its header at byte {self.position}, so "
                f"the file is truncated or not a GGUF file"
            )

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        self._check(size)
        (value,) = struct.unpack_from(fmt, self.buffer, self.position)
        self.position += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self._check(length)
        raw = bytes(self.buffer[self.position : self.position + length])
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise GGUFFormatError(
                f"{self.file_name} has a string that is not valid UTF-8 at byte "
                f"{self.position - length}: {raw[:40]!r}"
            ) from error

    def value(self, value_type: int):
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        try:
            return self.scalar(_SCALAR_FORMATS[GGUFValueType(value_type)])
        except (KeyError, ValueError) as error:
            raise GGUFFormatError(
                f"{self.file_name} has an unknown metadata value type {value_type} at byte "
                f"{self.position}"
            ) from error

    def array(self) -> list:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type in (GGUFValueType.STRING, GGUFValueType.ARRAY):
            return [self.value(item_type) for _ in range(count)]
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is None:
            raise GGUFFormatError(
                f"{self.file_name} has an array of unknown value type {item_type} at byte "
                f"{self.position}"
            )
        dtype = np.dtype(fmt)
        self._check(count * dtype.itemsize)
        values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.position)
        self.position += count * dtype.itemsize
        return values.tolist()


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of the GGUF file at `path` and map its tensor data read-only.

    Raises GGUFFormatError for a file that is not little-endian GGUF version 2 or 3, has a
    truncated header, or lists a tensor of unknown type or outside the file.
    """
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data), path.name)

    magic = cursor.scalar("<I")
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"{path.name} is not a GGUF file: its first 4 bytes are {magic:#010x}")
    version = cursor.scalar("<I")
    if version not in _SUPPORTED_VERSIONS:
        raise GGUFFormatError(
            f"{path.name} has GGUF version {version} (or is big-endian). Only little-endian "
            f"versions {_SUPPORTED_VERSIONS} are supported, so convert it with a current llama.cpp."
        )
    tensor_count = cursor.scalar("<Q")
    metadata_count = cursor.scalar("<Q")

    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))

    raw_infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        n_dims = cursor.scalar("<I")
        ne = [cursor.scalar("<Q") for _ in range(n_dims)]
        type_id = cursor.scalar("<I")
        relative_offset = cursor.scalar("<Q")
        raw_infos.append((name, ne, type_id, relative_offset))

    alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-cursor.position // alignment) * alignment

    tensors = {}
    for name, ne, type_id, relative_offset in raw_infos:
        info = _tensor_info(path.name, name, ne, type_id, data_start + relative_offset)
        if info.offset + info.n_bytes > len(data):
            raise GGUFFormatError(
                f"tensor {name!r} in {path.name} ends at byte {info.offset + info.n_bytes}, "
                f"beyond the file size {len(data)}, so the file is truncated"
            )
        tensors[name] = info

    logger.debug("read GGUF header of %s: %d metadata keys, %d tensors", path.name, len(metadata), len(tensors))
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors, data=data)


def _tensor_info(file_name: str, name: str, ne: list[int], type_id: int, offset: int) -> TensorInfo:
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError) as error:
        raise GGUFFormatError(
            f"tensor {name!r} in {file_name} has ggml type id {type_id}, unknown to the installed "
            f"gguf package. Upgrade it with `pip install -U gguf`."
        ) from error
    if ne and ne[0] % block_size:
        raise GGUFFormatError(
            f"tensor {name!r} in {file_name} has a row of {ne[0]} values, not a multiple of the "
            f"{ggml_type.name} block size {block_size}"
        )
    n_bytes = math.prod(ne) // block_size * type_size
    return TensorInfo(name=name, ggml_type=ggml_type, shape=tuple(reversed(ne)), offset=offset, n_bytes=n_bytes)
