"""Each source on a tiny fake tree in its data set's exact layout: what it lists and what load_raw decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fakedata import MAKERS, make_kitti15, make_sceneflow, make_sintel, make_vkitti2
from stereo.data.codecs import read_image
from stereo.data.sources import SOURCES, SourceError, load_raw

# data set -> number of samples its fake tree holds with the default options
EXPECTED_COUNT = {
    "sceneflow": 4, "fsd": 3, "kitti12": 3, "kitti15": 3, "middlebury2014": 2, "middeval3": 2, "eth3d": 2,
    "sintel": 3, "crestereo": 3, "fallingthings": 3, "instereo2k": 3, "vkitti2": 3, "generic": 3,
}
# finest step each encoding stores disparity with (plus float32 rounding)
TOLERANCE = {"fsd": 1e-3, "fallingthings": 1e-3, "vkitti2": 1e-3}


def test_registry_names_every_data_set():
    assert sorted(SOURCES) == sorted(EXPECTED_COUNT) == sorted(MAKERS)


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNT))
def test_source_lists_and_decodes_its_layout(name: str, tmp_path: Path):
    fake = MAKERS[name](tmp_path)
    samples = SOURCES[name].list_samples(fake.root)
    assert len(samples) == EXPECTED_COUNT[name]
    assert len({s.key for s in samples}) == len(samples)
    expected = fake.by_left()
    for raw in samples:
        assert raw.source == name and "." not in Path(raw.key).name
        truth = expected[raw.left]
        sample = load_raw(raw)
        assert sample["key"] == raw.key
        assert sample["left"].shape == sample["right"].shape == truth.disp.shape + (3,)
        assert sample["left"].dtype == np.uint8
        if truth.left_rgb is not None:
            np.testing.assert_array_equal(sample["left"], truth.left_rgb)
        else:
            np.testing.assert_array_equal(sample["left"], read_image(raw.left))
        np.testing.assert_array_equal(sample["valid"], truth.disp > 0)
        np.testing.assert_allclose(sample["disp"], truth.disp, rtol=1e-5, atol=TOLERANCE.get(name, 1e-5))
        assert sample["disp"].dtype == np.float32
        if truth.nocc is None:
            assert sample["nocc"] is None
        else:
            np.testing.assert_array_equal(sample["nocc"], truth.nocc)


def test_sceneflow_options(tmp_path: Path):
    make_sceneflow(tmp_path)
    source = SOURCES["sceneflow"]
    test = source.list_samples(tmp_path, split="test")
    assert [s.key for s in test] == ["FlyingThings3D/clean/TEST/A/0000/0006"]
    both = source.list_samples(tmp_path, passes="both")
    assert len(both) == 8 and {s.key.split("/")[1] for s in both} == {"clean", "final"}
    monkaa = source.list_samples(tmp_path, subsets="monkaa", passes="final")
    assert [s.key for s in monkaa] == ["Monkaa/final/a_rain_of_stones_x2/0000"]
    sample = load_raw(monkaa[0])
    np.testing.assert_allclose(sample["disp_right"], sample["disp"] + 1)  # the right view's own PFM


def test_sintel_final_pass_and_kitti_keys(tmp_path: Path):
    make_sintel(tmp_path / "sintel")
    final = SOURCES["sintel"].list_samples(tmp_path / "sintel" / "training", passes="final")
    assert [s.key for s in final] == ["final/alley_1/frame_0001", "final/alley_1/frame_0002",
                                      "final/bamboo_2/frame_0001"]
    make_kitti15(tmp_path / "kitti")
    assert [s.key for s in SOURCES["kitti15"].list_samples(tmp_path / "kitti")] == \
        ["000000_10", "000001_10", "000002_10"]


def test_depth_sets_record_intrinsics(tmp_path: Path):
    make_vkitti2(tmp_path)
    samples = SOURCES["vkitti2"].list_samples(tmp_path, variants="clone,fog")
    assert [s.key for s in samples] == ["Scene01/clone/00000", "Scene01/fog/00000"]
    sample = load_raw(samples[0])
    assert sample["meta"]["focal"] == 725.0087 and sample["meta"]["baseline"] == 0.532725
    assert not sample["valid"][:2].any()  # 65535 cm = sky


def test_missing_path_and_empty_tree_name_path_and_layout(tmp_path: Path):
    with pytest.raises(SourceError, match=r"kitti15: .*nowhere does not exist; expected layout:\n.*image_2"):
        SOURCES["kitti15"].list_samples(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"fsd: no samples found under .*empty.*\n.*left/rgb/NNNN\.jpg"):
        SOURCES["fsd"].list_samples(tmp_path / "empty")
    with pytest.raises(SourceError, match="unknown option"):
        SOURCES["kitti15"].list_samples(tmp_path, split="test")
    with pytest.raises(SourceError, match="passes='dirty'"):
        SOURCES["sintel"].list_samples(tmp_path, passes="dirty")


def test_generic_list_file_errors_name_the_line(tmp_path: Path):
    listing = tmp_path / "list.txt"
    listing.write_text("a.png b.png\n")
    with pytest.raises(SourceError, match=r"list\.txt:1: expected `left right disparity \[mask\]`"):
        SOURCES["generic"].list_samples(listing)
    listing.write_text("a.png b.png c.exr\n")
    with pytest.raises(SourceError, match=r"list\.txt:1: disparity c\.exr must be"):
        SOURCES["generic"].list_samples(listing)
