"""Whole-slide crops: points from CSV or QuPath GeoJSON, crops centred and at the training resolution, bad input."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fixtures import make_slide, real_figures
from mitobench.data.slides import crop_patches, open_slide, read_points, slide_mpp
from mitobench.errors import MitobenchError

pytest.importorskip("tiffslide")


@pytest.fixture(scope="module")
def real_patches(real_data) -> np.ndarray:
    """Eight real AMi-Br figures (four atypical, four normal), 128 x 128 RGB."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in real_figures(real_data)])


def _points(centres) -> pd.DataFrame:
    return pd.DataFrame({"id": [str(i + 1) for i in range(len(centres))], "x": [c[0] for c in centres],
                         "y": [c[1] for c in centres], "label": np.nan})


def _crops(path, centres, override=None, **kwargs):
    slide = open_slide(path)
    try:
        return crop_patches(slide, _points(centres), slide_mpp(slide, path, override), path, **kwargs)
    finally:
        slide.close()


def test_crops_at_40x_are_the_patches_exactly(real_patches, tmp_path):
    centres = make_slide(tmp_path / "s.tif", real_patches, mpp=0.25, pyramid=False)
    patches, padded = _crops(tmp_path / "s.tif", centres)
    np.testing.assert_array_equal(patches, real_patches)
    assert not padded.any()


@pytest.mark.parametrize("pyramid", [True, False], ids=["from-the-pyramid-level", "resampled-from-level-0"])
def test_an_80x_slide_is_read_at_the_training_resolution(real_patches, tmp_path, pyramid):
    """Twice the resolution: the crop spans the same 32 um, from the 2x level or area-averaged from level 0."""
    centres = make_slide(tmp_path / "s.tif", real_patches, mpp=0.125, upscale=2, pyramid=pyramid)
    patches, _ = _crops(tmp_path / "s.tif", centres)
    np.testing.assert_array_equal(patches, real_patches)


def test_an_aperio_svs_with_jpeg_tiles(real_patches, tmp_path):
    """The commonest format: the resolution comes from the image description, the tiles are JPEG (lossy)."""
    centres = make_slide(tmp_path / "s.svs", real_patches, mpp=0.2520, aperio=True)
    slide = open_slide(tmp_path / "s.svs")
    try:
        assert slide_mpp(slide, tmp_path / "s.svs") == pytest.approx(0.252)
    finally:
        slide.close()
    patches, _ = _crops(tmp_path / "s.svs", centres)
    shifted, _ = _crops(tmp_path / "s.svs", [(x + 1, y) for x, y in centres])
    error = np.abs(patches.astype(int) - real_patches.astype(int)).mean(axis=(1, 2, 3))
    error_shifted = np.abs(shifted.astype(int) - real_patches.astype(int)).mean(axis=(1, 2, 3))
    assert (error < 5).all(), error  # JPEG at quality 90 with chroma subsampling: about 3-4.5 grey levels
    assert (error_shifted > 1.5 * error).all(), (error, error_shifted)  # in place, not one pixel off


def test_a_slide_within_the_scanners_spread_is_not_resampled(real_patches, tmp_path):
    centres = make_slide(tmp_path / "s.tif", real_patches, mpp=0.23, pyramid=False)  # MIDOG21's Hamamatsu
    patches, _ = _crops(tmp_path / "s.tif", centres)
    np.testing.assert_array_equal(patches, real_patches)


def test_a_20x_slide_is_upsampled_with_a_warning(real_patches, tmp_path):
    small = real_patches[:, ::2, ::2]
    centres = make_slide(tmp_path / "s.tif", np.ascontiguousarray(small), mpp=0.5, pyramid=False)
    with pytest.warns(UserWarning, match=r"coarser than the crops \(0.25 um/px\); they are upsampled"):
        patches, _ = _crops(tmp_path / "s.tif", centres)
    assert patches.shape == real_patches.shape
    # the upsampled crop is close to the original (what 20x loses is fine detail, not position)
    assert np.abs(patches.astype(int) - real_patches.astype(int)).mean() < 20


def test_missing_resolution_needs_slide_mpp(real_patches, tmp_path):
    centres = make_slide(tmp_path / "s.tif", real_patches[:2], mpp=None, pyramid=False)
    with pytest.raises(MitobenchError, match="does not record its resolution.*--slide-mpp"):
        _crops(tmp_path / "s.tif", centres)
    patches, _ = _crops(tmp_path / "s.tif", centres, override=0.25)
    np.testing.assert_array_equal(patches, real_patches[:2])
    with pytest.raises(MitobenchError, match="--slide-mpp -1 um/px, is not"):
        _crops(tmp_path / "s.tif", centres, override=-1.0)


def test_a_crop_past_the_edge_is_white_there_and_flagged(real_patches, tmp_path):
    centres = make_slide(tmp_path / "s.tif", real_patches[:1], mpp=0.25, columns=1, gap=0, pyramid=False)
    (x, y), = centres
    patches, padded = _crops(tmp_path / "s.tif", [(x, y), (x - 40, y)])
    assert padded.tolist() == [False, True]
    np.testing.assert_array_equal(patches[1][:, :40], 255)
    np.testing.assert_array_equal(patches[1][:, 40:], real_patches[0][:, :88])


def test_a_point_outside_the_slide_is_refused(real_patches, tmp_path):
    centres = make_slide(tmp_path / "s.tif", real_patches[:1], mpp=0.25, columns=1, pyramid=False)
    with pytest.raises(MitobenchError, match="point '2' at \\(5000.*outside the slide"):
        _crops(tmp_path / "s.tif", [centres[0], (5000, 10)])


def _open_files() -> set[str]:
    fds = Path("/proc/self/fd")
    return {os.path.realpath(fds / fd) for fd in os.listdir(fds)}


def test_an_unreadable_slide_names_the_file(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(MitobenchError, match="broken.svs: cannot read this slide"):
        open_slide(bad)
    if Path("/proc/self/fd").is_dir():  # the file is closed now, not when the traceback is collected
        assert str(bad) not in _open_files()
    with pytest.raises(MitobenchError, match="no such slide file"):
        open_slide(tmp_path / "absent.svs")


def test_points_from_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,x,y,label\na,10,20.5,Atypical\nb,30,40,normal\nc,5,6,\n")
    points = read_points(path)
    assert points["id"].tolist() == ["a", "b", "c"]
    assert points[["x", "y"]].to_numpy().tolist() == [[10, 20.5], [30, 40], [5, 6]]
    assert points["label"].iloc[:2].tolist() == [1, 0] and pd.isna(points["label"].iloc[2])
    (tmp_path / "q.csv").write_text("x,y\n1,2\n3,4\n")
    assert read_points(tmp_path / "q.csv")["id"].tolist() == ["1", "2"]


def test_points_from_qupath_geojson(tmp_path):
    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    collection = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "f1", "geometry": {"type": "Point", "coordinates": [100.5, 200]},
         "properties": {"objectType": "annotation", "classification": {"name": "Atypical"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {"name": "cell7", "classification": {"name": "Mitosis"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},
         "properties": {"classification": {"name": "Normal"}}}]}
    (tmp_path / "a.geojson").write_text(json.dumps(collection))
    points = read_points(tmp_path / "a.geojson")
    assert points["id"].tolist() == ["f1", "cell7", "#3"]
    assert points[["x", "y"]].to_numpy().tolist() == [[100.5, 200], [5, 5], [1, 2]]
    assert points["label"].iloc[0] == 1 and pd.isna(points["label"].iloc[1]) and points["label"].iloc[2] == 0
    (tmp_path / "list.json").write_text(json.dumps(collection["features"]))  # QuPath's bare list of features
    pd.testing.assert_frame_equal(read_points(tmp_path / "list.json"), points)


@pytest.mark.parametrize("name, content, message", [
    ("p.csv", "id,x\na,1\n", "missing column\\(s\\) \\['y'\\]"),
    ("p.csv", "x,y\n1,abc\n", "x and y must be numbers"),
    ("p.csv", "id,x,y\na,1,2\na,3,4\n", "id 'a' is used twice"),
    ("p.csv", "x,y\n1,\n", "has no finite x, y"),
    ("p.csv", "x,y,label\n1,2,mitosis\n", "row 2"),
    ("p.geojson", "{not json", "not a readable GeoJSON"),
    ("p.geojson", '{"type": "FeatureCollection", "features": []}', "no features"),
    ("p.geojson", '[{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}}]',
     "'LineString' is not a point or polygon"),
    ("p.geojson", '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": []}}]', "malformed Point"),
    ("p.geojson", '[{"type": "Feature", "properties": {}}]', "no geometry"),
])
def test_bad_points_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MitobenchError, match=message):
        read_points(path)


def test_a_missing_points_file(tmp_path):
    with pytest.raises(MitobenchError, match="no such points file"):
        read_points(tmp_path / "absent.csv")


def test_points_do_not_warn_on_unlabelled_input(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("x,y\n1,2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_points(path)


def test_qupath_points_tool_ids_and_encodings(tmp_path):
    """QuPath's Points tool exports one MultiPoint per class; id 0 is an id; a BOM and a bare class name are read."""
    features = [
        {"type": "Feature", "id": 0, "geometry": {"type": "Point", "coordinates": [5, 5]}, "properties": {}},
        {"type": "Feature", "id": "pts", "geometry": {"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]},
         "properties": {"classification": {"name": "Atypical", "colorRGB": -3670016}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 8]},
         "properties": {"classification": "Normal"}}]
    path = tmp_path / "points.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"type": "FeatureCollection", "features": features}).encode())
    points = read_points(path)
    assert points["id"].tolist() == ["0", "pts-1", "pts-2", "#3"]
    assert points[["x", "y"]].to_numpy().tolist() == [[5, 5], [1, 2], [3, 4], [7, 8]]
    assert pd.isna(points["label"].iloc[0]) and points["label"].iloc[1:].tolist() == [1, 1, 0]


def test_csv_ids_are_text_and_never_blank(tmp_path):
    (tmp_path / "p.csv").write_text("id,x,y\n007,1,2\n8,3,4\n")
    assert read_points(tmp_path / "p.csv")["id"].tolist() == ["007", "8"]
    (tmp_path / "q.csv").write_text("id,x,y\n1,1,2\n,3,4\n")
    with pytest.raises(MitobenchError, match="q.csv row 3: empty id"):
        read_points(tmp_path / "q.csv")
    (tmp_path / "r.csv").write_text("id,x,y\n")
    with pytest.raises(MitobenchError, match="list at least one point"):
        read_points(tmp_path / "r.csv")


@pytest.mark.parametrize("mpp, override, message", [
    (1e4 / 72 * 2.54, None, "352.778 um/px, is not that of a slide scan.*--slide-mpp"),  # a 72-dpi converter tag
    (0.25, 0.001, "--slide-mpp 0.001 um/px, is not that of a slide scan"),
])
def test_an_impossible_resolution_is_refused(real_patches, tmp_path, mpp, override, message):
    centres = make_slide(tmp_path / "s.tif", real_patches[:1], mpp=mpp, pyramid=False)
    with pytest.raises(MitobenchError, match=message):
        _crops(tmp_path / "s.tif", centres, override=override)
    with pytest.raises(MitobenchError, match="--target-mpp 50"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # --slide-mpp over the 72-dpi tag: warned, tested elsewhere
        _crops(tmp_path / "s.tif", centres, override=0.25, target_mpp=50.0)


def test_a_level_with_an_uneven_downsample_is_read_where_the_point_is(tmp_path):
    """Scanners' levels are not whole factors (2001 px -> 500: 4.002); the crop must still be centred."""
    import tifffile

    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (2001, 2001, 3), dtype=np.uint8)
    small = np.asarray(Image.fromarray(full).resize((500, 500), Image.Resampling.BOX))
    with tifffile.TiffWriter(tmp_path / "s.tif") as tiff:
        tiff.write(full, tile=(256, 256), photometric="rgb", resolution=(1e4 / 0.0625,) * 2,
                   resolutionunit="CENTIMETER", subifds=1)
        tiff.write(small, tile=(256, 256), photometric="rgb", subfiletype=1)
    centres = [(1000.0, 1000.0), (1001.0, 601.0), (1500.0, 1500.0)]  # 0.0625 um/px: the crop is read from level 1
    patches, _ = _crops(tmp_path / "s.tif", centres)
    for (x, y), patch in zip(centres, patches):
        cx, cy = int(x / 4.002 + 0.5), int(y / 4.002 + 0.5)
        np.testing.assert_array_equal(patch[64, 64], small[cy, cx])


def test_a_damaged_tile_names_the_slide_and_the_point(real_patches, tmp_path):
    import tifffile

    centres = make_slide(tmp_path / "s.tif", real_patches[:1], mpp=0.25, columns=1, gap=0, pyramid=False)
    with tifffile.TiffFile(tmp_path / "s.tif") as tiff:
        offset = tiff.pages[0].dataoffsets[0]
    data = bytearray((tmp_path / "s.tif").read_bytes())
    data[offset:offset + 64] = b"\xff" * 64  # the first tile's compressed stream
    (tmp_path / "s.tif").write_bytes(bytes(data))
    with pytest.raises(MitobenchError, match="s.tif: cannot read the crop of point '1'.*damaged"):
        _crops(tmp_path / "s.tif", centres)


def test_a_folder_is_not_a_slide(tmp_path):
    with pytest.raises(MitobenchError, match="a folder, not a slide file"):
        open_slide(tmp_path)


def test_a_slide_given_as_a_patch_is_refused_before_decoding(tmp_path):
    """A folder of slides predicted as patches: each is refused by its size alone, pointing at --points."""
    import tifffile

    from mitobench.data.images import decode_patch

    tifffile.imwrite(tmp_path / "slide.tif", np.full((6000, 5000, 3), 240, dtype=np.uint8), tile=(256, 256),
                     photometric="rgb", compression="zlib")
    with pytest.raises(MitobenchError, match="slide.tif: image is 5000x6000 px but patches must be 128x128.*--points"):
        decode_patch(tmp_path / "slide.tif")
    from PIL import Image as PILImage

    before = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 1_000_000  # as a 100k x 100k slide is to the default limit
    try:
        with pytest.raises(MitobenchError, match="slide.tif: far too large for a patch.*--points"):
            decode_patch(tmp_path / "slide.tif")
    finally:
        PILImage.MAX_IMAGE_PIXELS = before
