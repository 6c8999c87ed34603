"""Storage and audio I/O: URIs, atomic and create-once outputs, decoding, conforming and encoding.

Every module of demix that reads or writes audio, or writes a file, goes through this package.
"""

from demix.pipeline.io.conform import conform, load_audio, stream_conformed
from demix.pipeline.io.decode import AudioError, AudioInfo, AudioStream, audio_info, open_audio, read_slice
from demix.pipeline.io.encode import (
    AudioWriter, Encoding, add_encoding_flags, encoding_kwargs, save_audio, write_float_wav,
)
from demix.pipeline.io.storage import (
    AUDIO_EXTENSIONS, AtomicOutput, StorageError, atomic_write, check_output_root, create_once, expand_inputs,
    filesystem, is_remote, join, local_copy, local_path, output_root, put_file, safe_component, staged_path,
)

__all__ = [
    "add_encoding_flags", "encoding_kwargs",
    "AUDIO_EXTENSIONS", "AtomicOutput", "AudioError", "AudioInfo", "AudioStream", "AudioWriter", "Encoding",
    "StorageError", "atomic_write", "audio_info", "check_output_root", "conform", "create_once", "expand_inputs",
    "filesystem",
    "is_remote", "join", "load_audio", "local_copy", "local_path", "open_audio", "output_root", "put_file",
    "read_slice", "safe_component", "save_audio", "staged_path", "stream_conformed", "write_float_wav",
]
