"""The header of a GGUF file (llama.cpp's single-file format): its metadata and its tensor index.

A leaf read by both the weights loader (llama/checkpoint/gguf.py, which adds the tensors) and the
tokenizers (llama/tokenizer/, which need only the metadata), so neither imports the other.

Layout (little-endian, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x (key: string, type: u32, value)          metadata, tokenizer included
    n_tensors x (name: string, n_dims u32, ne: u64[n_dims], type u32, offset u64)
    padding to `general.alignment` (32) | tensor data

`gguf.GGUFReader` parses every token string of the tokenizer into its own numpy view, which takes
~11 s for a 49k-token vocabulary; this walk with `struct` takes well under a second.
"""

import errno
import mmap
import struct
from pathlib import Path

import numpy as np

from llama.common.errors import UserError

# Metadata value types: type id -> struct format (STRING=8 and ARRAY=9 are handled separately).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class GGUFFormatError(UserError):
    pass


class GGUFHeader:
    """`metadata` (a dict of Python values / numpy arrays) and `index`: one (name, shape in PyTorch
    order, type id, absolute byte offset) per tensor, in file order. The file stays memory-mapped."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private, copy-on-write map, so tensors viewing it are writable and a
            # caller that trains them never writes to the file. The OS charges a private map in full
            # against the memory it will commit, so it refuses one larger than that (70B's 40 GB of
            # Q4_0 on a 23 GB machine, with Linux's default overcommit): such a file is mapped
            # read-only, its pages still the OS's to bring in and drop (`writable` False).
            try:
                self._buf, self.writable = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), True
            except OSError as e:
                if e.errno != errno.ENOMEM:
                    raise
                self._buf, self.writable = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), False
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError) as e:
            if isinstance(e, GGUFFormatError):
                raise
            raise GGUFFormatError(f"corrupt or truncated GGUF header ({e})") from None

    # -- low-level reads at self._pos
    def _read(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._read("Q")
        if self._pos + n > len(self._buf):
            raise GGUFFormatError("corrupt or truncated GGUF header (a string runs past the end)")
        s = self._buf[self._pos : self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _strings(self, count: int) -> list:
        buf, pos, end, out = self._buf, self._pos, len(self._buf), []
        for _ in range(count):
            n = int.from_bytes(buf[pos : pos + 8], "little")
            if pos + 8 + n > end:
                raise GGUFFormatError("corrupt or truncated GGUF header (a string runs past the end)")
            out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        self._pos = pos
        return out

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._read("I"), self._read("Q")
            if etype in _NUMPY:  # numeric arrays (token types, scores) in one read
                arr = np.frombuffer(self._buf, dtype=_NUMPY[etype], count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr
            if etype == 8:  # strings (128K tokens, merges): the loop of _string, without its calls
                return self._strings(count)
            return [self._value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {vtype}")

    def _parse(self):
        if self._buf[:4] != b"GGUF":
            raise GGUFFormatError("not a GGUF file (the first 4 bytes are not 'GGUF')")
        self._pos = 4
        version = self._read("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are; big-endian files are not)")
        n_tensors, n_kv = self._read("Q"), self._read("Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            ne = [self._read("Q") for _ in range(self._read("I"))]  # innermost dimension first
            infos.append((name, tuple(reversed(ne)), self._read("I"), self._read("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.index = [(name, shape, qtype, data_start + offset) for name, shape, qtype, offset in infos]
