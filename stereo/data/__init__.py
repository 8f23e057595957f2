"""Stereo data: file codecs, public data-set sources, WebDataset shards (writer, stream, augmentation)."""
