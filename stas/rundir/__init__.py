"""The run directory: atomic writes, locks and safe paths (files.py), append-only JSON-lines records (records.py), the
run's identity (run_identity.py), and tidying: stub directories and empty leftovers (cleanup.py). Everything that
reads or writes a run directory goes through here."""

from stas.rundir.files import (VIDEOS_DIR, atomic_write_bytes, atomic_write_json, atomic_write_jsonl, atomic_write_text,
                               check_writable, file_lock, read_yaml, remove_leftovers, video_path, writing)
from stas.rundir.run_identity import (IDENTITY_FILE, claim_run_dir, describe_differences, differing_keys, flatten,
                                     hydra_job, identity, load_identity)
from stas.rundir.records import (GENERATION_FIELDS, MANIFEST_FILE, METRIC_FIELDS, JsonlRecords, checked_records,
                                 checked_rows, read_jsonl, read_manifest, record_files, shard_file)
from stas.rundir.cleanup import (PARTIAL_DIR, RunDirGuard, has_outputs, remove_empty_dir, remove_empty_parents,
                                 run_dirs_below)

__all__ = [
    "VIDEOS_DIR", "atomic_write_bytes", "atomic_write_json", "atomic_write_jsonl", "atomic_write_text",
    "check_writable", "file_lock", "read_yaml", "remove_leftovers", "video_path", "writing", "IDENTITY_FILE",
    "claim_run_dir", "describe_differences", "differing_keys", "flatten", "hydra_job", "identity", "load_identity",
    "GENERATION_FIELDS", "MANIFEST_FILE", "METRIC_FIELDS", "JsonlRecords", "checked_records", "checked_rows",
    "read_jsonl", "read_manifest", "record_files", "shard_file", "PARTIAL_DIR", "RunDirGuard", "has_outputs",
    "remove_empty_dir", "remove_empty_parents", "run_dirs_below",
]
