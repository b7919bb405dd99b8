"""``mitobench data check``: what is in a data root, and is it sound?

For every set found (AMi-Br train / test, AtNorM-Br, AtNorM-MD, or records the caller passes) the
check reports counts per class and domain, decodes every image with the project's image policy
(:func:`mitobench.data.images.decode_patch`) and collects the files that fail, finds exact
duplicates (same file bytes) and re-encoded copies (different files whose decoded pixels are
identical) within and across sets and the groups whose labels conflict, and verifies that the
AMi-Br train and test splits share no slide.

Verdict (``CheckResult.ok``) fails on: a dataset that cannot be loaded, unreadable images,
duplicate groups (exact or re-encoded) with conflicting labels (except inside AtNorM-Br, a known
defect of the public set reported as a warning), a slide in both AMi-Br train and test, and an
image of the training split that is in a hold-out set, as an exact or a re-encoded copy (leakage).
Everything else is a warning or information.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mitobench.data.images import ImageModeWarning, decode_patch
from mitobench.data.records import HOLDOUT_SETS, KNOWN_DATASETS, evaluation_sets, no_data_root
from mitobench.errors import MitobenchError
from mitobench.progress import progress_bar

#: Sets whose conflicting duplicates are a known defect of the public data: warn, don't fail.
KNOWN_CONFLICT_SETS = ("AtNorM-Br",)
TRAIN_SET = "AMi-Br-train"


@dataclass
class CountRow:
    set: str
    domain: str
    atypical: int
    normal: int

    @property
    def total(self) -> int:
        return self.atypical + self.normal


@dataclass
class BadImage:
    set: str
    image: str
    path: str
    error: str


class _Members:
    """What exact and pixel duplicate groups share: ``members`` ((set, image) in record order) and ``labels``."""

    members: list[tuple[str, str]]
    labels: list[int]

    @property
    def sets(self) -> list[str]:
        return sorted({s for s, _ in self.members})

    @property
    def conflicting(self) -> bool:
        return len(set(self.labels)) > 1

    @property
    def across_sets(self) -> bool:
        return len(self.sets) > 1

    def describe(self) -> str:
        names = {1: "Atypical", 0: "Normal"}
        return " = ".join(f"{s}:{img} ({names.get(lab, lab)})" for (s, img), lab in zip(self.members, self.labels))


@dataclass
class DuplicateGroup(_Members):
    """Images with identical file bytes (``sha256``)."""

    sha256: str
    members: list[tuple[str, str]]  # (set, image) in record order
    labels: list[int]


@dataclass
class PixelDuplicateGroup(_Members):
    """Images whose decoded pixels are identical (``pixels``: sha256 of the RGB array) although the files are not
    all byte-identical: re-encoded copies (e.g. re-saved by an image library). ``file_sha256`` is each member's
    file hash; members with the same file hash are also in an exact :class:`DuplicateGroup`."""

    pixels: str
    members: list[tuple[str, str]]  # (set, image) in record order
    labels: list[int]
    file_sha256: list[str]

    @property
    def train_holdout(self) -> bool:
        """A training image and a hold-out image of the group are different files (a re-encoded leak; a
        byte-identical one is reported by the exact groups)."""
        train = {h for (s, _), h in zip(self.members, self.file_sha256) if s == TRAIN_SET}
        holdout = {h for (s, _), h in zip(self.members, self.file_sha256) if s != TRAIN_SET}
        return bool(train and holdout) and not (len(train) == len(holdout) == 1 and train == holdout)


@dataclass
class SetIntegrity:
    set: str
    images: int
    unreadable: int
    converted: int
    duplicate_copies: int  # images beyond the first of each exact-duplicate group within the set
    unique: int
    conflicting_groups: int


@dataclass
class CheckResult:
    data_root: str | None
    counts: list[CountRow] = field(default_factory=list)
    integrity: list[SetIntegrity] = field(default_factory=list)
    absent_sets: list[str] = field(default_factory=list)
    load_errors: dict[str, str] = field(default_factory=dict)
    unreadable: list[BadImage] = field(default_factory=list)
    converted: list[BadImage] = field(default_factory=list)
    duplicate_groups: list[DuplicateGroup] = field(default_factory=list)
    # groups of identical decoded pixels that are not all byte-identical files (re-encoded copies)
    pixel_duplicate_groups: list[PixelDuplicateGroup] = field(default_factory=list)
    slide_overlap: list[str] = field(default_factory=list)
    slides: dict[str, int] = field(default_factory=dict)  # slides per AMi-Br split
    train_holdout_duplicates: list[DuplicateGroup] = field(default_factory=list)
    # training images with a re-encoded copy (different file, identical pixels) in a hold-out set
    train_holdout_pixel_duplicates: list[PixelDuplicateGroup] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def conflicting_groups(self) -> list[DuplicateGroup]:
        return [g for g in self.duplicate_groups if g.conflicting]

    @property
    def conflicting_pixel_groups(self) -> list[PixelDuplicateGroup]:
        return [g for g in self.pixel_duplicate_groups if g.conflicting]

    def duplicates_in(self, name: str) -> list[DuplicateGroup]:
        """Exact-duplicate groups with at least two members in set ``name``."""
        out = []
        for g in self.duplicate_groups:
            if sum(s == name for s, _ in g.members) > 1:
                out.append(g)
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        for row, src in zip(out["counts"], self.counts):
            row["total"] = src.total
        for key in ("duplicate_groups", "pixel_duplicate_groups"):
            for row, src in zip(out[key], getattr(self, key)):
                row["conflicting"] = src.conflicting
                row["sets"] = src.sets
        return out


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_hashes(records: pd.DataFrame, patch_size: int | None = 128, decode: bool = True,
                 description: str = "check images") -> pd.DataFrame:
    """Per record: ``sha256`` of the file bytes, ``pixels`` (sha256 of the decoded RGB array, None if
    not decoded), ``error`` (why it cannot be read or decoded) and ``converted`` (mode warning)."""
    rows = []
    with progress_bar(description, len(records)) as advance:
        for path in records["path"]:
            row = {"sha256": None, "pixels": None, "error": None, "converted": None}
            try:
                row["sha256"] = _sha256_bytes(Path(path).read_bytes())
            except OSError as exc:
                row["error"] = f"{path}: cannot read this file ({exc})."
            if decode and row["error"] is None:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ImageModeWarning)
                    try:
                        array = decode_patch(path, patch_size)
                        row["pixels"] = _sha256_bytes(np.ascontiguousarray(array).tobytes())
                    except MitobenchError as exc:
                        row["error"] = str(exc)
                mode_warnings = [str(w.message) for w in caught if issubclass(w.category, ImageModeWarning)]
                if mode_warnings:
                    row["converted"] = mode_warnings[0]
            rows.append(row)
            advance(1)
    return pd.DataFrame(rows, index=records.index, columns=["sha256", "pixels", "error", "converted"])


def _load_datasets(root: Path, result: CheckResult) -> dict[str, pd.DataFrame]:
    if not root.is_dir():
        raise no_data_root(root)
    found = {}
    present_any = False
    for name, (present, load) in KNOWN_DATASETS.items():
        if not present(root):
            continue
        present_any = True
        try:
            found[name] = load(root)
        except MitobenchError as exc:
            result.load_errors[name] = str(exc)
    if not present_any:
        raise MitobenchError(
            f"data root {root} holds none of {list(KNOWN_DATASETS)}. Point --data-root (or MITOBENCH_DATA) at the "
            "folder holding AMi-Br/, amibr_train_split.csv and AMI-BR.csv, or run `mitobench data fetch`.")
    return found


def check_data(data_root: str | Path | None = None, *, datasets: dict[str, pd.DataFrame] | None = None,
               extra: dict[str, pd.DataFrame] | None = None, patch_size: int | None = 128,
               decode: bool = True) -> CheckResult:
    """Check the datasets under ``data_root`` (or the given record tables ``datasets``, keyed by name), and
    the user's own sets ``extra`` beside them (``data check --dataset``: leakage from AMi-Br train included)."""
    result = CheckResult(data_root=str(data_root) if data_root is not None else None)
    if datasets is None:
        if data_root is None:
            raise MitobenchError("check_data needs a data root or record tables.")
        datasets = _load_datasets(Path(data_root), result)
    for name, frame in (extra or {}).items():
        if name in datasets or name in evaluation_sets(datasets) or name in HOLDOUT_SETS:
            raise MitobenchError(f"--dataset: its name {name!r} is already taken by a built-in set; a set is named "
                                 f"after its folder or CSV file, so rename it (e.g. my-{name}).")
        datasets = {**datasets, name: frame}
    sets = evaluation_sets(datasets)
    # hold-out sets that are simply not there (a set that failed to load is an error instead)
    result.absent_sets = [s for s in HOLDOUT_SETS
                          if s not in sets and {"AMi-Br-test": "AMi-Br"}.get(s, s) not in result.load_errors]
    for name, message in result.load_errors.items():
        result.errors.append(f"{name} cannot be loaded: {message}")

    # counts per set, domain and class
    for name, frame in sets.items():
        domains = frame["domain"].fillna("unknown").astype(str)
        for domain in sorted(domains.unique()):
            part = frame[domains == domain]
            result.counts.append(CountRow(name, domain, int((part["label"] == 1).sum()),
                                          int((part["label"] == 0).sum())))

    # read, hash and decode every image
    tables = []
    for name, frame in sets.items():
        if frame.empty:
            continue
        hashes = image_hashes(frame, patch_size, decode, description=f"check {name}")
        tables.append(pd.concat([frame[["image", "path", "label"]].assign(set=name), hashes], axis=1))
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["image", "path", "label", "set", "sha256", "pixels", "error", "converted"])

    for row in table.itertuples(index=False):
        if isinstance(row.error, str):
            result.unreadable.append(BadImage(row.set, row.image, row.path, row.error))
        if isinstance(row.converted, str):
            result.converted.append(BadImage(row.set, row.image, row.path, row.converted))

    # exact duplicates (file bytes), within and across sets
    hashed = table[table["sha256"].notna()]
    for digest, group in hashed.groupby("sha256", sort=False):
        if len(group) > 1:
            result.duplicate_groups.append(DuplicateGroup(
                sha256=str(digest), members=list(zip(group["set"], group["image"])),
                labels=[int(v) for v in group["label"]]))
    # identical pixels in files that differ byte-wise (re-encoded copies)
    decoded = table[table["pixels"].notna()]
    for digest, group in decoded.groupby("pixels", sort=False):
        if group["sha256"].nunique() > 1:
            result.pixel_duplicate_groups.append(PixelDuplicateGroup(
                pixels=str(digest), members=list(zip(group["set"], group["image"])),
                labels=[int(v) for v in group["label"]], file_sha256=[str(v) for v in group["sha256"]]))

    for name in sets:
        in_set = table[table["set"] == name]
        groups = result.duplicates_in(name)
        copies = sum(sum(s == name for s, _ in g.members) - 1 for g in groups)
        conflicting = [g for g in groups if len({lab for (s, _), lab in zip(g.members, g.labels) if s == name}) > 1]
        result.integrity.append(SetIntegrity(
            set=name, images=len(in_set), unreadable=int(in_set["error"].notna().sum()),
            converted=int(in_set["converted"].notna().sum()), duplicate_copies=copies,
            unique=int(in_set["sha256"].nunique()) + int(in_set["sha256"].isna().sum()),
            conflicting_groups=len(conflicting)))

    # slide overlap between the AMi-Br splits
    if TRAIN_SET in sets and "AMi-Br-test" in sets:
        train_slides = set(sets[TRAIN_SET]["group"].dropna().astype(str))
        test = sets["AMi-Br-test"]
        test_slides = set(test["group"].dropna().astype(str))
        result.slide_overlap = sorted(train_slides & test_slides)
        result.slides = {TRAIN_SET: len(train_slides), "AMi-Br-test": len(test_slides)}
        no_slide = int(test["group"].isna().sum())
        if no_slide:
            result.warnings.append(f"{no_slide} AMi-Br test image(s) have no slide in AMI-BR.csv: slide overlap "
                                   "with the training split cannot be verified for them.")

    # expert votes that cover only part of a set: the agreement tables leave the rest out
    for name, frame in sets.items():
        if "p_atypical_votes" not in frame:
            continue
        unvoted = frame["p_atypical_votes"].isna()
        if 0 < unvoted.sum() < len(frame):
            result.warnings.append(f"{name}: {int(unvoted.sum())} of {len(frame)} image(s) have no expert votes "
                                   f"(e.g. {frame.loc[unvoted, 'image'].iloc[0]}): the expert-agreement tables of a "
                                   "run leave them out.")

    # verdict
    if result.unreadable:
        result.errors.append(f"{len(result.unreadable)} image(s) cannot be read or decoded "
                             f"(first: {result.unreadable[0].path}). Replace or remove them.")
    conflicts = [(g, "identical images", "known defect of the public set; `mitobench run --dedup` also reports the "
                  "set without them") for g in result.conflicting_groups]
    conflicts += [(g, "re-encoded copies (identical pixels, different files)", "in a set with known label defects; "
                   "`mitobench run --dedup` also reports the set without them")
                  for g in result.conflicting_pixel_groups]
    for g, what, known in conflicts:
        if set(g.sets) <= set(KNOWN_CONFLICT_SETS):
            result.warnings.append(f"{what} with conflicting labels ({known}): {g.describe()}")
        else:
            result.errors.append(f"{what} with conflicting labels: {g.describe()}. Keep one copy with the right label.")
    if result.slide_overlap:
        result.errors.append(f"{len(result.slide_overlap)} slide(s) are in both the AMi-Br train and test splits "
                             f"(e.g. {result.slide_overlap[0]}): the test split is not slide-disjoint.")
    result.train_holdout_duplicates = [g for g in result.duplicate_groups
                                       if TRAIN_SET in g.sets and len(g.sets) > 1]
    if result.train_holdout_duplicates:
        result.errors.append(f"{len(result.train_holdout_duplicates)} training image(s) also appear in a hold-out "
                             f"set (e.g. {result.train_holdout_duplicates[0].describe()}): results would be leaky.")
    result.train_holdout_pixel_duplicates = [g for g in result.pixel_duplicate_groups if g.train_holdout]
    if result.train_holdout_pixel_duplicates:
        result.errors.append(f"{len(result.train_holdout_pixel_duplicates)} training image(s) also appear in a "
                             f"hold-out set as re-encoded copies (identical pixels, different files): "
                             f"{_describe_groups(result.train_holdout_pixel_duplicates)}: results would be leaky. "
                             "Remove the copies from the hold-out set.")
    for row in result.integrity:
        if row.duplicate_copies:
            hint = "" if row.set == TRAIN_SET else "; `mitobench run --dedup` also reports the set without them"
            result.warnings.append(f"{row.set}: {row.duplicate_copies} exact-duplicate image(s) "
                                   f"({row.unique} unique of {row.images}{hint}).")
    other_cross = [g for g in result.duplicate_groups if g.across_sets and g not in result.train_holdout_duplicates]
    if other_cross:
        result.warnings.append(f"{len(other_cross)} image(s) appear in more than one hold-out set "
                               f"(e.g. {other_cross[0].describe()}).")
    # re-encoded copies not already reported as an error or a conflict warning above
    other_pixel = [g for g in result.pixel_duplicate_groups if not g.conflicting and not g.train_holdout]
    if other_pixel:
        result.warnings.append(f"{len(other_pixel)} group(s) of different files decode to identical pixels "
                               f"(re-encoded copies; not counted as exact duplicates; `mitobench run --dedup` "
                               f"also reports hold-out sets without them): {_describe_groups(other_pixel)}.")
    if result.converted:
        result.warnings.append(f"{len(result.converted)} image(s) are not RGB and are converted on load "
                               f"(first: {result.converted[0].error}).")
    return result


def leaked_copies(train: np.ndarray, holdout: np.ndarray) -> list[tuple[int, int]]:
    """``(train row, hold-out row)`` pairs of identical decoded patches: byte-identical or re-encoded copies of a
    training image in a hold-out set (leakage). Hashes each (H, W, 3) uint8 row; a few seconds for AMi-Br."""
    def row_hashes(patches: np.ndarray) -> list[str]:
        return [_sha256_bytes(np.ascontiguousarray(p).tobytes()) for p in patches]

    seen: dict[str, int] = {}
    for i, digest in enumerate(row_hashes(train)):
        seen.setdefault(digest, i)
    return [(seen[d], j) for j, d in enumerate(row_hashes(holdout)) if d in seen]


def _describe_groups(groups: list, limit: int = 5) -> str:
    text = "; ".join(g.describe() for g in groups[:limit])
    return text + (f"; and {len(groups) - limit} more" if len(groups) > limit else "")


def deduplicate(records: pd.DataFrame, hashes: pd.DataFrame | None = None) -> pd.DataFrame:
    """Drop duplicate images, keeping the first of each group in record order, and drop every member of a
    group whose labels conflict. A group is what ``data check`` reports: identical file bytes, or different
    files that decode to identical pixels (re-encoded copies). ``hashes`` (``image_hashes`` of ``records``)
    saves reading the files again; a file that cannot be decoded is grouped by its bytes (the run's decode
    names it)."""
    if hashes is None:
        hashes = image_hashes(records, patch_size=None, description="dedup")
    sha = pd.Series(np.asarray(hashes["sha256"], dtype=object), index=records.index)
    pixels = pd.Series(np.asarray(hashes["pixels"], dtype=object), index=records.index)
    unread = pd.Series([f"unread:{i}" for i in range(len(records))], index=records.index)
    key = ("pixels:" + pixels).where(pixels.notna(), ("bytes:" + sha).where(sha.notna(), unread))
    n_labels = records.groupby(key)["label"].transform("nunique")
    keep = (n_labels == 1) & ~key.duplicated(keep="first")
    return records[keep.to_numpy()].reset_index(drop=True)


# --------------------------------------------------------------------------- rendering
def render_check(result: CheckResult, console=None, max_items: int = 20) -> None:
    """Print ``result`` as rich tables (counts, integrity, problems, verdict)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    title = f"Data root {result.data_root}" if result.data_root else "Datasets"
    console.print(f"[bold]{title}[/] (positive class: Atypical = 1)", highlight=False)
    counts = Table(title="Images per set, domain and class")
    for col in ("set", "domain"):
        counts.add_column(col, no_wrap=True)
    for col in ("atypical", "normal", "total"):
        counts.add_column(col, justify="right")
    by_set: dict[str, list[CountRow]] = {}
    for row in result.counts:
        by_set.setdefault(row.set, []).append(row)
    for name, rows in by_set.items():
        for row in rows:
            counts.add_row(name, row.domain, f"{row.atypical:,}", f"{row.normal:,}", f"{row.total:,}")
        if len(rows) > 1:
            a, n = sum(r.atypical for r in rows), sum(r.normal for r in rows)
            counts.add_row(f"[bold]{name}[/]", "[bold]all[/]", f"[bold]{a:,}[/]", f"[bold]{n:,}[/]",
                           f"[bold]{a + n:,}[/]")
        counts.add_section()
    console.print(counts)
    for name in result.absent_sets:
        console.print(f"[yellow]{name}: not found in the data root (it is named, not silently skipped; "
                      "`mitobench data fetch` downloads it).[/]")

    integrity = Table(title="Integrity (duplicates = identical file bytes; conflicts = duplicate groups with "
                            "different labels)")
    integrity.add_column("set", no_wrap=True)
    for col in ("images", "unreadable", "converted", "dup. copies", "unique", "conflicts"):
        integrity.add_column(col, justify="right")
    for row in result.integrity:
        integrity.add_row(row.set, f"{row.images:,}", _flag(row.unreadable, "red"), _flag(row.converted, "yellow"),
                          _flag(row.duplicate_copies, "yellow"), f"{row.unique:,}",
                          _flag(row.conflicting_groups, "yellow" if row.set in KNOWN_CONFLICT_SETS else "red"))
    console.print(integrity)
    overlap = ("[red]" + ", ".join(result.slide_overlap[:max_items]) + "[/]") if result.slide_overlap else "none"
    if result.slides:
        console.print(f"AMi-Br slides: {result.slides[TRAIN_SET]} train, {result.slides['AMi-Br-test']} test; "
                      f"shared by both: {overlap}")
    pixel = result.pixel_duplicate_groups
    console.print("Re-encoded copies (different files, identical pixels): "
                  + (f"[yellow]{len(pixel)} group(s)[/], listed below" if pixel else "none"))

    if result.unreadable:
        table = Table(title="Unreadable images", show_lines=False)
        table.add_column("set")
        table.add_column("error")
        for bad in result.unreadable[:max_items]:
            table.add_row(bad.set, bad.error)
        console.print(table)
        if len(result.unreadable) > max_items:
            console.print(f"... and {len(result.unreadable) - max_items} more.")
    if result.conflicting_groups:
        table = Table(title="Identical images with conflicting labels")
        table.add_column("sha256")
        table.add_column("members (label)")
        for g in result.conflicting_groups[:max_items]:
            table.add_row(g.sha256[:12], g.describe())
        console.print(table)
    if result.pixel_duplicate_groups:
        table = Table(title="Re-encoded copies (different files, identical decoded pixels)")
        table.add_column("pixels sha256")
        table.add_column("members (label)")
        table.add_column("problem")
        for g in result.pixel_duplicate_groups[:max_items]:
            problem = ", ".join(p for p, bad in (("[red]train/hold-out leak[/]", g.train_holdout),
                                                 ("conflicting labels", g.conflicting)) if bad)
            table.add_row(g.pixels[:12], g.describe(), problem or "-")
        console.print(table)
        if len(result.pixel_duplicate_groups) > max_items:
            console.print(f"... and {len(result.pixel_duplicate_groups) - max_items} more.")

    for message in result.warnings:
        console.print(f"[yellow]warning:[/] {message}", highlight=False)
    for message in result.errors:
        console.print(f"[red]error:[/] {message}", highlight=False)
    if result.ok:
        console.print("[bold green]OK[/]: every image decodes, no conflicting labels outside known defects, "
                      "no training image in a hold-out set, AMi-Br train and test are slide-disjoint.")
    else:
        console.print(f"[bold red]FAILED[/]: {len(result.errors)} problem(s) above.")


def _flag(value: int, color: str) -> str:
    return f"[{color}]{value:,}[/]" if value else "0"
