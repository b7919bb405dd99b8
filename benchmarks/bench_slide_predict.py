"""How fast figures are cropped from a whole-slide image (and, with --run, classified), for `mitobench predict
RUN SLIDE --points P`.

The slide: an Aperio-style SVS (JPEG tiles at quality 90, 256 px, 0.25 um/px) of --size x --size px tiled with real
AMi-Br patches, so every tile decodes like tissue does; --points figures at random places. Prints crops/s (and
figures/s of the whole predict with --run) and appends them to RESULTS.md.

    .venv/bin/python benchmarks/bench_slide_predict.py [--size 8192] [--points 2000] [--run runs/<run>]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results  # noqa: E402


def build_slide(path: Path, data: Path, size: int, mpp: float = 0.25) -> None:
    import tifffile

    files = sorted((data / "AMi-Br" / "Normal").glob("*.png"))[:256]
    patches = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    rng = np.random.default_rng(0)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    for top in range(0, size, 128):
        for left in range(0, size, 128):
            canvas[top:top + 128, left:left + 128] = patches[rng.integers(len(patches))][:size - top, :size - left]
    description = (f"Aperio Image Library v12.0.15 \r\n{size}x{size} [0,0 {size}x{size}] (256x256) JPEG/RGB Q=90"
                   f"|AppMag = 40|MPP = {mpp:.4f}")
    tifffile.imwrite(path, canvas, tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, description=description)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side in px")
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--run", default=None, help="a complete run folder: also time the whole predict")
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()

    from mitobench.data.slides import crop_patches, open_slide, slide_mpp

    with tempfile.TemporaryDirectory() as tmp:
        slide_path, points_path = Path(tmp) / "bench.svs", Path(tmp) / "points.csv"
        t0 = time.perf_counter()
        build_slide(slide_path, Path(args.data), args.size)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        points = pd.DataFrame({"id": [str(i + 1) for i in range(args.points)],
                               "x": rng.uniform(0, args.size, args.points), "y": rng.uniform(0, args.size, args.points),
                               "label": pd.array([pd.NA] * args.points, dtype="Int64")})
        points.drop(columns="label").to_csv(points_path, index=False)
        lines = [f"- slide: {args.size} x {args.size} px Aperio-style SVS (JPEG q90, 256-px tiles, 0.25 um/px), "
                 f"built in {build_s:.1f} s; {args.points} figures at random places"]
        rows = []
        for label, target in (("crop at 40x (as stored)", 0.25), ("crop at 0.5 um/px (area-averaged 2x)", 0.5)):
            slide = open_slide(slide_path)
            try:
                t0 = time.perf_counter()
                crops, _ = crop_patches(slide, points, slide_mpp(slide, slide_path), slide_path, 128, target)
                seconds = time.perf_counter() - t0
            finally:
                slide.close()
            assert crops.shape == (args.points, 128, 128, 3)
            rows.append(f"| {label} | {seconds:.2f} | {args.points / seconds:.0f} |")
            print(f"{label}: {seconds:.2f} s, {args.points / seconds:.0f} crops/s")
        lines += ["", "| step | seconds | figures/s |", "|---|---|---|", *rows]
        if args.run:
            from mitobench.predict import predict_slide

            t0 = time.perf_counter()
            path, table = predict_slide(args.run, slide_path, points_path, Path(tmp) / "out.csv")
            seconds = time.perf_counter() - t0
            print(f"whole predict ({args.run}): {seconds:.1f} s, {len(table) / seconds:.1f} figures/s")
            lines.append(f"| whole `predict_slide` with `{args.run}` (5 fold models, crops + classification) | "
                         f"{seconds:.1f} | {len(table) / seconds:.1f} |")
    if not args.no_append:
        append_results("## Slide prediction: crop and predict speed", "\n".join(lines))


if __name__ == "__main__":
    main()
