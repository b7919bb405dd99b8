"""The decoded patch cache and the embedding cache: decode/extract once, content keys, corruption, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mitobench.data.cache as patch_cache_mod
import mitobench.embed as embed_mod
from fixtures import make_atnorm_br, make_png
from mitobench.data.cache import PatchCache
from mitobench.data.images import ImageModeWarning, decode_patch, read_patch
from mitobench.data.records import load_atnorm_br
from mitobench.embed import EmbeddingCache, embedding_key
from mitobench.errors import MitobenchError
from mitobench.io import atomic_save_npy, atomic_write, atomic_write_json
from mitobench.models.registry import Backbone, create_backbone, replace_card


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def records(tmp_path):
    make_atnorm_br(tmp_path / "data", n_atypical=3, n_normal=5)
    return load_atnorm_br(tmp_path / "data")


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []

    def counting(path, patch_size=128):
        calls.append(path)
        return read_patch(path, patch_size)

    monkeypatch.setattr(patch_cache_mod, "read_patch", counting)
    return calls


# -- patch cache -----------------------------------------------------------------------------------

def test_patch_cache_decodes_once(tmp_path, records, count_decodes, monkeypatch):
    cache = PatchCache(tmp_path / "cache")
    first, key = cache.load(records, "AtNorM-Br")
    assert len(count_decodes) == len(records)
    assert first.shape == (len(records), 128, 128, 3) and first.dtype == np.uint8
    for i, path in enumerate(records["path"]):  # row order = record order
        assert (first[i] == decode_patch(path)).all()

    def refuse(*args, **kwargs):
        raise AssertionError("decoded a PNG again")

    monkeypatch.setattr(patch_cache_mod, "read_patch", refuse)
    second, key2 = PatchCache(tmp_path / "cache").load(records, "AtNorM-Br")
    assert key2 == key
    assert isinstance(second, np.memmap) and not second.flags.writeable
    assert (np.asarray(second) == np.asarray(first)).all()
    assert not temp_files(tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "patches" / f"{key}.json").read_text())
    assert meta["files"] == records["path"].tolist()


def test_conversions_while_decoding_in_threads_are_one_warning_and_leave_warnings_working(tmp_path, records):
    """Images converted to RGB in the decoding threads give one summary warning, and later warnings still reach
    the user (``warnings.catch_warnings`` in threads once left the process's warning display swapped out)."""
    import warnings

    from fixtures import make_png as png

    for i in (0, 3):
        png(Path(records["path"].iloc[i]), rgb=(90, 90, 90), mode="L")
    display = warnings._showwarnmsg_impl  # what shows a warning to the user
    with pytest.warns(ImageModeWarning, match=r"2 image\(s\) converted to RGB, e\.g\. .*converted from L to RGB"):
        PatchCache(tmp_path / "cache", workers=4).load(records)
    assert warnings._showwarnmsg_impl is display


def test_patch_key_follows_file_bytes_and_order(tmp_path, records, count_decodes):
    cache = PatchCache(tmp_path / "cache")
    _, key = cache.load(records)
    # same file names, changed bytes -> new key, decoded again
    path = Path(records["path"].iloc[2])
    make_png(path, rgb=(1, 2, 3))
    arr, key2 = cache.load(records)
    assert key2 != key
    assert len(count_decodes) == 2 * len(records)
    assert (arr[2] == (1, 2, 3)).all()
    # re-ordered records -> another key
    _, key3 = cache.load(records.iloc[::-1])
    assert key3 not in (key, key2)
    # patch size is in the key
    assert patch_cache_mod.content_key(records["path"].tolist(), 64) != key2


def test_arrays_decoded_by_an_older_decoder_are_not_reused(records, tmp_path, count_decodes, monkeypatch):
    # a cache filled before a decoding fix (format 1 clipped 16-bit grey to white) must be decoded again
    current = patch_cache_mod.CACHE_FORMAT
    assert current >= 2
    monkeypatch.setattr(patch_cache_mod, "CACHE_FORMAT", 1)
    _, old_key = PatchCache(tmp_path / "cache").load(records)
    monkeypatch.setattr(patch_cache_mod, "CACHE_FORMAT", current)
    _, key = PatchCache(tmp_path / "cache").load(records)
    assert key != old_key
    assert len(count_decodes) == 2 * len(records)


def test_truncated_patch_entry_is_rebuilt(tmp_path, records, count_decodes):
    cache = PatchCache(tmp_path / "cache")
    good, key = cache.load(records)
    good = np.array(good)
    array_path = tmp_path / "cache" / "patches" / f"{key}.npy"
    data = array_path.read_bytes()
    array_path.write_bytes(data[: len(data) // 2])
    rebuilt, key2 = cache.load(records)
    assert key2 == key
    assert len(count_decodes) == 2 * len(records)
    assert (np.asarray(rebuilt) == good).all()
    assert array_path.stat().st_size == len(data)


def test_missing_metadata_or_bit_flip_is_rebuilt(tmp_path, records, count_decodes):
    cache = PatchCache(tmp_path / "cache")
    good, key = cache.load(records)
    good = np.array(good)
    array_path = tmp_path / "cache" / "patches" / f"{key}.npy"
    meta_path = array_path.with_suffix(".json")
    meta_path.unlink()  # array without metadata = an interrupted write
    cache.load(records)
    assert len(count_decodes) == 2 * len(records)
    # a flipped bit keeps the size; verify=True checks the digest and rebuilds
    raw = bytearray(array_path.read_bytes())
    raw[-100] ^= 0xFF
    array_path.write_bytes(bytes(raw))
    rebuilt, _ = cache.load(records, verify=True)
    assert len(count_decodes) == 3 * len(records)
    assert (np.asarray(rebuilt) == good).all()


def corrupted_patch_cache(root, tmp_path, method="probe"):
    """A context built once on ``root`` (filling the patch cache), then one flipped byte in AtNorM-Br's cached
    array (same size: only the digest can tell): ``(config, sets, folds, the array as it was)``."""
    from mitobench.config import load_config
    from mitobench.protocol import build_context, load_sets
    from mitobench.splits import paper_folds

    config = load_config(None, {"data_root": str(root), "cache_dir": str(tmp_path / "cache"), "method": method})
    sets, _ = load_sets(config)
    folds = paper_folds(sets["AMi-Br-train"], config.n_folds, config.seed)
    key = build_context(config, sets, folds).patch_keys["AtNorM-Br"]
    array_path = tmp_path / "cache" / "patches" / f"{key}.npy"
    good = np.load(array_path)
    raw = bytearray(array_path.read_bytes())
    raw[-100] ^= 0xFF
    array_path.write_bytes(bytes(raw))
    return config, sets, folds, good


@pytest.mark.parametrize("method, rebuilt", [("finetune", True), ("probe", False)])
def test_training_runs_verify_the_cached_pixels(fixture_root, tmp_path, method, rebuilt):
    """A training run reads every pixel, so it checks the digest (a warm probe run never reads them)."""
    from mitobench.protocol import build_context

    config, sets, folds, good = corrupted_patch_cache(fixture_root, tmp_path, method)
    patches = np.asarray(build_context(config, sets, folds).patches["AtNorM-Br"])
    assert (patches == good).all() == rebuilt


def test_a_cold_probe_embeds_verified_pixels(fixture_root, tmp_path):
    """A probe that must embed a set reads every pixel and caches the result for good: it checks the patches'
    digest first, so a same-size corruption of the patch cache is rebuilt, not embedded."""
    from mitobench.methods.probe import ProbeMethod
    from mitobench.protocol import build_context

    config, sets, folds, good = corrupted_patch_cache(fixture_root, tmp_path)
    ctx = build_context(config, sets, folds)  # a probe run does not verify up front (a warm run reads no pixel)
    assert not (np.asarray(ctx.patches["AtNorM-Br"]) == good).all()
    method = ProbeMethod(config)
    method.prepare(ctx)  # nothing embedded yet: embeds every set, from verified patches
    assert (np.asarray(ctx.patches["AtNorM-Br"]) == good).all()


# -- atomic writes ---------------------------------------------------------------------------------

def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "file.npy"

    def broken(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []
    # an existing file is replaced whole or not at all
    atomic_save_npy(target, np.arange(5))
    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert (np.load(target) == np.arange(5)).all()
    atomic_write_json(tmp_path / "out" / "x.json", {"a": 1})
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"a": 1}
    assert not temp_files(tmp_path)


# -- embedding cache -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_backbone():
    """EfficientNet-Lite0 with its package weights, at 32 px input so extraction is instant."""
    backbone = create_backbone("efficientnet_lite0")
    backbone.card = replace_card(backbone.card, input_size=32)
    return backbone


@pytest.fixture
def patches():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)


@pytest.fixture
def count_extracts(monkeypatch):
    calls = []
    real = embed_mod.extract

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_mod, "extract", counting)
    return calls


def test_random_init_features_are_never_cached(tmp_path, patches, count_extracts):
    """Each random-init build draws other weights: caching its features under one id would mix two networks'."""
    from mitobench.models.registry import build_model, get_card

    card = replace_card(get_card("efficientnet_lite0"), input_size=32)
    backbone = Backbone(build_model(card).eval(), card, "random-init", "random init")
    cache = EmbeddingCache(tmp_path / "cache")
    cache.get(backbone, patches, "patchkey", batch_size=4)
    cache.get(backbone, patches, "patchkey", batch_size=4)
    assert len(count_extracts) == 2 and not (tmp_path / "cache" / "embeddings").exists()
    assert cache.lookup(card, "random-init", "patchkey", len(patches), "float32") is None


def test_metadata_that_is_not_an_object_is_rebuilt(tmp_path, tiny_backbone, patches, records, count_extracts):
    cache = EmbeddingCache(tmp_path / "cache")
    cache.get(tiny_backbone, patches, "patchkey", batch_size=4)
    (meta,) = (tmp_path / "cache" / "embeddings").rglob("*.json")
    meta.write_text("[]")
    cache.get(tiny_backbone, patches, "patchkey", batch_size=4)
    assert len(count_extracts) == 2
    patch_cache = PatchCache(tmp_path / "cache")
    _, key = patch_cache.load(records)
    (tmp_path / "cache" / "patches" / f"{key}.json").write_text("[1]")
    rebuilt, _ = patch_cache.load(records)
    assert rebuilt.shape[0] == len(records)


def test_embedding_cache_extracts_once(tmp_path, tiny_backbone, patches, count_extracts):
    cache = EmbeddingCache(tmp_path / "cache")
    feats = cache.get(tiny_backbone, patches, "patchkey", batch_size=4)
    assert feats.shape == (6, tiny_backbone.embed_dim) == (6, 1280) and feats.dtype == np.float32
    again = EmbeddingCache(tmp_path / "cache").get(tiny_backbone, patches, "patchkey", batch_size=4)
    assert len(count_extracts) == 1
    assert (again == feats).all()
    # batching does not change the features
    direct = embed_mod.extract(tiny_backbone, patches, batch_size=6)
    np.testing.assert_allclose(direct, feats, rtol=1e-4, atol=1e-5)
    assert not temp_files(tmp_path / "cache")
    metas = list((tmp_path / "cache" / "embeddings").rglob("*.json"))
    assert len(metas) == 1
    meta = json.loads(metas[0].read_text())
    assert meta["weights"] == tiny_backbone.weights_id != "random-init"


def test_embedding_key_covers_recipe(tiny_backbone):
    base = embedding_key(tiny_backbone, "p", torch.float32)
    other_weights = Backbone(tiny_backbone.model, tiny_backbone.card, "0123456789abcdef", "other file")
    other_size = Backbone(tiny_backbone.model, replace_card(tiny_backbone.card, input_size=48),
                          tiny_backbone.weights_id, "")
    other_norm = Backbone(tiny_backbone.model, replace_card(tiny_backbone.card, mean=(0.5, 0.5, 0.5)),
                          tiny_backbone.weights_id, "")
    other_interp = Backbone(tiny_backbone.model, replace_card(tiny_backbone.card, interpolation="bicubic"),
                            tiny_backbone.weights_id, "")
    keys = {
        base,
        embedding_key(other_weights, "p", torch.float32),
        embedding_key(other_size, "p", torch.float32),
        embedding_key(other_norm, "p", torch.float32),
        embedding_key(other_interp, "p", torch.float32),
        embedding_key(tiny_backbone, "p", torch.bfloat16),
        embedding_key(tiny_backbone, "q", torch.float32),
    }
    assert len(keys) == 7
    assert embedding_key(tiny_backbone, "p", torch.float32) == base  # deterministic


def test_embedding_cache_new_entry_per_recipe(tmp_path, tiny_backbone, patches, count_extracts):
    cache = EmbeddingCache(tmp_path / "cache")
    a = cache.get(tiny_backbone, patches, "k", batch_size=8)
    other = Backbone(tiny_backbone.model, replace_card(tiny_backbone.card, input_size=40), tiny_backbone.weights_id, "")
    b = cache.get(other, patches, "k", batch_size=8)
    assert len(count_extracts) == 2
    assert not np.allclose(a, b)
    renamed = Backbone(tiny_backbone.model, tiny_backbone.card, "another-weights", "")
    cache.get(renamed, patches, "k", batch_size=8)
    cache.get(tiny_backbone, patches, "k", batch_size=8, dtype=torch.bfloat16)
    assert len(count_extracts) == 4
    assert len(list((tmp_path / "cache" / "embeddings").rglob("*.npy"))) == 4
    cache.get(tiny_backbone, patches, "k", batch_size=8)  # the first entry is still there
    assert len(count_extracts) == 4


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "garbage"])
def test_corrupt_embedding_entry_is_rebuilt(tmp_path, tiny_backbone, patches, count_extracts, damage):
    cache = EmbeddingCache(tmp_path / "cache")
    feats = cache.get(tiny_backbone, patches, "k", batch_size=8)
    (array_path,) = list((tmp_path / "cache" / "embeddings").rglob("*.npy"))
    raw = bytearray(array_path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 1000]
    elif damage == "bitflip":
        raw[-7] ^= 0x10
    else:
        raw = bytearray(b"not an npy file")
    array_path.write_bytes(bytes(raw))
    again = cache.get(tiny_backbone, patches, "k", batch_size=8)
    assert len(count_extracts) == 2
    np.testing.assert_allclose(again, feats, rtol=1e-5, atol=1e-6)
    # the rebuilt entry is whole again: a third call reads it
    cache.get(tiny_backbone, patches, "k", batch_size=8)
    assert len(count_extracts) == 2
    assert not temp_files(tmp_path / "cache")


def test_wrong_length_entry_is_not_served(tmp_path, tiny_backbone, patches, count_extracts):
    cache = EmbeddingCache(tmp_path / "cache")
    cache.get(tiny_backbone, patches, "k", batch_size=8)
    (array_path,) = list((tmp_path / "cache" / "embeddings").rglob("*.npy"))
    meta_path = array_path.with_suffix(".json")
    short = np.load(array_path)[:3]
    atomic_save_npy(array_path, short)  # well formed, but stale
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = __import__("hashlib").sha256(short.tobytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    out = cache.get(tiny_backbone, patches, "k", batch_size=8)
    assert out.shape[0] == len(patches) and len(count_extracts) == 2


def test_unchanged_files_are_not_read_again_for_the_key(tmp_path, records, monkeypatch):
    """The second load finds the key through the files' stat; a rewritten file is hashed again."""
    cache = PatchCache(tmp_path / "cache")
    _, key = cache.load(records)
    hashed = []
    real = patch_cache_mod.content_key
    monkeypatch.setattr(patch_cache_mod, "content_key", lambda paths, size: hashed.append(1) or real(paths, size))
    _, again = cache.load(records)
    assert again == key and not hashed
    make_png(Path(records["path"].iloc[0]), rgb=(9, 9, 9))
    _, changed = cache.load(records)
    assert hashed and changed != key
    # a corrupt memo is not trusted: the key is computed from the bytes again
    for memo in (tmp_path / "cache" / "patches" / "by-stat").glob("*.json"):
        memo.write_text("{")
    hashed.clear()
    _, recomputed = cache.load(records)
    assert hashed and recomputed == changed


def test_backbone_identity_without_a_build(tmp_path):
    """The weights id a warm run computes without building equals the one the build gives."""
    from safetensors.torch import save_file

    from mitobench.models.registry import backbone_identity

    assert backbone_identity("efficientnet_lite0") == create_backbone("efficientnet_lite0").weights_id != "random-init"
    assert backbone_identity("timm/resnet18") == "random-init"
    model = create_backbone("timm/resnet18").model
    file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    assert backbone_identity("timm/resnet18", file) == create_backbone("timm/resnet18", file).weights_id
    assert backbone_identity("uni") is None or backbone_identity("uni") == create_backbone("uni").weights_id


def test_lookup_finds_what_get_stored(tiny_backbone, patches, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    assert cache.lookup(tiny_backbone.card, tiny_backbone.weights_id, "pk", len(patches), torch.float32) is None
    stored = cache.get(tiny_backbone, patches, "pk", batch_size=4)
    found = cache.lookup(tiny_backbone.card, tiny_backbone.weights_id, "pk", len(patches), torch.float32)
    np.testing.assert_array_equal(found, stored)
    assert cache.lookup(tiny_backbone.card, "0123456789abcdef", "pk", len(patches), torch.float32) is None
    # the warm path names the dtype as a string (no torch): the same key
    np.testing.assert_array_equal(cache.lookup(tiny_backbone.card, tiny_backbone.weights_id, "pk", len(patches), "float32"),
                                  stored)
    assert embedding_key(tiny_backbone, "pk", "bf16") == embedding_key(tiny_backbone, "pk", torch.bfloat16)


def test_device_and_dtype_without_torch(monkeypatch):
    from mitobench.device import device_type, dtype_name, pick_device, pick_dtype

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert device_type("auto") == "cpu" and pick_device("auto") == torch.device("cpu")
    assert device_type("cuda:1") == "cuda"
    assert dtype_name("auto", "cpu", "float16") == "float32" and dtype_name("auto", "cuda", "float16") == "float16"
    assert pick_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(MitobenchError, match="unknown dtype 'half8'"):
        dtype_name("half8", "cpu")


def test_frozen_graph_matches_eager(tiny_backbone, patches):
    """The frozen TorchScript path (CPU, float32) gives eager mode's embeddings to float32 rounding, the
    padded last batch included (7 patches, batches of 4)."""
    many = np.concatenate([patches, patches[:1]])
    eager = embed_mod.extract(tiny_backbone, many, batch_size=4, freeze=False)
    frozen = embed_mod.extract(tiny_backbone, many, batch_size=4, freeze=True)
    assert frozen.shape == eager.shape == (7, 1280)
    np.testing.assert_allclose(frozen, eager, rtol=1e-4, atol=1e-5 * np.abs(eager).max())
    with torch.inference_mode():
        x = tiny_backbone.preprocess(torch.from_numpy(patches[:4])).contiguous(memory_format=torch.channels_last)
        assert isinstance(embed_mod.frozen_for_cpu(tiny_backbone, x), torch.jit.ScriptModule)


def test_frozen_graph_falls_back_to_eager_when_tracing_fails(tiny_backbone, patches, monkeypatch):
    def broken_trace(*args, **kwargs):
        raise RuntimeError("untraceable")

    monkeypatch.setattr(torch.jit, "trace", broken_trace)
    with torch.inference_mode():
        x = tiny_backbone.preprocess(torch.from_numpy(patches[:2]))
        assert embed_mod.frozen_for_cpu(tiny_backbone, x) is tiny_backbone
    assert embed_mod.extract(tiny_backbone, patches, batch_size=4).shape == (6, 1280)


def test_worker_processes_give_the_in_process_embeddings(tiny_backbone, monkeypatch, tmp_path):
    """Two single-threaded worker processes, kept across two datasets, return the same embeddings in order;
    an unguarded script (no ``if __name__ == '__main__'``) can use them."""
    from mitobench import embed_workers

    monkeypatch.setattr(embed_workers, "MIN_IMAGES_PER_WORKER", 4)
    monkeypatch.setattr(embed_workers, "CHUNK", 8)
    rng = np.random.default_rng(1)
    first, second = (rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8) for n in (21, 11))
    try:
        a = embed_mod.extract(tiny_backbone, first, workers=2)
        workers = list(embed_workers._STATE["workers"])
        b = embed_mod.extract(tiny_backbone, second, workers=2)
        assert embed_workers._STATE["workers"] == workers  # reused, not restarted
    finally:
        embed_mod.shutdown_workers()
    assert all(w.proc.poll() is not None for w in workers)  # stopped
    for got, patches in ((a, first), (b, second)):
        np.testing.assert_allclose(got, embed_mod.extract(tiny_backbone, patches, batch_size=4), rtol=1e-4, atol=1e-5)
    script = tmp_path / "unguarded.py"
    script.write_text("import numpy as np\nimport mitobench.embed_workers as w\nfrom mitobench.embed import extract\n"
                      "from mitobench.models.registry import create_backbone, replace_card\n"
                      "w.MIN_IMAGES_PER_WORKER = 2\nb = create_backbone('efficientnet_lite0')\n"
                      "b.card = replace_card(b.card, input_size=32)\n"
                      "x = np.zeros((6, 128, 128, 3), np.uint8)\nprint(extract(b, x, workers=2).shape)\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "(6, 1280)" in out.stdout, out.stderr[-2000:]


def test_worker_failure_falls_back_in_process(tiny_backbone, patches, monkeypatch, caplog):
    """A model that cannot be sent to a worker is embedded in this process, with a warning."""
    from mitobench import embed_workers

    monkeypatch.setattr(embed_workers, "MIN_IMAGES_PER_WORKER", 1)
    tiny_backbone.model.unpicklable = lambda: None  # lambdas do not pickle
    try:
        got = embed_mod.extract(tiny_backbone, patches, workers=2)
    finally:
        del tiny_backbone.model.unpicklable
    assert "embedding in this process" in caplog.text
    np.testing.assert_allclose(got, embed_mod.extract(tiny_backbone, patches), rtol=1e-4, atol=1e-5)
