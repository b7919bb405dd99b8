"""``mitobench data check`` and ``deduplicate``: synthetic fixtures, then the real data when present."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from fixtures import make_amibr, make_atnorm_br, make_atnorm_md, make_custom_folder, make_data_root, make_png
from mitobench.data.check import CheckResult, check_data, deduplicate, render_check
from mitobench.data.records import load_atnorm_br, load_custom
from mitobench.errors import MitobenchError

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def rendered(result: CheckResult) -> str:
    buffer = io.StringIO()
    render_check(result, console=Console(file=buffer, width=250, color_system=None))
    return buffer.getvalue()


def integrity(result: CheckResult) -> dict[str, tuple]:
    return {r.set: (r.images, r.unreadable, r.converted, r.duplicate_copies, r.unique, r.conflicting_groups)
            for r in result.integrity}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("MITOBENCH_QUIET", "1")


# --------------------------------------------------------------------------- synthetic data
def test_clean_root(tmp_path):
    make_data_root(tmp_path)
    result = check_data(tmp_path)
    assert result.ok, result.errors
    assert result.errors == [] and result.unreadable == [] and result.duplicate_groups == []
    assert result.absent_sets == []
    assert integrity(result) == {"AMi-Br-train": (50, 0, 0, 0, 50, 0), "AMi-Br-test": (15, 0, 0, 0, 15, 0),
                                 "AtNorM-Br": (12, 0, 0, 0, 12, 0), "AtNorM-MD": (9, 0, 0, 0, 9, 0)}
    counts = {(r.set, r.domain): (r.atypical, r.normal) for r in result.counts}
    # train: 10 slides x 5, odd slide numbers (TUPAC16) carry 2 atypical, even (MIDOG21) 1
    assert counts[("AMi-Br-train", "TUPAC16")] == (10, 15)
    assert counts[("AMi-Br-train", "MIDOG21")] == (5, 20)
    assert counts[("AtNorM-Br", "TCGA")] == (4, 8)
    assert counts[("AtNorM-MD", "MIDOG++")] == (3, 6)
    assert result.slide_overlap == []
    text = rendered(result)
    assert "OK" in text and "FAILED" not in text and "Atypical = 1" in text
    json.dumps(result.to_dict())  # serialisable for --json


def test_a_votes_file_that_misses_some_images_is_a_named_warning(tmp_path):
    make_data_root(tmp_path)
    votes = tmp_path / "AtNorM-MD_expert_votes.csv"
    lines = votes.read_text().splitlines()
    votes.write_text("\n".join(lines[:-2]) + "\n")  # the last two images lost their votes
    result = check_data(tmp_path)
    assert result.ok
    assert any(w.startswith("AtNorM-MD: 2 of 9 image(s) have no expert votes") for w in result.warnings)
    clean = tmp_path / "clean"
    make_data_root(clean)
    assert not any("expert votes" in w for w in check_data(clean).warnings)


def test_absent_holdout_is_named(tmp_path):
    make_amibr(tmp_path)
    result = check_data(tmp_path)
    assert result.ok
    assert result.absent_sets == ["AtNorM-Br", "AtNorM-MD"]
    assert "AtNorM-MD: not found" in rendered(result)


def test_atnorm_br_duplicates_are_warnings(tmp_path):
    make_data_root(tmp_path, duplicates=True)
    result = check_data(tmp_path)
    assert result.ok, result.errors  # the known defect of AtNorM-Br does not fail the check
    # 15 images: Normal/90 copies Normal/5 (same label), Normal/91 + /92 copy Atypical/1 (conflict)
    assert integrity(result)["AtNorM-Br"] == (15, 0, 0, 3, 12, 1)
    [conflict] = result.conflicting_groups
    assert conflict.members == [("AtNorM-Br", "Atypical/1.png"), ("AtNorM-Br", "Normal/91.png"),
                                ("AtNorM-Br", "Normal/92.png")]
    assert conflict.labels == [1, 0, 0]
    assert len(result.duplicate_groups) == 2
    assert any("conflicting labels" in w and "Atypical/1.png" in w and "mitobench run --dedup" in w
               for w in result.warnings)
    assert "Normal/91.png" in rendered(result)
    assert result.pixel_duplicate_groups == []  # byte-identical copies are exact duplicates only


def test_conflicting_duplicates_elsewhere_fail(tmp_path):
    folder = make_custom_folder(tmp_path / "mine")
    (folder / "Normal" / "copy.png").write_bytes((folder / "Atypical" / "1.png").read_bytes())
    result = check_data(datasets={"mine": load_custom(folder)})
    assert not result.ok
    assert any("conflicting labels" in e and "mine:Atypical/1.png" in e for e in result.errors)
    assert "FAILED" in rendered(result)


def test_unreadable_images_are_collected(tmp_path):
    make_data_root(tmp_path)
    corrupt = tmp_path / "AMi-Br" / "Normal" / "MIDOG21_60.png"  # a test-split image
    assert corrupt.is_file()
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # truncated PNG
    garbage = tmp_path / "AtNorM-MD" / "Normal" / "4.png"
    garbage.write_bytes(b"not an image at all")
    wrong_size = tmp_path / "AtNorM-Br" / "Normal" / "5.png"
    make_png(wrong_size, size=64)
    result = check_data(tmp_path)
    assert not result.ok
    bad = {(b.set, Path(b.path).name) for b in result.unreadable}
    assert bad == {("AMi-Br-test", "MIDOG21_60.png"), ("AtNorM-MD", "4.png"), ("AtNorM-Br", "5.png")}
    for b in result.unreadable:
        assert b.path in b.error  # every message names its file
    assert any("64x64" in b.error for b in result.unreadable)
    assert integrity(result)["AMi-Br-test"][1] == 1
    assert "Unreadable images" in rendered(result)


def test_grayscale_and_rgba_are_converted_with_warning(tmp_path):
    make_data_root(tmp_path)
    make_png(tmp_path / "AtNorM-Br" / "Normal" / "5.png", rgb=(10, 20, 30), mode="L")
    make_png(tmp_path / "AtNorM-Br" / "Normal" / "6.png", rgb=(10, 20, 30), mode="RGBA")
    result = check_data(tmp_path)
    assert result.ok, result.errors
    assert sorted(Path(b.path).name for b in result.converted) == ["5.png", "6.png"]
    assert integrity(result)["AtNorM-Br"][2] == 2
    assert any("converted" in w for w in result.warnings)


def test_slide_overlap_fails(tmp_path):
    fx = make_amibr(tmp_path)
    labels = pd.read_csv(tmp_path / "AMI-BR.csv", dtype=str, keep_default_na=False)
    moved = fx.test[0]
    labels.loc[labels["uid"] == str(moved["uid"]), "slide"] = fx.train[0]["slide"]
    labels.to_csv(tmp_path / "AMI-BR.csv", index=False)
    result = check_data(tmp_path)
    assert result.slide_overlap == [fx.train[0]["slide"]]
    assert not result.ok
    assert any("slide-disjoint" in e for e in result.errors)


def root_with_every_set(tmp_path: Path):
    """A data root with AMi-Br, AtNorM-Br and AtNorM-MD; returns the fixture, its first training row and its file."""
    fx = make_amibr(tmp_path)
    make_atnorm_br(tmp_path)
    make_atnorm_md(tmp_path)
    first = fx.train[0]
    return fx, first, tmp_path / "AMi-Br" / first["final_label"] / first["dataset_uid"]


def test_train_image_in_holdout_fails(tmp_path):
    fx, first, train_image = root_with_every_set(tmp_path)
    (tmp_path / "AtNorM-Br" / first["final_label"] / "99.png").write_bytes(train_image.read_bytes())
    test_image = tmp_path / "AMi-Br" / fx.test[0]["final_label"] / fx.test[0]["dataset_uid"]
    (tmp_path / "AtNorM-MD" / fx.test[0]["final_label"] / "99.png").write_bytes(test_image.read_bytes())
    result = check_data(tmp_path)
    assert not result.ok
    [leak] = result.train_holdout_duplicates
    assert leak.members == [("AMi-Br-train", first["dataset_uid"]), ("AtNorM-Br", f"{first['final_label']}/99.png")]
    assert any("hold-out" in e and "leaky" in e for e in result.errors)
    # a copy shared by two hold-out sets is a warning
    assert any("more than one hold-out set" in w for w in result.warnings)


def reencode(source: Path, target: Path) -> Path:
    """Re-save ``source`` with Pillow (other compression, a text chunk): same decoded pixels, different bytes."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "re-encoded for a test")
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as img:
        img.save(target, format="PNG", compress_level=0, pnginfo=info)
    assert target.read_bytes() != source.read_bytes()
    return target


def test_reencoded_train_image_in_holdout_fails(tmp_path):
    _, first, train_image = root_with_every_set(tmp_path)
    reencode(train_image, tmp_path / "AtNorM-Br" / first["final_label"] / "99.png")
    result = check_data(tmp_path)
    assert not result.ok
    assert result.train_holdout_duplicates == []  # not byte-identical ...
    [leak] = result.train_holdout_pixel_duplicates  # ... but the same pixels: leakage all the same
    assert leak.members == [("AMi-Br-train", first["dataset_uid"]), ("AtNorM-Br", f"{first['final_label']}/99.png")]
    assert not leak.conflicting
    [error] = [e for e in result.errors if "leaky" in e]
    assert "re-encoded" in error
    assert f"AMi-Br-train:{first['dataset_uid']}" in error and f"AtNorM-Br:{first['final_label']}/99.png" in error
    text = rendered(result)
    assert "FAILED" in text and "train/hold-out leak" in text
    json.dumps(result.to_dict())

    # and the command exits non-zero
    from typer.testing import CliRunner

    from mitobench.cli import app

    run = CliRunner().invoke(app, ["data", "check", "--data-root", str(tmp_path)])
    assert run.exit_code == 1, run.output
    assert "FAILED" in run.output


def test_reencoded_copy_within_holdout_is_a_named_warning(tmp_path):
    make_data_root(tmp_path)
    reencode(tmp_path / "AtNorM-Br" / "Normal" / "5.png", tmp_path / "AtNorM-Br" / "Normal" / "99.png")
    result = check_data(tmp_path)
    assert result.ok, result.errors
    assert result.duplicate_groups == [] and result.train_holdout_pixel_duplicates == []
    [group] = result.pixel_duplicate_groups
    assert group.members == [("AtNorM-Br", "Normal/5.png"), ("AtNorM-Br", "Normal/99.png")]
    assert group.labels == [0, 0] and not group.conflicting
    [warning] = [w for w in result.warnings if "identical pixels" in w]
    assert "AtNorM-Br:Normal/5.png" in warning and "AtNorM-Br:Normal/99.png" in warning
    assert "OK" in rendered(result)


def test_reencoded_copy_of_test_image_in_other_holdout_is_a_warning(tmp_path):
    fx = make_amibr(tmp_path)
    make_atnorm_md(tmp_path)
    row = fx.test[0]
    reencode(tmp_path / "AMi-Br" / row["final_label"] / row["dataset_uid"],
             tmp_path / "AtNorM-MD" / row["final_label"] / "99.png")
    result = check_data(tmp_path)
    assert result.ok, result.errors  # no training image involved: not leakage
    assert any("identical pixels" in w and f"AMi-Br-test:{row['dataset_uid']}" in w for w in result.warnings)


def test_cli_checks_the_user_s_own_set_for_leakage(tmp_path):
    from typer.testing import CliRunner

    from mitobench.cli import app

    _, first, train_image = root_with_every_set(tmp_path / "root")
    mine = make_custom_folder(tmp_path / "mine")
    reencode(train_image, mine / first["final_label"] / "resaved.png")
    runner = CliRunner()
    clean = runner.invoke(app, ["data", "check", "--data-root", str(tmp_path / "root")])
    assert clean.exit_code == 0, clean.output
    leaky = runner.invoke(app, ["data", "check", "--data-root", str(tmp_path / "root"), "--dataset", str(mine)],
                          env={"COLUMNS": "1000"})
    assert leaky.exit_code == 1, leaky.output
    assert f"mine:{first['final_label']}/resaved.png" in leaky.output and "leaky" in leaky.output
    # a set named like a built-in one, or two sets of one name, are refused (the CLI prints the error, exit 2)
    taken = runner.invoke(app, ["data", "check", "--data-root", str(tmp_path / "root"),
                                "--dataset", str(make_custom_folder(tmp_path / "AtNorM-Br"))])
    assert isinstance(taken.exception, MitobenchError) and "already taken by a built-in set" in str(taken.exception)
    twice = runner.invoke(app, ["data", "check", "--data-root", str(tmp_path / "root"),
                                "--dataset", str(mine), "--dataset", str(mine)])
    assert isinstance(twice.exception, MitobenchError) and "already taken by another --dataset" in str(twice.exception)


def test_reencoded_copies_with_conflicting_labels(tmp_path):
    # in the user's own data: an error, as for exact duplicates
    folder = make_custom_folder(tmp_path / "mine")
    reencode(folder / "Atypical" / "1.png", folder / "Normal" / "copy.png")
    result = check_data(datasets={"mine": load_custom(folder)})
    assert not result.ok
    [group] = result.conflicting_pixel_groups
    assert group.labels == [1, 0]
    assert any("conflicting labels" in e and "mine:Atypical/1.png" in e and "mine:Normal/copy.png" in e
               for e in result.errors)
    # inside AtNorM-Br (known label defects): a warning, as for exact duplicates
    make_data_root(tmp_path / "root")
    br = tmp_path / "root" / "AtNorM-Br"
    reencode(br / "Atypical" / "1.png", br / "Normal" / "99.png")
    result = check_data(tmp_path / "root")
    assert result.ok, result.errors
    assert any("conflicting labels" in w and "AtNorM-Br:Normal/99.png" in w and "--dedup" in w
               for w in result.warnings)


def test_dataset_that_cannot_load_is_an_error(tmp_path):
    make_data_root(tmp_path)
    (tmp_path / "amibr_train_split.csv").unlink()
    result = check_data(tmp_path)
    assert not result.ok
    assert "AMi-Br" in result.load_errors and "amibr_train_split.csv" in result.load_errors["AMi-Br"]
    assert "AMi-Br-test" not in result.absent_sets  # reported as an error, not as absent
    assert integrity(result).keys() == {"AtNorM-Br", "AtNorM-MD"}


def test_no_dataset(tmp_path):
    with pytest.raises(MitobenchError, match="holds none of"):
        check_data(tmp_path)
    with pytest.raises(MitobenchError, match="does not exist"):
        check_data(tmp_path / "nowhere")


def test_deduplicate(tmp_path):
    make_atnorm_br(tmp_path, duplicates=True)
    records = load_atnorm_br(tmp_path)
    assert len(records) == 15
    out = deduplicate(records)
    kept = set(out["image"])
    # same-label copy: first kept, later copy dropped; conflicting group: every member dropped
    assert "Normal/5.png" in kept and "Normal/90.png" not in kept
    assert not kept & {"Atypical/1.png", "Normal/91.png", "Normal/92.png"}
    assert len(out) == 11
    assert list(out.columns) == list(records.columns)
    assert out.index.tolist() == list(range(11))
    # record order is preserved
    assert out["image"].tolist() == [i for i in records["image"] if i in kept]


def test_deduplicate_drops_reencoded_copies(tmp_path):
    # what `data check` names as re-encoded copies, --dedup drops like byte-identical ones
    make_atnorm_br(tmp_path)
    br = tmp_path / "AtNorM-Br"
    reencode(br / "Normal" / "5.png", br / "Normal" / "97.png")  # same label: keep the first
    reencode(br / "Atypical" / "1.png", br / "Normal" / "98.png")  # conflicting labels: drop both
    (br / "Normal" / "99.png").write_bytes((br / "Normal" / "97.png").read_bytes())  # a byte copy of the copy
    records = load_atnorm_br(tmp_path)
    assert len(records) == 15
    out = deduplicate(records)
    kept = set(out["image"])
    assert "Normal/5.png" in kept and not kept & {"Normal/97.png", "Normal/98.png", "Normal/99.png",
                                                   "Atypical/1.png"}
    assert len(out) == 11
    assert out["image"].tolist() == [i for i in records["image"] if i in kept]
    # the hashes `data check` computed give the same answer without reading the files again
    from mitobench.data.check import image_hashes

    pd.testing.assert_frame_equal(deduplicate(records, image_hashes(records)), out)


def test_deduplicate_without_duplicates_is_identity(tmp_path):
    make_atnorm_br(tmp_path)
    records = load_atnorm_br(tmp_path)
    pd.testing.assert_frame_equal(deduplicate(records), records)


# --------------------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def real_result():
    if not (REAL_DATA / "AMi-Br").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return check_data(REAL_DATA)


def test_real_data_counts(real_result):
    totals: dict[str, list[int]] = {}
    for row in real_result.counts:
        t = totals.setdefault(row.set, [0, 0])
        t[0] += row.atypical
        t[1] += row.normal
    assert totals["AMi-Br-train"] == [648, 2246]  # 2,894
    assert totals["AMi-Br-test"] == [184, 642]  # 826
    assert totals["AtNorM-Br"] == [128, 618]  # 746
    assert sum(totals["AMi-Br-train"]) + sum(totals["AMi-Br-test"]) == 3720
    assert {r.domain for r in real_result.counts if r.set.startswith("AMi-Br")} == {"MIDOG21", "TUPAC16"}


def test_real_data_integrity(real_result):
    assert real_result.ok, real_result.errors
    assert real_result.unreadable == [] and real_result.converted == []
    assert real_result.slide_overlap == []
    assert real_result.slides == {"AMi-Br-train": 146, "AMi-Br-test": 56}
    text = rendered(real_result)
    assert "AMi-Br slides: 146 train, 56 test; shared by both: none" in text
    assert "Re-encoded copies (different files, identical pixels): none" in text
    assert real_result.train_holdout_duplicates == [] and real_result.train_holdout_pixel_duplicates == []
    assert real_result.pixel_duplicate_groups == []  # no re-encoded copies in the public data
    rows = {r.set: r for r in real_result.integrity}
    assert (rows["AtNorM-Br"].images, rows["AtNorM-Br"].duplicate_copies, rows["AtNorM-Br"].unique) == (746, 35, 711)
    assert rows["AMi-Br-train"].duplicate_copies == rows["AMi-Br-test"].duplicate_copies == 0
    conflicts = sorted(sorted(img for _, img in g.members) for g in real_result.conflicting_groups)
    assert conflicts == [
        ["Atypical/390.png", "Normal/391.png", "Normal/398.png", "Normal/404.png", "Normal/410.png"],
        ["Atypical/428.png", "Normal/425.png"],
    ]
    assert len([w for w in real_result.warnings if "conflicting labels" in w]) == 2


def test_real_data_deduplicate():
    if not (REAL_DATA / "AtNorM-Br").is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    records = load_atnorm_br(REAL_DATA)
    out = deduplicate(records)
    # 711 unique images, minus the 2 conflicting groups dropped entirely
    assert len(out) == 709
    assert not set(out["image"]) & {"Atypical/390.png", "Normal/391.png", "Atypical/428.png", "Normal/425.png"}
