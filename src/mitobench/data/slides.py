"""Crops centred on mitotic figures from a whole-slide image, at the training data's resolution.

AMi-Br's patches are 128 x 128 px crops of MIDOG21 and TUPAC16 slides scanned at 40x (0.23-0.26 um/px by
scanner), so a figure a fold model saw during training spans about 32 um. A slide at another resolution
is read from its closest finer pyramid level and resampled to ``target_mpp`` (area averaging when reducing),
so the figure has the size the model knows. Slides are read with ``tiffslide`` (SVS, generic tiled TIFF,
NDPI, ...), or ``openslide`` when it is installed and tiffslide cannot open the file.

Points come from a CSV (columns ``x, y`` in level-0 pixels, optional ``id`` and ``label``) or a GeoJSON
export (QuPath's: ``Point`` geometries, or polygons, whose centroid is taken; a classification named
``Atypical`` or ``Normal`` is read as the label).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mitobench.data.records import parse_label, read_csv
from mitobench.errors import MitobenchError

TRAINING_MPP = 0.25
"""Microns per pixel of the training patches (MIDOG21 / TUPAC16 at 40x)."""
MPP_TOLERANCE = 0.10
"""A slide within 10 % of ``target_mpp`` is cropped without resampling: the training data itself mixes
scanners from 0.23 to 0.26 um/px unresampled."""
MPP_RANGE = (0.05, 2.0)
"""Microns per pixel of any slide scan from 5x to 200x: a value outside is a wrong resolution tag (72 dpi
from a converter reads as 353 um/px), and cropping by it would give a flat colour or a gigapixel read."""
SLIDE_SUFFIXES = {".svs", ".ndpi", ".tif", ".tiff", ".scn", ".mrxs", ".vms", ".vmu", ".bif", ".svslide", ".qptiff"}
BACKGROUND = 255  # white, the colour of glass, where a crop reaches past the slide's edge


def read_points(path: str | Path) -> pd.DataFrame:
    """``id, x, y, label`` (level-0 pixels; label 1 atypical, 0 normal, NaN unknown) from a CSV or GeoJSON;
    a CSV with a ``slide`` column (points on several slides) also gives that, first."""
    path = Path(path)
    if not path.is_file():
        raise MitobenchError(f"{path}: no such points file. Give a CSV with columns x, y (level-0 pixels of each "
                             "mitotic figure's centre) or a GeoJSON of points (e.g. QuPath's export).")
    if path.suffix.lower() in {".geojson", ".json"}:
        points = _geojson_points(path)
    else:
        points = _csv_points(path)
    points["label"] = points["label"].astype("Int64")  # 1, 0 or empty, the same from either format
    bad = ~np.isfinite(points[["x", "y"]].to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise MitobenchError(f"{path}: point {points['id'].iloc[row]!r} has no finite x, y; every point needs both.")
    key = [c for c in ("slide", "id") if c in points]  # ids are per slide
    if points.duplicated(key).any():
        first = points[points.duplicated(key)].iloc[0]
        where = f" on slide {first['slide']!r}" if "slide" in points else ""
        raise MitobenchError(f"{path}: id {first['id']!r} is used twice{where}; give each point its own id.")
    return points.reset_index(drop=True)


def _csv_points(path: Path) -> pd.DataFrame:
    table = read_csv(path, ["x", "y"], dtype={"id": str, "slide": str}, rows="point")
    try:
        xy = table[["x", "y"]].astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise MitobenchError(f"{path}: columns x and y must be numbers (level-0 pixels) ({exc}).") from exc
    ids = _text_column(table, "id", path) if "id" in table else pd.Series([str(i + 1) for i in range(len(table))])
    labels = ([parse_label(v, f"{path} row {i + 2}") if not pd.isna(v) else np.nan
               for i, v in enumerate(table["label"])] if "label" in table else np.nan)
    points = pd.DataFrame({"id": ids.to_numpy(), "x": xy["x"].to_numpy(), "y": xy["y"].to_numpy(), "label": labels})
    if "slide" in table:  # one file for many slides: SOURCE is then their folder
        points.insert(0, "slide", _text_column(table, "slide", path).to_numpy())
    return points


def _text_column(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    blank = table[column].isna() | (table[column].str.strip() == "")
    if blank.any():
        raise MitobenchError(f"{path} row {int(np.flatnonzero(blank)[0]) + 2}: empty {column}; give every point "
                             f"one{', or leave out the id column to number them' if column == 'id' else ''}.")
    return table[column].str.strip()


def _geojson_points(path: Path) -> pd.DataFrame:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise MitobenchError(f"{path}: not a readable GeoJSON file ({exc}).") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        features = data  # QuPath also writes a bare list of features
    if not isinstance(features, list) or not features:
        raise MitobenchError(f"{path}: no features; expected a GeoJSON FeatureCollection of points.")
    rows = []
    for i, feature in enumerate(features):
        where = f"{path} feature {i + 1}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict):
            raise MitobenchError(f"{where}: no geometry; every feature must be a point or a polygon.")
        properties = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        classification = properties.get("classification")
        name = classification.get("name") if isinstance(classification, dict) else classification
        label = {"atypical": 1, "normal": 0}.get(str(name).strip().lower(), np.nan) if name else np.nan
        ident = next((str(v) for v in (feature.get("id"), properties.get("name")) if v is not None and str(v) != ""),
                     f"#{i + 1}")
        centres = _centres(geometry, where)
        for k, (x, y) in enumerate(centres, start=1):  # QuPath's Points tool: one MultiPoint per class
            rows.append({"id": ident if len(centres) == 1 else f"{ident}-{k}", "x": x, "y": y, "label": label})
    return pd.DataFrame(rows)


def _centres(geometry: dict, where: str) -> list[tuple[float, float]]:
    """A point's coordinates, each point of a MultiPoint, or a polygon's centroid (its outer ring's)."""
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    try:
        if kind == "Point":
            return [(float(coords[0]), float(coords[1]))]
        if kind == "MultiPoint":
            if not coords:
                raise ValueError("no points")
            return [(float(c[0]), float(c[1])) for c in coords]
        if kind == "Polygon":
            return [_ring_centroid(np.asarray(coords[0], dtype=np.float64))]
        if kind == "MultiPolygon":
            rings = [np.asarray(polygon[0], dtype=np.float64) for polygon in coords]
            areas = np.array([abs(_ring_area(r)) for r in rings])
            centres = np.array([_ring_centroid(r) for r in rings])
            centre = (centres * areas[:, None]).sum(axis=0) / areas.sum() if areas.sum() > 0 else centres.mean(axis=0)
            return [(float(centre[0]), float(centre[1]))]
    except (TypeError, IndexError, ValueError) as exc:
        raise MitobenchError(f"{where}: malformed {kind} coordinates ({exc}).") from exc
    raise MitobenchError(f"{where}: geometry {kind!r} is not a point or polygon; mark each figure with a point.")


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _ring_centroid(ring: np.ndarray) -> tuple[float, float]:
    area = _ring_area(ring)
    if abs(area) < 1e-9:  # a degenerate ring (a line or one repeated point): the mean of its vertices
        return float(ring[:, 0].mean()), float(ring[:, 1].mean())
    x, y = ring[:, 0], ring[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    return (float(((x + np.roll(x, -1)) * cross).sum() / (6 * area)),
            float(((y + np.roll(y, -1)) * cross).sum() / (6 * area)))


def open_slide(path: str | Path):
    """The slide, opened by tiffslide (or openslide, if installed, for what tiffslide cannot read)."""
    path = Path(path)
    if path.is_dir():
        raise MitobenchError(f"{path}: a folder, not a slide file. Give one slide (SVS, NDPI, tiled TIFF, ...) and "
                             "its figures with --points.")
    if not path.is_file():
        raise MitobenchError(f"{path}: no such slide file.")
    try:
        import tiffslide
    except ImportError as exc:
        raise MitobenchError("reading slides needs tiffslide: pip install 'mitobench[slides]' "
                             "(or pip install tiffslide).") from exc
    try:
        return _checked(tiffslide.TiffSlide(path))
    except Exception as exc:  # tifffile raises many types for files it cannot parse
        first = exc
    try:
        import openslide

        return _checked(openslide.OpenSlide(str(path)))
    except ImportError:
        pass
    except Exception:  # openslide.OpenSlideError and friends: report tiffslide's reason, the primary reader
        pass
    raise MitobenchError(f"{path}: cannot read this slide ({type(first).__name__}: {first}). tiffslide reads SVS, "
                         "NDPI and tiled TIFF; for other formats install openslide-python and openslide-bin.")


def _checked(slide):
    """The slide, once it has shown an image: a TIFF without pages opens, then fails at the first read."""
    try:
        width, height = slide.dimensions
        if not (width > 0 and height > 0 and slide.level_count > 0):
            raise ValueError(f"no image in it (dimensions {width} x {height})")
    except Exception:
        slide.close()  # the file handle too, whatever failed
        raise
    return slide


def slide_mpp(slide, path: str | Path, override: float | None = None) -> float:
    """Microns per level-0 pixel: ``override`` if given (with a warning where the file records another), else the
    slide's own metadata (x and y must agree)."""
    if override is not None:
        _check_mpp(override, "--slide-mpp", "give the slide's microns per pixel (0.25 for most 40x scans)")
        recorded = _recorded_mpp(slide)[0]
        if math.isfinite(recorded) and abs(recorded - override) > 0.01 * override:
            warnings.warn(f"{path}: the file records {recorded:g} um/px; --slide-mpp {override:g} overrides it.",
                          stacklevel=2)
        return float(override)
    values = _recorded_mpp(slide)
    if not all(v > 0 and math.isfinite(v) for v in values):
        raise MitobenchError(f"{path}: the slide does not record its resolution (microns per pixel). Give it with "
                             "--slide-mpp (e.g. 0.25 for most 40x scans, 0.5 for 20x).")
    if abs(values[0] - values[1]) > 0.01 * max(values):
        raise MitobenchError(f"{path}: the slide's pixels are not square (mpp-x {values[0]}, mpp-y {values[1]}); "
                             "mitobench crops square patches only.")
    _check_mpp(values[0], f"{path}: the resolution in the file,", "its resolution tags are wrong: give the slide's "
                                                                  "true microns per pixel with --slide-mpp")
    return values[0]


def _recorded_mpp(slide) -> list[float]:
    """The x and y microns per pixel the slide's file records (NaN where it records none)."""
    values = []
    for key in ("mpp-x", "mpp-y"):
        value = slide.properties.get(f"tiffslide.{key}", slide.properties.get(f"openslide.{key}"))
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(float("nan"))
    return values


def _check_mpp(value: float, what: str, advice: str) -> None:
    low, high = MPP_RANGE
    if not (math.isfinite(value) and low <= value <= high):
        raise MitobenchError(f"{what} {value:g} um/px, is not that of a slide scan ({low}-{high} um/px, 5x to 200x); "
                             f"{advice}.")


def crop_mpp(mpp: float, target_mpp: float = TRAINING_MPP, tolerance: float = MPP_TOLERANCE) -> float:
    """The microns per pixel of a crop from a slide at ``mpp``: the slide's own within ``tolerance`` of
    ``target_mpp``, else ``target_mpp``."""
    return mpp if abs(mpp / target_mpp - 1) <= tolerance else target_mpp


def crop_patches(slide, points: pd.DataFrame, mpp: float, path: str | Path, size: int = 128,
                 target_mpp: float = TRAINING_MPP, tolerance: float = MPP_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """``(patches, padded)``: one ``size`` x ``size`` RGB uint8 crop per point, centred on it, at ``target_mpp``;
    ``padded`` marks crops that reached past the slide's edge (filled with white there)."""
    _check_mpp(target_mpp, "--target-mpp", f"leave it out to crop at the training patches' {TRAINING_MPP} um/px")
    width, height = slide.dimensions
    outside = (points["x"] < 0) | (points["x"] >= width) | (points["y"] < 0) | (points["y"] >= height)
    if outside.any():
        row = points[outside].iloc[0]
        raise MitobenchError(f"{path}: point {row['id']!r} at ({row['x']}, {row['y']}) lies outside the slide "
                             f"({width} x {height} px at level 0); {int(outside.sum())} point(s) do. Are the "
                             "coordinates level-0 pixels of this slide?")
    scale = crop_mpp(mpp, target_mpp, tolerance) / mpp  # level-0 pixels per output pixel
    if scale < 1:
        warnings.warn(f"{path}: the slide ({mpp:g} um/px) is coarser than the crops ({target_mpp:g} um/px); they are "
                      "upsampled and blurrier than the training patches.", stacklevel=2)
    level = _finer_level(slide, scale)
    downsample = float(slide.level_downsamples[level])
    span0 = size * scale  # the crop's side in level-0 pixels
    side = max(1, round(span0 / downsample))  # and at the level read
    level_w, level_h = slide.level_dimensions[level]
    patches = np.empty((len(points), size, size, 3), dtype=np.uint8)
    padded = np.zeros(len(points), dtype=bool)
    for i, (x, y) in enumerate(zip(points["x"].to_numpy(), points["y"].to_numpy())):
        left, top = math.floor(x / downsample - side / 2 + 0.5), math.floor(y / downsample - side / 2 + 0.5)
        try:
            region, padded[i] = _read(slide, level, left, top, side, level_w, level_h, downsample)
        except Exception as exc:  # a corrupt tile: the codec's own error names neither the slide nor the point
            raise MitobenchError(f"{path}: cannot read the crop of point {points['id'].iloc[i]!r} at ({x}, {y}), "
                                 f"level {level} ({type(exc).__name__}: {exc}); the slide file is damaged there. "
                                 "Nothing was written.") from exc
        if side != size:
            filt = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
            region = region.resize((size, size), filt)
        patches[i] = np.asarray(region)
    return patches, padded


def _finer_level(slide, scale: float) -> int:
    """The coarsest pyramid level that is still at least as fine as the crop needs (never upsample a level)."""
    downsamples = [float(d) for d in slide.level_downsamples]
    fine_enough = [i for i, d in enumerate(downsamples) if d <= scale * 1.001]
    return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0


def _read(slide, level: int, left: int, top: int, side: int, level_w: int, level_h: int,
          downsample: float) -> tuple[Image.Image, bool]:
    """The ``side`` x ``side`` region at ``(left, top)`` of ``level`` as RGB, white where it leaves the slide."""
    x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + side, level_w), min(top + side, level_h)
    canvas = Image.new("RGB", (side, side), (BACKGROUND,) * 3)
    if x1 > x0 and y1 > y0:
        # read_region takes level-0 coordinates and divides them back by the (often not whole) downsample:
        # rounding up keeps int(location / downsample) == x0, where rounding to nearest may land one pixel short
        location = (math.ceil(x0 * downsample), math.ceil(y0 * downsample))
        region = slide.read_region(location, level, (x1 - x0, y1 - y0))
        if region.mode == "RGBA":  # openslide: transparent where nothing was scanned
            backdrop = Image.new("RGBA", region.size, (BACKGROUND,) * 3 + (255,))
            region = Image.alpha_composite(backdrop, region)
        canvas.paste(region.convert("RGB"), (x0 - left, y0 - top))
    return canvas, (x0, y0, x1, y1) != (left, top, left + side, top + side)
