"""The areaDetector NDPluginCodec formats, both ways.

Decoding is what the appliance needs; encoding exists so the detector simulator
can produce the same byte streams a real IOC with a codec plugin sends. The
codec libraries are imported on first use: a detector that never compresses
must not need them, and a missing one must be a clear per-frame error.
"""
from __future__ import annotations

from typing import Callable, Dict

import numpy as np

CODECS = ("lz4", "bslz4", "blosc")


class CodecError(ValueError):
    """A payload that cannot be decoded: ``reason`` is the drop counter it belongs to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decompress(codec: str, payload: np.ndarray, dtype: np.dtype, uncompressed_size: int) -> np.ndarray:
    """The decoded 1-D array of ``dtype``; raises CodecError('codec' or 'corrupt')."""
    decoder = _DECODERS.get(codec)
    if decoder is None:
        raise CodecError("codec", "unknown codec {!r}; expected one of {}".format(codec, ", ".join(CODECS)))
    if uncompressed_size <= 0 or uncompressed_size % dtype.itemsize:
        raise CodecError(
            "corrupt",
            "uncompressedSize {} is not a positive multiple of {} ({} bytes)".format(
                uncompressed_size, dtype.name, dtype.itemsize
            ),
        )
    try:
        data = decoder(payload, dtype, uncompressed_size)
    except ImportError as exc:
        raise CodecError("codec", "codec {} needs a module that is not installed: {}".format(codec, exc)) from exc
    except Exception as exc:  # each library raises its own error types for bad bytes
        raise CodecError("corrupt", "{} payload of {} bytes does not decode: {}".format(codec, payload.size, exc)) from exc
    if data.nbytes != uncompressed_size:
        raise CodecError(
            "corrupt",
            "{} payload decoded to {} bytes; uncompressedSize says {}".format(codec, data.nbytes, uncompressed_size),
        )
    return data


def compress(codec: str, data: np.ndarray) -> bytes:
    """Encode a C-contiguous array as an IOC's codec plugin would."""
    if codec == "lz4":
        import lz4.block

        return lz4.block.compress(data.tobytes(), store_size=False)
    if codec == "bslz4":
        import bitshuffle

        return bitshuffle.compress_lz4(np.ascontiguousarray(data).ravel(), 0).tobytes()
    if codec == "blosc":
        import blosc

        return blosc.compress(data.tobytes(), typesize=data.dtype.itemsize)
    raise ValueError("unknown codec {!r}; expected one of {}".format(codec, ", ".join(CODECS)))


def _lz4(payload: np.ndarray, dtype: np.dtype, size: int) -> np.ndarray:
    import lz4.block

    return np.frombuffer(lz4.block.decompress(payload, uncompressed_size=size), dtype=dtype)


def _bslz4(payload: np.ndarray, dtype: np.dtype, size: int) -> np.ndarray:
    import bitshuffle

    return bitshuffle.decompress_lz4(np.ascontiguousarray(payload), (size // dtype.itemsize,), dtype, 0)


def _blosc(payload: np.ndarray, dtype: np.dtype, size: int) -> np.ndarray:
    import blosc

    return np.frombuffer(blosc.decompress(payload), dtype=dtype)


_DECODERS: Dict[str, Callable[[np.ndarray, np.dtype, int], np.ndarray]] = {
    "lz4": _lz4,
    "bslz4": _bslz4,
    "blosc": _blosc,
}
