"""The record table loaders (``mitobench.data.records``) and the image policy, on synthetic fixtures."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from fixtures import (
    make_amibr,
    make_atnorm_br,
    make_atnorm_md,
    make_custom_csv,
    make_custom_folder,
    make_data_root,
    make_png,
)
from mitobench.data.images import ImageModeWarning, decode_patch
from mitobench.data.records import (
    RECORD_COLUMNS,
    discover,
    evaluation_sets,
    load_amibr,
    load_atnorm_br,
    load_atnorm_md,
    load_custom,
    resolve_data_root,
)
from mitobench.errors import MitobenchError


def rewrite_csv(path: Path, edit) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame = edit(frame)
    frame.to_csv(path, index=False)


# --------------------------------------------------------------------------- loaders
def test_load_amibr(tmp_path):
    fx = make_amibr(tmp_path)
    records = load_amibr(tmp_path)
    assert list(records.columns) == RECORD_COLUMNS
    assert len(records) == fx.n_total == 65
    train = records[records["split"] == "train"]
    test = records[records["split"] == "test"]
    assert (len(train), len(test)) == (50, 15)
    # train rows keep the CSV's order (the paper's folds depend on it)
    assert train["image"].tolist() == [r["dataset_uid"] for r in fx.train]
    assert train["group"].tolist() == [r["slide"] for r in fx.train]
    assert train["label"].tolist() == [int(r["atypical"]) for r in fx.train]  # atypical = 1
    assert set(test["image"]) == {r["dataset_uid"] for r in fx.test}
    assert set(records["dataset"]) == {"AMi-Br"}
    assert set(records["domain"]) == {"MIDOG21", "TUPAC16"}
    assert all(records["image"].str.startswith(tuple(records["domain"].unique())))
    # test split: slides from AMI-BR.csv, disjoint from train
    assert test["group"].notna().all()
    assert not set(train["group"]) & set(test["group"])
    for path, label in zip(records["path"], records["label"]):
        assert Path(path).is_absolute() and Path(path).parent.name == ("Atypical" if label else "Normal")
    # expert votes: fraction of the 3 experts voting atypical
    expected = {r["dataset_uid"]: sum(r["votes"]) / 3 for r in fx.train + fx.test}
    got = dict(zip(records["image"], records["p_atypical_votes"]))
    assert got == pytest.approx(expected)
    assert set(np.round(records["p_atypical_votes"], 3)) == {0.0, 0.333, 0.667, 1.0}
    calls = {r["dataset_uid"]: "".join("1" if v else "0" for v in r["votes"]) for r in fx.train + fx.test}
    assert dict(zip(records["image"], records["expert_votes"])) == calls  # each expert's call, in column order


def test_amibr_fixture_supports_paper_folds(tmp_path):
    make_amibr(tmp_path)
    train = evaluation_sets(discover(tmp_path))["AMi-Br-train"]
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=42)
    sizes = []
    for fit, val in folds.split(train, train["label"], train["group"]):
        assert not set(train["group"].iloc[fit]) & set(train["group"].iloc[val])
        assert train["label"].iloc[val].sum() > 0 and (train["label"].iloc[val] == 0).sum() > 0
        sizes.append(len(val))
    assert sum(sizes) == 50


def test_amibr_without_label_csv_is_an_error(tmp_path):
    make_amibr(tmp_path, labels_csv=False)
    with pytest.raises(MitobenchError, match="AMI-BR.csv is missing"):
        load_amibr(tmp_path)


def test_load_atnorm_br(tmp_path):
    truth = make_atnorm_br(tmp_path)
    records = load_atnorm_br(tmp_path)
    assert list(records.columns) == RECORD_COLUMNS
    assert dict(zip(records["image"], records["label"])) == truth
    assert (len(records), int(records["label"].sum())) == (12, 4)
    assert set(records["dataset"]) == {"AtNorM-Br"} and set(records["domain"]) == {"TCGA"}
    assert set(records["split"]) == {"test"}
    assert records["group"].isna().all() and records["p_atypical_votes"].isna().all()


def test_load_atnorm_md_votes(tmp_path):
    fractions = make_atnorm_md(tmp_path)
    records = load_atnorm_md(tmp_path)
    assert list(records.columns) == RECORD_COLUMNS
    assert (len(records), int(records["label"].sum())) == (9, 3)
    assert set(records["dataset"]) == {"AtNorM-MD"} and set(records["domain"]) == {"MIDOG++"}
    names = records["image"].str.split("/").str[1]
    assert dict(zip(names, records["p_atypical_votes"])) == pytest.approx(fractions)
    # the folder label is the 3-of-5 majority
    assert ((records["p_atypical_votes"] >= 0.6).astype(int) == records["label"]).all()
    assert set(fractions.values()) == {0.0, 0.2, 0.4, 0.6, 0.8, 1.0}
    votes_csv = pd.read_csv(tmp_path / "AtNorM-MD_expert_votes.csv").set_index("Filename")
    for name, calls in zip(names, records["expert_votes"]):
        assert calls == "".join("1" if votes_csv.at[name, f"Expert_{i}"] == "Atypical" else "0" for i in range(1, 6))


def test_load_atnorm_md_without_votes(tmp_path):
    make_atnorm_md(tmp_path, votes_csv=False)
    records = load_atnorm_md(tmp_path)
    assert len(records) == 9 and records["p_atypical_votes"].isna().all()


def test_load_custom_csv(tmp_path):
    csv = make_custom_csv(tmp_path)
    records = load_custom(csv)
    assert list(records.columns) == RECORD_COLUMNS
    assert (len(records), int(records["label"].sum())) == (8, 3)
    assert set(records["dataset"]) == {"mydata"}
    assert set(records["group"]) == {"slide0", "slide1", "slide2"}
    assert set(records["domain"]) == {"scannerA", "scannerB"}
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in records["path"])
    assert records["image"].tolist()[0] == "images/img_000.png"


def test_load_custom_csv_minimal_columns(tmp_path):
    csv = make_custom_csv(tmp_path, with_group=False, with_domain=False)
    records = load_custom(csv, name="mine")
    assert set(records["dataset"]) == {"mine"} and set(records["domain"]) == {"mine"}
    assert records["group"].isna().all()


def test_load_custom_folder(tmp_path):
    folder = make_custom_folder(tmp_path / "lab_set")
    records = load_custom(folder)
    assert (len(records), int(records["label"].sum())) == (5, 2)
    assert set(records["dataset"]) == {"lab_set"}
    assert records["image"].tolist() == ["Atypical/1.png", "Atypical/2.png", "Normal/3.png", "Normal/4.png",
                                         "Normal/5.png"]


def test_discover_and_evaluation_sets(tmp_path):
    make_data_root(tmp_path)
    found = discover(tmp_path)
    assert sorted(found) == ["AMi-Br", "AtNorM-Br", "AtNorM-MD"]
    sets = evaluation_sets(found)
    assert {k: len(v) for k, v in sets.items()} == {"AMi-Br-train": 50, "AMi-Br-test": 15, "AtNorM-Br": 12,
                                                  "AtNorM-MD": 9}
    assert (sets["AMi-Br-train"]["split"] == "train").all() and (sets["AMi-Br-test"]["split"] == "test").all()


def test_discover_partial_root(tmp_path):
    make_atnorm_br(tmp_path)
    assert list(discover(tmp_path)) == ["AtNorM-Br"]


def test_resolve_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MITOBENCH_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert resolve_data_root(None) == (tmp_path / "env").resolve()
    monkeypatch.delenv("MITOBENCH_DATA")
    assert resolve_data_root(None).name == "data"


# --------------------------------------------------------------------------- the image policy
def test_decode_rgb(tmp_path):
    path = make_png(tmp_path / "a.png", rgb=(1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        array = decode_patch(path)
    assert array.shape == (128, 128, 3) and array.dtype == np.uint8
    assert tuple(array[0, 0]) == (1, 2, 3)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_non_rgb_converted_with_warning(tmp_path, mode):
    path = make_png(tmp_path / f"{mode}.png", rgb=(200, 100, 50), mode=mode)
    with pytest.warns(ImageModeWarning, match=f"{mode}.png.*{mode}"):
        array = decode_patch(path)
    assert array.shape == (128, 128, 3) and array.dtype == np.uint8


def test_sixteen_bit_grey_keeps_its_high_byte(tmp_path):
    """A 16-bit grey PNG is scaled to 8 bits (PIL's own conversion clips at 255: an all-white patch)."""
    from PIL import Image

    values = (np.arange(128 * 128).reshape(128, 128) * 4 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with pytest.warns(ImageModeWarning, match=r"deep\.png.*16-bit grey"):
        array = decode_patch(tmp_path / "deep.png")
    assert array.shape == (128, 128, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[..., 1], (values >> 8).astype(np.uint8))
    assert len(np.unique(array)) > 200


def test_sixteen_bit_png_opened_as_mode_i_is_sixteen_bit_too(tmp_path, monkeypatch):
    """Pillow < 10.3 opens a 16-bit grey PNG as mode I (32-bit): still 16-bit grey, not refused."""
    from PIL import Image

    import mitobench.data.images as images_mod

    values = (np.arange(128 * 128).reshape(128, 128) * 4 % 65536).astype(np.int32)

    def old_pillow_open(path):
        img = Image.fromarray(values)  # mode I
        img.format = "PNG"
        return img

    monkeypatch.setattr(images_mod.Image, "open", old_pillow_open)
    with pytest.warns(ImageModeWarning, match="16-bit grey"):
        array = decode_patch(tmp_path / "deep.png")
    np.testing.assert_array_equal(array[..., 0], (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("dtype, kind", [(np.int32, "integer"), (np.float32, "floating-point")])
def test_thirty_two_bit_images_are_refused(tmp_path, dtype, kind):
    from PIL import Image

    Image.fromarray(np.full((128, 128), 1000, dtype=dtype)).save(tmp_path / "wide.tif")
    with pytest.raises(MitobenchError, match=rf"wide\.tif: a 32-bit {kind} image.*8-bit RGB"):
        decode_patch(tmp_path / "wide.tif")


@pytest.mark.parametrize("size", [64, (128, 100), 256])
def test_wrong_size_rejected(tmp_path, size):
    path = make_png(tmp_path / "small.png", size=size)
    with pytest.raises(MitobenchError, match=r"small\.png.*128x128"):
        decode_patch(path)
    assert decode_patch(path, patch_size=None).ndim == 3


def test_corrupt_png(tmp_path):
    path = make_png(tmp_path / "broken.png")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(MitobenchError, match=r"broken\.png.*cannot decode"):
        decode_patch(path)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG but not really")
    with pytest.raises(MitobenchError, match=r"junk\.png"):
        decode_patch(junk)


# --------------------------------------------------------------------------- bad input: one clear error each
def test_train_csv_missing_column(tmp_path):
    make_amibr(tmp_path)
    rewrite_csv(tmp_path / "amibr_train_split.csv", lambda f: f.drop(columns=["final_label"]))
    with pytest.raises(MitobenchError, match=r"amibr_train_split\.csv: missing column\(s\) \['final_label'\]"):
        load_amibr(tmp_path)


def test_label_csv_missing_column(tmp_path):
    make_amibr(tmp_path)
    rewrite_csv(tmp_path / "AMI-BR.csv", lambda f: f.drop(columns=["expert3_atypical"]))
    with pytest.raises(MitobenchError, match=r"AMI-BR\.csv: missing column.*expert3_atypical"):
        load_amibr(tmp_path)


def test_votes_csv_missing_column(tmp_path):
    make_atnorm_md(tmp_path)
    rewrite_csv(tmp_path / "AtNorM-MD_expert_votes.csv", lambda f: f.drop(columns=["Expert_4"]))
    with pytest.raises(MitobenchError, match=r"AtNorM-MD_expert_votes\.csv: missing column.*Expert_4"):
        load_atnorm_md(tmp_path)


def test_custom_csv_missing_column(tmp_path):
    csv = make_custom_csv(tmp_path)
    rewrite_csv(csv, lambda f: f.drop(columns=["label"]))
    with pytest.raises(MitobenchError, match=r"mydata\.csv: missing column.*label"):
        load_custom(csv)


def test_unknown_label_in_train_csv(tmp_path):
    fx = make_amibr(tmp_path)
    bad = fx.train[3]["dataset_uid"]
    rewrite_csv(tmp_path / "amibr_train_split.csv",
                lambda f: f.assign(final_label=np.where(f["dataset_uid"] == bad, "Mitosis", f["final_label"])))
    with pytest.raises(MitobenchError, match=rf"amibr_train_split\.csv row 5 \({bad}\): label 'Mitosis'"):
        load_amibr(tmp_path)


def test_unknown_label_in_votes_csv(tmp_path):
    make_atnorm_md(tmp_path)
    rewrite_csv(tmp_path / "AtNorM-MD_expert_votes.csv",
                lambda f: f.assign(Expert_2=np.where(f["Filename"] == "5.png", "atypical?", f["Expert_2"])))
    with pytest.raises(MitobenchError, match=r"AtNorM-MD_expert_votes\.csv \(5\.png\): label 'atypical\?'"):
        load_atnorm_md(tmp_path)


def test_unknown_label_in_custom_csv(tmp_path):
    csv = make_custom_csv(tmp_path)
    rewrite_csv(csv, lambda f: f.assign(label=["Atypical", "AFM"] + list(f["label"][2:])))
    with pytest.raises(MitobenchError, match=r"mydata\.csv row 3: label 'AFM'"):
        load_custom(csv)


def test_custom_csv_votes_column(tmp_path):
    """A custom set's expert votes, k/n (blank: unknown), keep both the fraction and the number of experts."""
    csv = make_custom_csv(tmp_path)
    rewrite_csv(csv, lambda f: f.assign(votes=["3/3", "2/3", "2/4", "", "1/3", "0/5", " 1/4 ", "0/3"]))
    records = load_custom(csv)
    np.testing.assert_allclose(records["p_atypical_votes"], [1, 2 / 3, 0.5, np.nan, 1 / 3, 0, 0.25, 0])
    np.testing.assert_allclose(records["n_experts"], [3, 3, 4, np.nan, 3, 5, 4, 3])
    assert records["expert_votes"].isna().all()  # which expert said what is not known
    for bad in ("4/3", "1", "0.5", "two", "1/0", "-1/3"):  # a bare number is ambiguous: one vote, or all of them?
        rewrite_csv(csv, lambda f: f.assign(votes=["1/3"] * 3 + [bad] + ["0/3"] * 4))
        with pytest.raises(MitobenchError, match=rf"mydata\.csv row 5: votes '{re.escape(bad)}'.*k/n"):
            load_custom(csv)


def test_labels_are_case_insensitive(tmp_path):
    csv = make_custom_csv(tmp_path)
    rewrite_csv(csv, lambda f: f.assign(label=f["label"].str.upper()))
    assert int(load_custom(csv)["label"].sum()) == 3


def test_listed_image_missing(tmp_path):
    fx = make_amibr(tmp_path)
    gone = fx.train[7]
    (tmp_path / "AMi-Br" / gone["final_label"] / gone["dataset_uid"]).unlink()
    with pytest.raises(MitobenchError, match=rf"{gone['dataset_uid']} is missing"):
        load_amibr(tmp_path)


def test_listed_image_missing_custom_csv(tmp_path):
    csv = make_custom_csv(tmp_path)
    (tmp_path / "images" / "img_004.png").unlink()
    with pytest.raises(MitobenchError, match=r"mydata\.csv row 6: image .*img_004\.png does not exist"):
        load_custom(csv)


def test_an_image_listed_twice_under_two_spellings_is_refused(tmp_path):
    csv = make_custom_csv(tmp_path)
    table = pd.read_csv(csv)
    again = table.iloc[[0]].assign(path="./" + table["path"].iloc[0])  # the same file, another spelling
    pd.concat([table, again]).to_csv(csv, index=False)
    with pytest.raises(MitobenchError, match=r"mydata\.csv: .*img_000\.png is listed twice"):
        load_custom(csv)


def test_a_broken_link_in_a_class_folder_is_refused_not_dropped(tmp_path):
    """A class folder built of links into storage that is not mounted: the missing image is named, never left out
    (the set would look complete)."""
    folder = make_custom_folder(tmp_path / "lab_set")
    (folder / "Normal" / "lost.png").symlink_to(tmp_path / "unmounted" / "lost.png")
    with pytest.raises(MitobenchError, match=r"lost\.png is a link to .*unmounted/lost\.png, which does not exist"):
        load_custom(folder)


def test_train_label_disagrees_with_folder(tmp_path):
    fx = make_amibr(tmp_path)
    first = fx.train[0]
    flipped = "Normal" if first["final_label"] == "Atypical" else "Atypical"
    rewrite_csv(tmp_path / "amibr_train_split.csv",
                lambda f: f.assign(final_label=[flipped] + list(f["final_label"][1:])))
    with pytest.raises(MitobenchError, match=rf"{first['dataset_uid']}.*other class folder"):
        load_amibr(tmp_path)


def test_majority_disagrees_with_folder(tmp_path):
    make_atnorm_md(tmp_path)
    rewrite_csv(tmp_path / "AtNorM-MD_expert_votes.csv",
                lambda f: f.assign(Majority=np.where(f["Filename"] == "1.png", "Normal", f["Majority"])))
    with pytest.raises(MitobenchError, match=r"\(1\.png\): Majority=Normal disagrees"):
        load_atnorm_md(tmp_path)


@pytest.mark.parametrize("loader", ["amibr", "atnorm_br", "atnorm_md", "custom"])
def test_same_name_in_both_class_folders(tmp_path, loader):
    if loader == "amibr":
        fx = make_amibr(tmp_path)
        name = fx.test[0]["dataset_uid"]
        folder = tmp_path / "AMi-Br"
        load = load_amibr
    elif loader == "custom":
        folder = make_custom_folder(tmp_path / "mine")
        name = "1.png"
        load = lambda root: load_custom(folder)  # noqa: E731
    else:
        (make_atnorm_br if loader == "atnorm_br" else make_atnorm_md)(tmp_path)
        folder = tmp_path / ("AtNorM-Br" if loader == "atnorm_br" else "AtNorM-MD")
        name = "1.png"
        load = load_atnorm_br if loader == "atnorm_br" else load_atnorm_md
    src = next(folder.rglob(name))
    other = "Normal" if src.parent.name == "Atypical" else "Atypical"
    make_png(folder / other / name)
    with pytest.raises(MitobenchError, match=rf"{name} is in both .*ambiguous"):
        load(tmp_path)


def test_missing_class_folder(tmp_path):
    make_atnorm_br(tmp_path)
    for p in (tmp_path / "AtNorM-Br" / "Normal").iterdir():
        p.unlink()
    (tmp_path / "AtNorM-Br" / "Normal").rmdir()
    with pytest.raises(MitobenchError, match=r"AtNorM-Br: no 'Normal' sub-folder"):
        load_atnorm_br(tmp_path)


def test_train_csv_lists_image_twice(tmp_path):
    make_amibr(tmp_path)
    rewrite_csv(tmp_path / "amibr_train_split.csv", lambda f: pd.concat([f, f.iloc[[0]]], ignore_index=True))
    with pytest.raises(MitobenchError, match=r"amibr_train_split\.csv: some dataset_uid values are listed twice"):
        load_amibr(tmp_path)


def test_data_root_without_any_dataset(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(MitobenchError, match=rf"data root {tmp_path} holds none of"):
        discover(tmp_path)
    with pytest.raises(MitobenchError, match="does not exist"):
        discover(tmp_path / "missing")


def test_unreadable_csv(tmp_path):
    make_amibr(tmp_path)
    (tmp_path / "AMI-BR.csv").write_bytes(b"")
    with pytest.raises(MitobenchError, match=r"AMI-BR\.csv: cannot read this CSV"):
        load_amibr(tmp_path)
