"""Every data source becomes the same record table.

Columns (``RECORD_COLUMNS``): ``image`` (id unique within its set), ``path`` (absolute), ``label``
(1 = atypical, 0 = normal), ``dataset`` (AMi-Br, AtNorM-Br, AtNorM-MD or the user's name), ``split``
(``train`` for the AMi-Br training split, else ``test``), ``group`` (slide, where published),
``domain`` (MIDOG21 / TUPAC16 / TCGA / MIDOG++ / user), ``p_atypical_votes`` (fraction of
experts voting atypical, where published), ``n_experts`` (how many voted) and ``expert_votes`` (each expert's call
in a fixed expert order, ``1`` atypical, ``0`` normal: ``101`` for AMi-Br's three; where published).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from platformdirs import user_cache_dir

from mitobench.errors import MitobenchError

RECORD_COLUMNS = ["image", "path", "label", "dataset", "split", "group", "domain", "p_atypical_votes", "n_experts",
                  "expert_votes"]
LABELS = {"atypical": 1, "normal": 0}
CLASS_DIRS = ("Atypical", "Normal")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: Hold-out sets in report order; the AMi-Br test split is the complement of the train CSV.
HOLDOUT_SETS = ("AMi-Br-test", "AtNorM-Br", "AtNorM-MD")

AMIBR_TRAIN_CSV = "amibr_train_split.csv"
AMIBR_LABEL_CSV = "AMI-BR.csv"
ATNORM_MD_VOTES_CSV = "AtNorM-MD_expert_votes.csv"


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """``--data-root``, else ``$MITOBENCH_DATA``, else a per-user cache folder."""
    if data_root:
        return Path(data_root).expanduser().resolve()
    if os.environ.get("MITOBENCH_DATA"):
        return Path(os.environ["MITOBENCH_DATA"]).expanduser().resolve()
    return Path(user_cache_dir("mitobench")) / "data"


def parse_label(value: object, where: str) -> int:
    """Map ``Atypical``/``Normal`` (any case) to 1/0; anything else is an error naming ``where``."""
    key = "" if pd.isna(value) else str(value).strip().lower()
    if key not in LABELS:
        problem = "the label is empty" if not key else f"label {value!r} is neither 'Atypical' nor 'Normal'"
        raise MitobenchError(f"{where}: {problem}. Fix the label (atypical mitotic figure = 'Atypical', "
                             "normal = 'Normal').")
    return LABELS[key]


def read_csv(path: Path, required: list[str], dtype: dict | None = None, rows: str = "image") -> pd.DataFrame:
    """The CSV at ``path`` with at least the ``required`` columns and one row (of ``rows``), or one clear error."""
    try:
        frame = pd.read_csv(path, dtype=dtype)
    except Exception as exc:  # pandas raises many types for malformed files
        raise MitobenchError(f"{path}: cannot read this CSV ({exc}).") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MitobenchError(
            f"{path}: missing column(s) {missing}; found {list(frame.columns)}. "
            f"The file needs the columns {required}."
        )
    if frame.empty:
        raise MitobenchError(f"{path}: no rows under the header; list at least one {rows}.")
    return frame


def parse_votes(value: object, where: str) -> tuple[float, float]:
    """A figure's expert votes for atypical, written ``k/n`` (``2/3``: two of three experts said atypical), as
    (fraction, n); blank means none (NaN, NaN). A bare number is refused: ``1`` could be one vote or all of them."""
    if pd.isna(value) or str(value).strip() == "":
        return np.nan, np.nan
    text = str(value).strip()
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k <= n or n == 0:
        raise MitobenchError(f"{where}: votes {text!r} is not the experts' votes for atypical. Write k/n (2/3: two of "
                             "three experts said atypical; 0/3: none did), or leave it blank where unknown.")
    return k / n, float(n)


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder``, sorted, as paths under the resolved folder (one scandir, no stat per file)."""
    folder = folder.resolve()
    names, broken = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            if entry.is_file():
                names.append(entry.name)
            elif entry.is_symlink():  # a link whose target is gone: left out, the set would look complete
                broken.append(entry.name)
    if broken:
        link = folder / sorted(broken)[0]
        raise MitobenchError(f"{link} is a link to {os.readlink(link)}, which does not exist ({len(broken)} such "
                             f"link(s) in {folder}). Restore the target (mount its storage), or remove the link.")
    return [folder / name for name in sorted(names)]


def scan_class_folders(root: Path, only_classes: bool = False) -> pd.DataFrame:
    """Rows ``name, path, label`` for ``root/Atypical/*`` and ``root/Normal/*``.

    A file name present in both class folders is ambiguous: refuse it rather than guess. ``only_classes`` (a user's
    own set): an image anywhere else under ``root`` (another folder, a sub-folder, the top) is refused too, since
    leaving it out would make a result look complete that is not.
    """
    rows = []
    seen: dict[str, str] = {}
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    for class_name in CLASS_DIRS:
        folder = folders.get(class_name.lower())
        if folder is None:
            raise MitobenchError(
                f"{root}: no '{class_name}' sub-folder. A class-folder dataset needs "
                f"'{root}/Atypical' and '{root}/Normal'."
            )
        for path in _list_images(folder):
            if path.name in seen:
                raise MitobenchError(
                    f"{path.name} is in both '{seen[path.name]}' and '{folder}': its label is ambiguous. "
                    "Keep it in exactly one class folder."
                )
            seen[path.name] = str(folder)
            rows.append({"name": path.name, "path": str(path), "label": LABELS[class_name.lower()]})
    if not rows:
        raise MitobenchError(f"{root}: the class folders hold no images ({sorted(IMAGE_SUFFIXES)}).")
    if only_classes:
        listed = {row["path"] for row in rows}
        others = sorted(str(p) for p in Path(root).resolve().rglob("*")
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and str(p) not in listed)
        if others:
            raise MitobenchError(f"{root}: {len(others)} image(s) lie outside its Atypical/ and Normal/ folders, e.g. "
                                 f"{others[0]}; only the images directly in those two folders would be used. Move them "
                                 "into a class folder, or out of this folder.")
    return pd.DataFrame(rows)


def _frame(rows: pd.DataFrame) -> pd.DataFrame:
    for col in RECORD_COLUMNS:
        if col not in rows:
            rows[col] = np.nan
    out = rows[RECORD_COLUMNS].reset_index(drop=True)
    out["label"] = out["label"].astype(int)
    return out


def load_amibr(root: Path) -> pd.DataFrame:
    """AMi-Br: PNGs in class folders, the paper's train CSV and the full label file ``AMI-BR.csv``.

    Train rows keep the CSV's order (the paper's folds depend on it); the test split is every PNG
    not listed in the train CSV.
    """
    root = Path(root)
    image_dir = root / "AMi-Br"
    train_csv = root / AMIBR_TRAIN_CSV
    label_csv = root / AMIBR_LABEL_CSV
    for needed in (train_csv, label_csv):
        if not needed.is_file():
            raise MitobenchError(f"{needed} is missing; AMi-Br needs it. Run `mitobench data fetch`.")
    files = scan_class_folders(image_dir).set_index("name")
    train = read_csv(train_csv, ["slide", "dataset", "final_label", "dataset_uid"])
    labels = read_csv(label_csv, ["slide", "dataset", "uid", "expert1_atypical", "expert2_atypical",
                                  "expert3_atypical", "majority_atypical"])
    labels["image"] = labels["dataset"].astype(str) + "_" + labels["uid"].astype(str) + ".png"
    labels = labels.set_index("image")
    vote_cols = ["expert1_atypical", "expert2_atypical", "expert3_atypical"]
    calls = labels[vote_cols].astype(str).apply(lambda c: c.str.lower() == "true")
    votes = calls.mean(axis=1)
    calls_of = calls.astype(int).astype(str).agg("".join, axis=1).to_dict()

    file_path, file_label = files["path"].to_dict(), files["label"].to_dict()
    vote_of = votes.to_dict()
    rows = []
    for i, rec in enumerate(train.itertuples(index=False)):
        where = f"{train_csv} row {i + 2} ({rec.dataset_uid})"
        label = parse_label(rec.final_label, where)
        if rec.dataset_uid not in file_path:
            raise MitobenchError(f"{where}: image {image_dir}/{rec.final_label}/{rec.dataset_uid} is missing. Restore "
                                 f"it (move {image_dir} away, then `mitobench data fetch` downloads it again) or fix "
                                 "the data root.")
        if file_label[rec.dataset_uid] != label:
            raise MitobenchError(f"{where}: labelled {rec.final_label} but the file is in the other class folder.")
        rows.append({"image": rec.dataset_uid, "path": file_path[rec.dataset_uid], "label": label,
                     "split": "train", "group": rec.slide, "domain": rec.dataset,
                     "p_atypical_votes": vote_of.get(rec.dataset_uid, np.nan),
                     "n_experts": float(len(vote_cols)) if rec.dataset_uid in vote_of else np.nan,
                     "expert_votes": calls_of.get(rec.dataset_uid, np.nan)})
    train_names = set(train["dataset_uid"])
    if len(train_names) != len(train):
        raise MitobenchError(f"{train_csv}: some dataset_uid values are listed twice; each image must appear once.")
    first = labels.groupby(level=0)[["slide", "dataset"]].first()  # one row per image name
    slide_of, source_of = first["slide"].to_dict(), first["dataset"].to_dict()
    for name in files.index:
        if name in train_names:
            continue
        rows.append({"image": name, "path": file_path[name], "label": file_label[name], "split": "test",
                     "group": slide_of.get(name, np.nan), "domain": source_of.get(name, name.split("_")[0]),
                     "p_atypical_votes": vote_of.get(name, np.nan), "n_experts": float(len(vote_cols)) if name in vote_of else np.nan,
                     "expert_votes": calls_of.get(name, np.nan)})
    frame = pd.DataFrame(rows)
    frame["dataset"] = "AMi-Br"
    return _frame(frame)


def load_atnorm_br(root: Path) -> pd.DataFrame:
    """AtNorM-Br: TCGA breast MFs in class folders; no slides, no per-expert votes."""
    files = scan_class_folders(Path(root) / "AtNorM-Br")
    cls = files["label"].map({1: "Atypical", 0: "Normal"})
    frame = pd.DataFrame({"image": cls + "/" + files["name"], "path": files["path"], "label": files["label"],
                          "dataset": "AtNorM-Br", "split": "test", "domain": "TCGA"})
    return _frame(frame)


def load_atnorm_md(root: Path) -> pd.DataFrame:
    """AtNorM-MD: MIDOG++ MFs in class folders plus five experts' votes per file."""
    root = Path(root)
    files = scan_class_folders(root / "AtNorM-MD")
    votes_csv = root / ATNORM_MD_VOTES_CSV
    experts = [f"Expert_{i}" for i in range(1, 6)]
    p_votes = pd.Series(np.nan, index=files["name"])
    calls = pd.Series(np.nan, index=files["name"], dtype=object)
    if votes_csv.is_file():
        votes = read_csv(votes_csv, ["Filename", *experts, "Majority"]).set_index("Filename")
        for name, row in votes.iterrows():
            where = f"{votes_csv} ({name})"
            codes = [parse_label(row[e], where) for e in experts]
            p_votes[name] = float(np.mean(codes))
            calls[name] = "".join(map(str, codes))
            majority = parse_label(row["Majority"], where)
            match = files.loc[files["name"] == name, "label"]
            if len(match) and int(match.iloc[0]) != majority:
                raise MitobenchError(f"{where}: Majority={row['Majority']} disagrees with the class folder.")
    cls = files["label"].map({1: "Atypical", 0: "Normal"})
    frame = pd.DataFrame({"image": cls + "/" + files["name"], "path": files["path"], "label": files["label"],
                          "dataset": "AtNorM-MD", "split": "test", "domain": "MIDOG++",
                          "p_atypical_votes": p_votes.reindex(files["name"]).to_numpy(),
                          "n_experts": np.where(p_votes.reindex(files["name"]).notna(), float(len(experts)), np.nan),
                          "expert_votes": calls.reindex(files["name"]).to_numpy()})
    return _frame(frame)


def load_custom(source: str | Path, name: str | None = None) -> pd.DataFrame:
    """The user's own data: a folder of ``Atypical``/``Normal`` sub-folders, or a CSV with columns
    ``path,label`` and optional ``group,domain,votes`` (relative paths are relative to the CSV)."""
    source = Path(source).expanduser().resolve()
    name = name or source.stem
    if source.is_dir():
        files = scan_class_folders(source, only_classes=True)
        cls = files["label"].map({1: "Atypical", 0: "Normal"})
        frame = pd.DataFrame({"image": cls + "/" + files["name"], "path": files["path"], "label": files["label"]})
    elif source.is_file():
        table = read_csv(source, ["path", "label"])
        paths = [Path(p) if Path(p).is_absolute() else (source.parent / p) for p in table["path"].astype(str)]
        for i, p in enumerate(paths):
            if not p.is_file():
                raise MitobenchError(f"{source} row {i + 2}: image {p} does not exist. Fix the path or restore the file.")
        labels = [parse_label(v, f"{source} row {i + 2}") for i, v in enumerate(table["label"])]
        frame = pd.DataFrame({"image": table["path"].astype(str), "path": [str(p.resolve()) for p in paths],
                              "label": labels})
        for col in ("group", "domain"):
            if col in table:
                frame[col] = table[col].to_numpy()
        if "votes" in table:
            votes = [parse_votes(v, f"{source} row {i + 2}") for i, v in enumerate(table["votes"])]
            frame["p_atypical_votes"], frame["n_experts"] = [v[0] for v in votes], [v[1] for v in votes]
    else:
        raise MitobenchError(f"{source}: no such folder or CSV.")
    frame["dataset"] = name
    frame["split"] = "test"
    if frame["domain"].isna().all() if "domain" in frame else True:
        frame["domain"] = name
    for column in ("image", "path"):  # path: resolved, so ./a.png and a.png are the same image
        if frame[column].duplicated().any():
            dup = frame.loc[frame[column].duplicated(), column].iloc[0]
            raise MitobenchError(f"{source}: {dup} is listed twice; list each image once.")
    return _frame(frame)


KNOWN_DATASETS = {
    "AMi-Br": (lambda r: (r / "AMi-Br").is_dir(), load_amibr),
    "AtNorM-Br": (lambda r: (r / "AtNorM-Br").is_dir(), load_atnorm_br),
    "AtNorM-MD": (lambda r: (r / "AtNorM-MD").is_dir(), load_atnorm_md),
}


def no_data_root(root: Path) -> MitobenchError:
    """The error for a data root that is not a folder."""
    problem = "is a file, not a folder" if root.is_file() else "does not exist"
    return MitobenchError(f"data root {root} {problem}. Pass --data-root, set MITOBENCH_DATA, or run "
                          "`mitobench data fetch`.")


def discover(data_root: str | Path) -> dict[str, pd.DataFrame]:
    """Load every known dataset found under ``data_root``; none at all is an error."""
    root = Path(data_root)
    if not root.is_dir():
        raise no_data_root(root)
    found = {name: load(root) for name, (present, load) in KNOWN_DATASETS.items() if present(root)}
    if not found:
        raise MitobenchError(
            f"data root {root} holds none of {list(KNOWN_DATASETS)}. Point --data-root (or MITOBENCH_DATA) at the "
            "folder holding AMi-Br/, amibr_train_split.csv and AMI-BR.csv, or run `mitobench data fetch`."
        )
    return found


def evaluation_sets(datasets: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Split AMi-Br into ``AMi-Br-train`` (for the folds) and ``AMi-Br-test``; other sets are hold-outs."""
    out: dict[str, pd.DataFrame] = {}
    for name, frame in datasets.items():
        if name == "AMi-Br":
            out["AMi-Br-train"] = frame[frame["split"] == "train"].reset_index(drop=True)
            out["AMi-Br-test"] = frame[frame["split"] == "test"].reset_index(drop=True)
        else:
            out[name] = frame
    return out
