"""Weight files at model scale: safetensors written and read in one pass, hashed on the way.

Why not `save_pretrained` + hashing afterwards: a snapshot of an 8B model is 16 GB; writing it,
then reading it back to hash it, then (on every generator) reading it to verify and once more to
load it, costs the volume's bandwidth three or four times. Here:
  * `write_safetensors` streams tensors one at a time (cast to the model's dtype, copied off the
    GPU one tensor at a time: no second copy of the model in host memory) into the file, feeding
    the same bytes to the hash on a helper thread while the next write runs;
  * `read_hashed` reads a file once, hashing each chunk on a helper thread while the next chunk
    is read, and `tensors_from_buffer` makes the tensors as views of those bytes (no copy).
The hash is BLAKE3: cryptographic (a volume writer cannot forge bytes that match the announced
checksum) and 3-4 GB/s on one core here against sha256's 1.8 (more with threads); manifests
written with sha256 still verify (`file_digest` takes the algorithm the manifest names).

The safetensors layout (8-byte little-endian header length, JSON header, raw little-endian
tensors) is the format's specification, so transformers, vLLM and `safetensors` read these files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import torch

HASH = "blake3"  # what new manifests use
HASHES = ("blake3", "sha256")  # what a manifest may name
CHUNK = 16 << 20
_ALIGN = 8  # safetensors pads the header so the data starts 8-byte aligned

# safetensors dtype names
ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def new_hasher(algorithm: str = HASH):
    if algorithm == "blake3":
        from blake3 import blake3

        return blake3(max_threads=blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {algorithm!r}; known: {', '.join(HASHES)}")


def file_digest(path: Path, algorithm: str = HASH) -> str:
    """Hex digest of a file, read once in large chunks."""
    return read_hashed(path, algorithm)[1]


# --- writing -----------------------------------------------------------------------------


def _header(tensors: list[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype], metadata: dict) -> bytes:
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors:
        out = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        size = t.numel() * out.itemsize
        entries[name] = {"dtype": ST_DTYPES[out], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def _host_bytes(t: torch.Tensor, dtype: Optional[torch.dtype]) -> memoryview:
    """The tensor's bytes in host memory, cast to `dtype` (floating tensors only)."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype=dtype)
    t = t.detach().to("cpu").contiguous()
    # reshape(-1): a 0-dim tensor (AdamW's `step`) cannot be viewed as bytes of another size
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_safetensors(path: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None,
                      metadata: Optional[dict] = None, algorithm: str = HASH) -> str:
    """Write `tensors` (name, tensor) as one safetensors file, floating tensors cast to `dtype`;
    returns the file's digest, computed from the bytes as they were written. Not fsynced (the
    caller's atomic directory write does that)."""
    named = list(tensors)
    items = [t for _, t in named]
    hasher = new_hasher(algorithm)
    header = _header(named, dtype, {"format": "pt"} | (metadata or {}))
    hasher.update(header)
    # a pipeline of three: tensor i+1 is cast and copied to the host while tensor i is hashed and
    # written (the hash in order: each update waits for the one before)
    with open(path, "wb", buffering=0) as out, ThreadPoolExecutor(2) as pool:
        out.write(header)
        hashing = None
        ready = pool.submit(_host_bytes, items[0], dtype) if items else None
        for i in range(len(items)):
            data = ready.result()
            ready = pool.submit(_host_bytes, items[i + 1], dtype) if i + 1 < len(items) else None
            if hashing is not None:
                hashing.result()
            hashing = pool.submit(hasher.update, data)
            _write_all(out, data)
        if hashing is not None:
            hashing.result()
    return hasher.hexdigest()


def _write_all(out, data: memoryview) -> None:
    while data:
        written = out.write(data[:CHUNK])
        data = data[written:]


def shard(tensors: list[tuple[str, torch.Tensor]], max_bytes: int, itemsize: Optional[int] = None) -> list[list]:
    """Split (name, tensor) pairs, in order, into files of at most `max_bytes` (a tensor larger
    than that gets a file of its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, t in tensors:
        n = t.numel() * (itemsize if (itemsize and t.is_floating_point()) else t.element_size())
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


# --- reading -----------------------------------------------------------------------------


def read_hashed(path: Path, algorithm: str = HASH):
    """A file's bytes (a uint8 numpy array), read once, and their digest (each chunk hashed while the
    next is read). The buffer is not zero-filled first: the read is its only pass over memory."""
    import numpy as np

    size = os.path.getsize(path)
    buf = np.empty(size, dtype=np.uint8)
    view = memoryview(buf)
    hasher = new_hasher(algorithm)
    with open(path, "rb", buffering=0) as handle, ThreadPoolExecutor(1) as pool:
        pending, done = None, 0
        while done < size:
            n = handle.readinto(view[done : done + CHUNK])
            if not n:
                raise OSError(f"{path}: file ended after {done} of {size} bytes")
            if pending is not None:
                pending.result()
            pending = pool.submit(hasher.update, view[done : done + n])
            done += n
        if pending is not None:
            pending.result()
    return buf, hasher.hexdigest()


def tensors_from_buffer(buf) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory (bytes-like), as views of its bytes (no copy)."""
    (length,) = struct.unpack("<Q", bytes(buf[:8]))
    header = json.loads(bytes(buf[8 : 8 + length]))
    header.pop("__metadata__", None)
    base = 8 + length
    out = {}
    for name, entry in header.items():
        dtype = TORCH_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count == 0:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        out[name] = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).reshape(entry["shape"])
    return out
