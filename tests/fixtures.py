"""Synthetic fixtures in the exact on-disk formats of every dataset mitobench reads.

Every image is a tiny solid-colour PNG; colours are distinct per image unless the caller asks
otherwise, so exact-duplicate checks only find the duplicates a test plants on purpose.
Column formats copy the public files (``../shared/data``):

- ``amibr_train_split.csv``: ``Unnamed: 0,slide,dataset,uid,final_label,dataset_uid,x,y,expert1_label,
  expert2_label,expert1_atypical,expert2_atypical,expert3_atypical,majority_atypical``
- ``AMI-BR.csv``: an unnamed index column, then ``slide,dataset,uid,x,y,expert1_label,expert2_label,
  expert1_atypical,expert2_atypical,expert3_atypical,majority_atypical``
- ``AtNorM-MD_expert_votes.csv``: ``Filename,Expert_1,...,Expert_5,Majority``
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

AMIBR_TRAIN_HEADER = ["Unnamed: 0", "slide", "dataset", "uid", "final_label", "dataset_uid", "x", "y",
                      "expert1_label", "expert2_label", "expert1_atypical", "expert2_atypical",
                      "expert3_atypical", "majority_atypical"]
AMIBR_LABEL_HEADER = ["", "slide", "dataset", "uid", "x", "y", "expert1_label", "expert2_label",
                      "expert1_atypical", "expert2_atypical", "expert3_atypical", "majority_atypical"]
ATNORM_MD_HEADER = ["Filename", "Expert_1", "Expert_2", "Expert_3", "Expert_4", "Expert_5", "Majority"]


def color(i: int) -> tuple[int, int, int]:
    """A distinct RGB colour for every ``0 <= i < 2**24`` (spread out, so neighbours differ visibly)."""
    v = (i * 2654435761 + 12345) % (1 << 24)  # a bijection of 0..2**24-1
    return (v >> 16) & 255, (v >> 8) & 255, v & 255


def make_png(path: str | Path, rgb: tuple[int, int, int] | None = None, size: int | tuple[int, int] = 128,
             mode: str = "RGB") -> Path:
    """Write a solid-colour PNG; ``rgb`` defaults to a colour derived from the path.

    ``mode`` may be any PIL mode PNG can store (``RGB``, ``L``, ``RGBA``, ``P``, ``LA``); ``size`` an int or
    ``(width, height)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rgb is None:
        rgb = color(zlib.crc32(str(path).encode()))
    width, height = (size, size) if isinstance(size, int) else size
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[...] = rgb
    img = Image.fromarray(array, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format="PNG")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


@dataclass
class AmiBrFixture:
    root: Path
    train: list[dict] = field(default_factory=list)  # rows of the train CSV, in file order
    test: list[dict] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        return len(self.train)

    @property
    def n_test(self) -> int:
        return len(self.test)

    @property
    def n_total(self) -> int:
        return len(self.train) + len(self.test)


def _amibr_rows(n_slides: int, per_slide: int, start_slide: int, start_uid: int) -> list[dict]:
    rows = []
    uid = start_uid
    for s in range(n_slides):
        slide_no = start_slide + s
        midog = slide_no % 2 == 0
        dataset = "MIDOG21" if midog else "TUPAC16"
        slide = f"{slide_no:03d}.tiff" if midog else f"{slide_no:02d}_stitched1.tif"
        n_atypical = 1 + (slide_no % 2)  # 1 or 2 atypical per slide: every fold gets positives
        for k in range(per_slide):
            atypical = k < n_atypical
            # experts: one 2-of-3 vote per slide on each side, the rest unanimous
            if atypical:
                votes = (True, False, True) if k == 0 else (True, True, True)
            else:
                votes = (False, True, False) if k == per_slide - 1 else (False, False, False)
            rows.append({
                "slide": slide, "dataset": dataset, "uid": uid,
                "final_label": "Atypical" if atypical else "Normal",
                "dataset_uid": f"{dataset}_{uid}.png",
                "x": 100 + 7 * uid, "y": 200 + 3 * uid,
                "expert1_label": ("AMF segregation" if votes[0] else "NMF metaphase"),
                "expert2_label": ("AMF other" if votes[1] else "NMF prometaphase"),
                "votes": votes, "atypical": atypical,
            })
            uid += 1
    return rows


def make_amibr(root: str | Path, n_train_slides: int = 10, n_test_slides: int = 3, per_slide: int = 5,
               labels_csv: bool = True) -> AmiBrFixture:
    """AMi-Br in the public layout: ``AMi-Br/{Atypical,Normal}/<dataset>_<uid>.png``,
    ``amibr_train_split.csv`` and (``labels_csv``) ``AMI-BR.csv``.

    Defaults give 10 train slides x 5 = 50 train images (15 atypical) and 3 test slides x 5 = 15 test
    images, alternating MIDOG21 / TUPAC16 slides, enough for ``StratifiedGroupKFold(5)``.
    The train CSV lists its rows in a shuffled (seeded) order: the loader must keep file order.
    """
    root = Path(root)
    train = _amibr_rows(n_train_slides, per_slide, start_slide=1, start_uid=1)
    test = _amibr_rows(n_test_slides, per_slide, start_slide=1 + n_train_slides, start_uid=1 + len(train))
    # shuffle train rows deterministically so "file order" differs from sorted order
    order = np.random.default_rng(0).permutation(len(train))
    train = [train[i] for i in order]
    for i, row in enumerate(train + test):
        cls = "Atypical" if row["atypical"] else "Normal"
        make_png(root / "AMi-Br" / cls / row["dataset_uid"], rgb=color(1000 + row["uid"]))

    def tf(v: bool) -> str:
        return "True" if v else "False"

    # AMI-BR.csv lists every image in slide/uid order, index = position
    everything = sorted(train + test, key=lambda r: r["uid"])
    index_of = {r["uid"]: i for i, r in enumerate(everything)}
    write_csv(root / "amibr_train_split.csv", AMIBR_TRAIN_HEADER, [
        [index_of[r["uid"]], r["slide"], r["dataset"], r["uid"], r["final_label"], r["dataset_uid"], r["x"], r["y"],
         r["expert1_label"], r["expert2_label"], *map(tf, r["votes"]), tf(r["atypical"])]
        for r in train])
    if labels_csv:
        write_csv(root / "AMI-BR.csv", AMIBR_LABEL_HEADER, [
            [i, r["slide"], r["dataset"], r["uid"], r["x"], r["y"], r["expert1_label"], r["expert2_label"],
             *map(tf, r["votes"]), tf(r["atypical"])]
            for i, r in enumerate(everything)])
    return AmiBrFixture(root=root, train=train, test=test)


def make_class_folders(folder: str | Path, n_atypical: int, n_normal: int, start: int = 1,
                       color_offset: int = 0) -> dict[str, int]:
    """``folder/Atypical/<n>.png`` and ``folder/Normal/<n>.png`` with numeric names; returns name -> label."""
    folder = Path(folder)
    out = {}
    n = start
    for cls, count, label in (("Atypical", n_atypical, 1), ("Normal", n_normal, 0)):
        for _ in range(count):
            make_png(folder / cls / f"{n}.png", rgb=color(color_offset + n))
            out[f"{cls}/{n}.png"] = label
            n += 1
    return out


def make_atnorm_br(root: str | Path, n_atypical: int = 4, n_normal: int = 8,
                   duplicates: bool = False) -> dict[str, int]:
    """AtNorM-Br: ``AtNorM-Br/{Atypical,Normal}/<n>.png``. Returns image id (``Class/name``) -> label.

    ``duplicates`` plants the defects of the public set in miniature: ``Normal/90.png`` is a byte copy of
    ``Normal/<first normal>`` (same label), and ``Normal/91.png`` + ``Normal/92.png`` are copies of
    ``Atypical/1.png`` (conflicting labels).
    """
    root = Path(root)
    folder = root / "AtNorM-Br"
    out = make_class_folders(folder, n_atypical, n_normal, start=1, color_offset=50_000)
    if duplicates:
        first_normal = folder / "Normal" / f"{n_atypical + 1}.png"
        (folder / "Normal" / "90.png").write_bytes(first_normal.read_bytes())
        out["Normal/90.png"] = 0
        for n in (91, 92):
            (folder / "Normal" / f"{n}.png").write_bytes((folder / "Atypical" / "1.png").read_bytes())
            out[f"Normal/{n}.png"] = 0
    return out


def make_atnorm_md(root: str | Path, n_atypical: int = 3, n_normal: int = 6,
                   votes_csv: bool = True) -> dict[str, float]:
    """AtNorM-MD: ``AtNorM-MD/{Atypical,Normal}/<n>.png`` plus ``AtNorM-MD_expert_votes.csv``.

    Votes per file (5 experts; ``Majority`` = 3-of-5, agreeing with the folder): atypical files get
    5, 4, 3, 5, ... atypical votes; normal files get 0, 1, 2, 0, ... Returns file name -> fraction of
    experts voting atypical.
    """
    root = Path(root)
    labels = make_class_folders(root / "AtNorM-MD", n_atypical, n_normal, start=1, color_offset=90_000)
    rows, fractions = [], {}
    for i, (image, label) in enumerate(labels.items()):
        name = image.split("/")[1]
        k = (5, 4, 3)[i % 3] if label else (0, 1, 2)[i % 3]
        experts = ["Atypical"] * k + ["Normal"] * (5 - k)
        # rotate so the atypical votes are not always the first experts
        experts = experts[i % 5:] + experts[:i % 5]
        rows.append([name, *experts, "Atypical" if label else "Normal"])
        fractions[name] = k / 5
    if votes_csv:
        write_csv(root / "AtNorM-MD_expert_votes.csv", ATNORM_MD_HEADER, rows)
    return fractions


def make_custom_csv(root: str | Path, n_atypical: int = 3, n_normal: int = 5, with_group: bool = True,
                    with_domain: bool = True, name: str = "mydata.csv") -> Path:
    """The user's own data as a CSV ``path,label[,group,domain]`` with paths relative to the CSV."""
    root = Path(root)
    rows = []
    for i in range(n_atypical + n_normal):
        label = "Atypical" if i < n_atypical else "Normal"
        rel = f"images/img_{i:03d}.png"
        make_png(root / rel, rgb=color(200_000 + i))
        row = [rel, label]
        if with_group:
            row.append(f"slide{i % 3}")
        if with_domain:
            row.append("scannerA" if i % 2 else "scannerB")
        rows.append(row)
    header = ["path", "label"] + (["group"] if with_group else []) + (["domain"] if with_domain else [])
    return write_csv(root / name, header, rows)


def make_custom_folder(root: str | Path, n_atypical: int = 2, n_normal: int = 3) -> Path:
    """The user's own data as a folder of ``Atypical``/``Normal`` sub-folders."""
    root = Path(root)
    make_class_folders(root, n_atypical, n_normal, start=1, color_offset=300_000)
    return root


def make_data_root(root: str | Path, atnorm_md: bool = True, duplicates: bool = False) -> Path:
    """A complete data root: AMi-Br, AtNorM-Br and (optionally) AtNorM-MD side by side."""
    root = Path(root)
    make_amibr(root)
    make_atnorm_br(root, duplicates=duplicates)
    if atnorm_md:
        make_atnorm_md(root)
    return root


def make_slide(path: str | Path, patches: np.ndarray, mpp: float | None = 0.25, upscale: int = 1,
               pyramid: bool = True, columns: int = 4, gap: int = 40, aperio: bool = False) -> list[tuple[float, float]]:
    """A tiled TIFF whole-slide image holding ``patches`` (N x 128 x 128 x 3) in a grid on white, each
    nearest-upscaled by ``upscale``; returns each patch's centre in level-0 pixels.

    ``mpp``: microns per level-0 pixel written in the resolution tags (None: none written). ``pyramid``: also
    a level at every factor 2 down to the original patch size, as a scanner writes them. ``aperio``: an SVS as
    Aperio scanners write it (JPEG tiles, the resolution in the image description, not in tags)."""
    import tifffile

    size = patches.shape[1]
    rows = -(-len(patches) // columns)
    canvas = np.full((gap + rows * (size + gap), gap + columns * (size + gap), 3), 255, dtype=np.uint8)
    centres = []
    for i, patch in enumerate(patches):
        top, left = gap + (i // columns) * (size + gap), gap + (i % columns) * (size + gap)
        canvas[top:top + size, left:left + size] = patch
        centres.append(((left + size // 2) * upscale, (top + size // 2) * upscale))
    full = canvas.repeat(upscale, axis=0).repeat(upscale, axis=1)
    levels = [full]
    factor = 2
    while pyramid and factor <= upscale:
        levels.append(full[::factor, ::factor])
        factor *= 2
    if aperio:
        height, width = full.shape[:2]
        description = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) "
                       f"JPEG/RGB Q=90|AppMag = 40|MPP = {mpp:.4f}|ScanScope ID = SS1234")
        tifffile.imwrite(path, full, tile=(256, 256), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                         description=description)
        return centres
    extra = {} if mpp is None else {"resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tiff:
        for k, level in enumerate(levels):
            res = {} if mpp is None else {"resolution": (1e4 / (mpp * 2 ** k),) * 2}
            tiff.write(level, tile=(128, 128), photometric="rgb", compression="zlib",
                       subfiletype=1 if k else 0, subifds=len(levels) - 1 if k == 0 and len(levels) > 1 else None,
                       **res, **extra)
    return centres


def real_figures(real_data: Path, per_class: int = 4) -> list[Path]:
    """The first ``per_class`` atypical then normal AMi-Br PNGs of the real data (sorted by name)."""
    return [p for cls in ("Atypical", "Normal") for p in sorted((real_data / "AMi-Br" / cls).glob("*.png"))[:per_class]]
