"""`python -m stereo shards-upload --src shards/x --out s3://bucket/x`: put shards that are already built on S3.

The source is a shard folder with its manifest.json (`make shards`, `demo-data`). Each shard the manifest lists is
checked against the manifest's size, then uploaded (multipart for large files; S3 shows an object whole or not at
all) with its sha256 in the object's metadata, unless an object of the same size and sha256 is already there, so a
re-run after an interruption uploads only the rest. Once every shard is up, each object's size is read back and
compared with the local file; only then is the manifest uploaded, so a reader never sees a manifest that lists a
missing or short object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stereo import exitcodes
from stereo.data.remote import FetchError, object_head, upload_file
from stereo.progress import track

MANIFEST = "manifest.json"


class UploadError(RuntimeError):
    """The source or the destination is unusable, or an uploaded object does not match its local file."""

    def __init__(self, message: str, exit_code: int = exitcodes.CONFIG):
        super().__init__(message)
        self.exit_code = exit_code


def _local_shards(src: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        raise UploadError(f"{src}: no {MANIFEST}; expected a shard folder written by `make shards` or `demo-data`")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [{"name": e["name"], "bytes": int(e["bytes"]), "sha256": str(e.get("sha256", ""))}
                   for e in manifest["shards"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UploadError(f"{manifest_path}: not a valid manifest ({exc!r}); expected "
                          '{"shards": [{"name", "bytes", "sha256", ...}, ...]}') from None
    if not entries:
        raise UploadError(f"{manifest_path}: lists no shards")
    for entry in entries:
        path = src / entry["name"]
        size = path.stat().st_size if path.is_file() else None
        if size != entry["bytes"]:
            found = "is missing" if size is None else f"has {size} bytes"
            raise UploadError(f"{path}: the manifest lists {entry['bytes']} bytes but the file {found}; rewrite the "
                              "shards (`make shards`) before uploading them")
    return manifest, entries


def _already_there(url: str, entry: dict[str, Any]) -> bool:
    """An object of the same size and sha256 (kept in its metadata by both upload paths); an object without one
    came from elsewhere and is replaced."""
    head = object_head(url)
    return head is not None and head["size"] == entry["bytes"] and head["sha256"] == entry["sha256"] != ""


def upload_shards(src: str | Path, out: str, progress: bool = True) -> dict[str, int]:
    """Upload the shard folder `src` to the s3:// prefix `out`; returns counts of uploaded and kept shards."""
    src, out = Path(src), out.rstrip("/")
    if not out.startswith("s3://") or not out[len("s3://"):].partition("/")[0]:
        raise UploadError(f"{out}: expected s3://bucket/prefix (or s3://bucket)")
    manifest, entries = _local_shards(src)
    uploaded = kept = 0
    for entry in track(entries, len(entries), f"upload {src} -> {out}", "shards", enabled=progress):
        url = f"{out}/{entry['name']}"
        if _already_there(url, entry):
            kept += 1
            continue
        upload_file(src / entry["name"], url, metadata={"sha256": entry["sha256"]})
        uploaded += 1
    short = []
    for entry in entries:  # read back: what S3 holds now, not what the client meant to send
        head = object_head(f"{out}/{entry['name']}")
        if head is None or head["size"] != entry["bytes"]:
            short.append(f"{out}/{entry['name']}: {'missing' if head is None else str(head['size']) + ' bytes'}, "
                         f"expected {entry['bytes']}")
    if short:
        raise UploadError(f"{len(short)} uploaded shards do not match their files ({'; '.join(short[:3])}); the "
                          f"manifest was not uploaded: run the same command again", exitcodes.INTERNAL)
    upload_file(src / MANIFEST, f"{out}/{MANIFEST}")
    return {"uploaded": uploaded, "kept": kept, "samples": int(manifest.get("num_samples", 0))}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="a shard folder with manifest.json (make shards, demo-data)")
    parser.add_argument("--out", required=True, help="s3://bucket/prefix; endpoint and credentials from the "
                                                     "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")


def run(args: argparse.Namespace) -> int:
    try:
        counts = upload_shards(args.src, args.out)
    except UploadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except FetchError as exc:
        print(f"error: {exc}; shards already uploaded are kept: run the same command again for the rest",
              file=sys.stderr)
        return exitcodes.CONFIG if exc.permanent else exitcodes.INTERNAL
    print(f"{args.out}: {counts['uploaded']} shards uploaded, {counts['kept']} already there, sizes checked, "
          f"manifest uploaded ({counts['samples']} samples)", file=sys.stderr)
    return 0
