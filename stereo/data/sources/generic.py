"""Users' own data: a list file with one `left right disparity [mask]` line per pair."""

from __future__ import annotations

from pathlib import Path

from stereo.data.sample import MaskFile, RawSample
from stereo.data.sources.common import SourceError, sample_key

LAYOUT = """ROOT is a text file; each line `left right disparity [mask]` (whitespace-separated, paths relative to the
list file's folder; blank lines and lines starting with # are skipped). Disparity: .pfm (float; inf, NaN and
<= 0, e.g. -1, = invalid), .png (uint16, disparity * 256, 0 = invalid, as KITTI) or .npy (float 2-D, invalid as
.pfm). Mask: PNG, non-zero = valid."""

CODECS = {".pfm": "pfm", ".png": "kitti.png", ".npy": "f32.npy"}


def list_samples(root: Path) -> list[RawSample]:
    if not root.is_file():
        raise SourceError(f"generic: {root} is not a list file\nexpected:\n{LAYOUT}")
    base = root.parent
    samples = []
    for number, line in enumerate(root.read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) not in (3, 4):
            raise SourceError(f"{root}:{number}: expected `left right disparity [mask]`, got {len(fields)} fields")
        left, right, disp = (base / f for f in fields[:3])
        codec = CODECS.get(disp.suffix.lower())
        if codec is None:
            raise SourceError(f"{root}:{number}: disparity {disp.name} must be .pfm, .png (x256) or .npy")
        masks = (MaskFile(str(base / fields[3]), "nonzero"),) if len(fields) == 4 else ()
        rel = left.relative_to(base) if left.is_relative_to(base) else Path(left.name)
        samples.append(RawSample(
            key=sample_key(rel.with_suffix("")),
            source="generic",
            left=str(left),
            right=str(right),
            target=str(disp),
            codec=codec,
            valid_masks=masks,
            negative_invalid=True,
        ))
    return samples
