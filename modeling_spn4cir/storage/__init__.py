"""Storage: atomic files, output files and output directories (one rule for what a writer may replace), the one
lock of a directory a run writes, the one sha256 helper, the one staleness rule (file stamps), the one target-side
fingerprint, and the one resumable, fingerprinted shard store (in a directory or in memory) that the candidate bank,
the caption cache and the de-duplication hashes keep their rows in."""

from .atomic import (
    MARKER,
    OVERWRITE_HINT,
    OutputDirError,
    OutputFileError,
    OutputLockedError,
    apply_umask,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    check_output_file,
    current_umask,
    lock_path,
    output_lock,
    read_marker,
    wait_for_unlock,
    writable_dir,
    write_output_file,
)
from .fingerprint import (
    PROCESSOR_NAME_KEYS,
    checkpoint_fingerprint,
    processor_sha256,
    same_target_side,
    target_side_fingerprint,
)
from .hashing import file_sha256, json_sha256, sha256
from .locks import directory_lock, holds_directory_lock
from .shard_store import (
    Codec,
    RecordsCodec,
    Shard,
    ShardJob,
    ShardPlan,
    ShardStore,
    fixed_size_blocks,
    one_block_per_rank,
)
from .stamps import file_stamp, file_stat
from .tensor_shards import SafetensorsCodec, ShardedRows

__all__ = [
    "MARKER",
    "OVERWRITE_HINT",
    "OutputDirError",
    "OutputFileError",
    "OutputLockedError",
    "apply_umask",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_output_dir",
    "check_output_file",
    "current_umask",
    "lock_path",
    "output_lock",
    "read_marker",
    "wait_for_unlock",
    "writable_dir",
    "write_output_file",
    "directory_lock",
    "holds_directory_lock",
    "PROCESSOR_NAME_KEYS",
    "checkpoint_fingerprint",
    "processor_sha256",
    "same_target_side",
    "target_side_fingerprint",
    "file_sha256",
    "json_sha256",
    "sha256",
    "Codec",
    "RecordsCodec",
    "Shard",
    "ShardJob",
    "ShardPlan",
    "ShardStore",
    "fixed_size_blocks",
    "one_block_per_rank",
    "file_stamp",
    "file_stat",
    "SafetensorsCodec",
    "ShardedRows",
]
