"""Weights: resolution order (explicit path, $MITOBENCH_WEIGHTS mapping, HF cache, download against a
loopback fake Hub), safe strict loading and its error report. No network."""

from __future__ import annotations

import hashlib
import http.server
import json
import pickle
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mitobench.errors import MitobenchError
from mitobench.models import weights as W
from mitobench.models.registry import Backbone, build_model, create_backbone, get_card, replace_card

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    for var in ("MITOBENCH_WEIGHTS", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


def small_card(key="h0_mini", **extra):
    """A depth-2 replica of a real card (registers, SwiGLU, LayerScale kept)."""
    card = get_card(key)
    return replace_card(card, build_kwargs={**card.build_kwargs, "depth": 2, **extra})


def embed(model, card, seed=0):
    x = torch.randn(2, 3, card.input_size, card.input_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return Backbone(model.eval(), card, "x", "x")(x)


def params_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------ strict loading
def test_safetensors_file_and_snapshot_folder_load_identically(tmp_path):
    card = small_card()
    src = build_model(card)
    state = src.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    snap = tmp_path / "snap"
    snap.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({
        "architecture": card.arch, "model_args": {"img_size": 224, "depth": 2, "mlp_ratio": 5.33334, "reg_tokens": 4,
                                                  "init_values": 1e-5, "embed_dim": 768, "num_heads": 12},
        "pretrained_cfg": {"mean": list(card.mean), "std": list(card.std), "interpolation": "bicubic"}}))
    a, b = build_model(card), build_model(card)
    id_a, src_a = W.load_weights_strict(a, tmp_path / "w.safetensors", card)
    id_b, src_b = W.load_weights_strict(b, snap, card)
    want = embed(src, card)
    torch.testing.assert_close(embed(a, card), want, rtol=0, atol=0)
    torch.testing.assert_close(embed(b, card), want, rtol=0, atol=0)
    assert id_a == id_b == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()[:16]
    assert "model.safetensors" in src_b


def test_create_backbone_with_explicit_weights(tmp_path):
    card = get_card("lunit_vits16")
    src = build_model(card)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "lunit.safetensors")
    bb = create_backbone("lunit_vits16", weights=tmp_path / "lunit.safetensors")
    assert bb.pretrained and len(bb.weights_id) == 16
    torch.testing.assert_close(embed(bb.model, card), embed(src, card), rtol=0, atol=0)


def test_bin_loads_with_weights_only_and_unwraps_containers(tmp_path, monkeypatch):
    card = small_card()
    src = build_model(card)
    wrapped = {"epoch": 3, "teacher": {f"backbone.{k}": v for k, v in src.state_dict().items()}}
    torch.save(wrapped, tmp_path / "pytorch_model.bin")
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = build_model(card)
    _, source = W.load_weights_strict(model, tmp_path / "pytorch_model.bin", card)
    assert seen == [True]
    assert "unwrapped 'teacher'" in source and "stripped 'backbone.'" in source
    torch.testing.assert_close(embed(model, card), embed(src, card), rtol=0, atol=0)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(MitobenchError, match="weights_only=True"):
        W.load_weights_strict(build_model(small_card()), tmp_path / "evil.pth", small_card())
    with pytest.raises(MitobenchError, match="weights_only=True"):
        W.check_weights_fit(tmp_path / "evil.pth", small_card())


def run_printed_conversion(message: str, folder: Path, card):
    """Run the ``python -c "..."`` an error message offers, in ``folder``; load its OUT.safetensors strictly."""
    import re
    import subprocess
    import sys

    command = re.search(r'python -c "(.*?)"', message).group(1)
    subprocess.run([sys.executable, "-c", command], cwd=folder, check=True, capture_output=True)
    model = build_model(card)
    W.load_weights_strict(model, folder / "OUT.safetensors", card)
    return model


@pytest.mark.parametrize("saved", ["whole model", "model in a dict"])
def test_a_pickled_model_gets_a_conversion_command_that_works(tmp_path, saved):
    """``torch.save(model)`` (common) pickles the module: the printed one-liner must turn it into safetensors."""
    card = small_card()
    source = build_model(card)
    torch.save(source if saved == "whole model" else {"model": source, "epoch": 3}, tmp_path / "whole.pth")
    with pytest.raises(MitobenchError, match="pickled Python objects") as err:
        W.load_weights_strict(build_model(card), tmp_path / "whole.pth", card)
    model = run_printed_conversion(str(err.value), tmp_path, card)
    torch.testing.assert_close(embed(model, card), embed(source, card), rtol=0, atol=0)


def test_torchscript_file_gets_a_conversion_command_that_works(tmp_path, monkeypatch):
    import warnings

    card = small_card()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(build_model(card)).save(str(tmp_path / "model.pt"))
    with pytest.raises(MitobenchError, match="TorchScript model, not a state dict") as err:
        W.load_weights_strict(build_model(card), tmp_path / "model.pt", card)
    run_printed_conversion(str(err.value), tmp_path, card)


def test_mismatched_checkpoint_is_one_clear_error_and_nothing_is_loaded(tmp_path):
    card = small_card()
    state = build_model(card).state_dict()
    del state["blocks.1.ls2.gamma"], state["blocks.0.attn.qkv.bias"]
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(3072, 768)  # plain-MLP shape instead of packed SwiGLU
    state["head.weight"] = torch.zeros(10, 768)
    save_file(state, tmp_path / "bad.safetensors")
    model = build_model(card)
    before = params_snapshot(model)
    with pytest.raises(W.WeightsMismatchError) as lazy:
        W.check_weights_fit(tmp_path / "bad.safetensors", card)  # header only, on the meta architecture
    with pytest.raises(W.WeightsMismatchError) as info:
        W.load_weights_strict(model, tmp_path / "bad.safetensors", card)
    err = info.value
    assert str(lazy.value) == str(err)
    msg = str(err)
    assert "bad.safetensors" in msg and "2 missing, 1 unexpected, 1 mis-shaped" in msg
    assert "blocks.1.ls2.gamma" in msg and "head.weight" in msg and "blocks.0.mlp.fc1.weight" in msg
    assert "SwiGLU" in msg  # a hint
    assert set(err.missing) == {"blocks.1.ls2.gamma", "blocks.0.attn.qkv.bias"}
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_one_wrong_key_is_not_called_another_model(tmp_path):
    card = small_card()
    state = build_model(card).state_dict()
    state["extra.weight"] = state.pop("blocks.1.attn.qkv.weight")
    save_file(state, tmp_path / "one.safetensors")
    with pytest.raises(W.WeightsMismatchError) as info:
        W.load_weights_strict(build_model(card), tmp_path / "one.safetensors", card)
    assert "1 missing, 1 unexpected" in str(info.value) and "almost nothing matches" not in str(info.value)
    foreign = {f"other.{k}": v for k, v in build_model(card).state_dict().items()}
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(W.WeightsMismatchError, match="almost nothing matches"):
        W.load_weights_strict(build_model(card), tmp_path / "foreign.safetensors", card)
    with pytest.raises(W.WeightsMismatchError, match="almost nothing matches"):
        W.check_weights_fit(tmp_path / "foreign.safetensors", card)


def test_a_model_prefix_on_every_key_is_stripped(tmp_path):
    """A state dict saved from a wrapper (mitobench's Backbone keeps the network as ``model``)."""
    card = small_card()
    source = build_model(card)
    save_file({f"model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "wrapped.safetensors")
    model = build_model(card)
    assert W.check_weights_fit(tmp_path / "wrapped.safetensors", card)
    W.load_weights_strict(model, tmp_path / "wrapped.safetensors", card)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), model.state_dict().values()))


def test_missing_layerscale_hint(tmp_path):
    card = small_card("uni")
    state = {k: v for k, v in build_model(card).state_dict().items() if ".ls" not in k}
    save_file(state, tmp_path / "uni.safetensors")
    with pytest.raises(MitobenchError, match="LayerScale"):
        W.load_weights_strict(build_model(card), tmp_path / "uni.safetensors", card)
    with pytest.raises(MitobenchError, match="LayerScale"):
        W.check_weights_fit(tmp_path / "uni.safetensors", card)


def test_conch_checkpoint_keeps_only_the_trunk(tmp_path):
    card = small_card("conch_v1")
    src = build_model(card)
    state = {f"visual.trunk.{k}": v for k, v in src.state_dict().items()}
    state.update({"text.token_embedding.weight": torch.zeros(4, 8), "visual.attn_pool_contrast.query": torch.zeros(1, 512),
                  "logit_scale": torch.zeros(())})
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = build_model(card)
    assert W.check_weights_fit(tmp_path / "pytorch_model.bin", card)  # a torch zip, memory-mapped
    W.load_weights_strict(model, tmp_path / "pytorch_model.bin", card)
    torch.testing.assert_close(embed(model, card), embed(src, card), rtol=0, atol=0)


def test_gpfm_github_teacher_layout(tmp_path):
    card = small_card("gpfm")
    src = build_model(card)
    state = {}
    for k, v in src.state_dict().items():  # chunked blocks, backbone prefix, mask token and DINO head
        k = k.replace("blocks.0.", "blocks.0.0.").replace("blocks.1.", "blocks.0.1.")
        state[f"backbone.{k}"] = v
    state["backbone.mask_token"] = torch.zeros(1, 1024)
    state["dino_head.mlp.0.weight"] = torch.zeros(4, 4)
    torch.save({"teacher": state}, tmp_path / "GPFM.pth")
    model = build_model(card)
    assert W.check_weights_fit(tmp_path / "GPFM.pth", card)
    W.load_weights_strict(model, tmp_path / "GPFM.pth", card)
    torch.testing.assert_close(embed(model, card), embed(src, card), rtol=0, atol=0)


def test_kaiko_l14_518_pos_embed_resampled_like_tridents_runtime(tmp_path):
    """Checkpoint at 518 px (37x37 grid): resampled once at load == TRIDENT's img_size=518 build at 224 px."""
    card = small_card("kaiko_vitl14")
    trident = build_model(replace_card(card, build_kwargs={**card.build_kwargs, "img_size": 518})).eval()
    assert trident.pos_embed.shape[1] == 37 * 37
    save_file({k: v.contiguous() for k, v in trident.state_dict().items()}, tmp_path / "model.safetensors")
    model = build_model(card)
    assert W.check_weights_fit(tmp_path / "model.safetensors", card)  # the resampling runs on meta tensors
    _, source = W.load_weights_strict(model, tmp_path / "model.safetensors", card)
    assert "resampled pos_embed 37x37 -> 16x16" in source
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(model.eval().forward_features(x), trident.forward_features(x))


def test_digest_is_cached(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert W.file_digest(f) == want
    monkeypatch.setattr(W.hashlib, "sha256", lambda *a: (_ for _ in ()).throw(AssertionError("rehashed")))
    assert W.file_digest(f) == want


# -------------------------------------------------------------------------------------- resolution
def fake_card(**changes):
    card = small_card("lunit_vits16")
    return replace_card(card, **{"hf_repo": "fake-org/fake-model",
                                 "weight_files": ("model.safetensors", "pytorch_model.bin"), **changes})


def test_mapping_file_named_by_env(tmp_path, monkeypatch):
    card = fake_card()
    save_file({k: v.contiguous() for k, v in build_model(card).state_dict().items()}, tmp_path / "mine.safetensors")
    mapping = tmp_path / "weights.yaml"
    mapping.write_text(f"{card.key}: mine.safetensors\nuni: /nowhere/uni.bin\n")
    monkeypatch.setenv("MITOBENCH_WEIGHTS", str(mapping))
    assert W.resolve_weights(card, allow_download=False) == tmp_path / "mine.safetensors"
    with pytest.raises(MitobenchError, match="does not exist"):
        W.resolve_weights(get_card("uni"), allow_download=False)
    monkeypatch.setenv("MITOBENCH_WEIGHTS", str(tmp_path / "absent.yaml"))
    with pytest.raises(MitobenchError, match="names no file"):
        W.resolve_weights(card, allow_download=False)


def test_a_timm_model_loads_the_users_mapped_or_given_imagenet_checkpoint(tmp_path, monkeypatch):
    """``timm/<name>`` has no Hub repo of its own: the mapping file ($MITOBENCH_WEIGHTS) names its weights like any
    card's, and a timm checkpoint with its ImageNet classifier (``fc.*``) loads, the classifier dropped."""
    import timm

    from mitobench.models.cards import RANDOM_INIT, backbone_identity

    source = timm.create_model("resnet18", pretrained=False)  # with its 1000-class fc
    torch.save(source.state_dict(), tmp_path / "resnet18_imagenet.pth")
    given = create_backbone("timm/resnet18", weights=tmp_path / "resnet18_imagenet.pth")
    trunk = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.testing.assert_close(given.model.state_dict(), trunk, rtol=0, atol=0)
    assert backbone_identity("timm/resnet18") == RANDOM_INIT and not create_backbone("timm/resnet18").pretrained
    (tmp_path / "weights.yaml").write_text(f"timm/resnet18: {tmp_path / 'resnet18_imagenet.pth'}\n")
    monkeypatch.setenv("MITOBENCH_WEIGHTS", str(tmp_path / "weights.yaml"))
    mapped = create_backbone("timm/resnet18")
    assert mapped.pretrained and mapped.weights_id == given.weights_id == backbone_identity("timm/resnet18")
    assert "mapping file" in mapped.weights_source or "resnet18_imagenet.pth" in mapped.weights_source


def test_a_checkpoint_that_is_no_state_dict_names_the_file_and_what_to_pass(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(MitobenchError, match=r"list\.pth: the checkpoint holds a list, not a state dict.*"
                                             r"torch\.save\(model\.state_dict\(\)\)"):
        create_backbone("lunit_vits16", weights=tmp_path / "list.pth")


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre():
    """A non-square image (``models check --image``) keeps its aspect, as the cards' official Resize + CenterCrop."""
    card = get_card("lunit_vits16")
    backbone = Backbone(build_model(replace_card(card, build_kwargs={**card.build_kwargs, "depth": 1})), card, "x", "x")
    wide = torch.zeros(1, 100, 300, 3, dtype=torch.uint8)
    wide[:, :, 100:200] = 255  # the middle third white: after resize + centre crop, all the model sees
    x = backbone.preprocess(wide)
    assert x.shape == (1, 3, card.input_size, card.input_size)
    white = (1 - torch.tensor(card.mean)) / torch.tensor(card.std)
    torch.testing.assert_close(x[0, :, 10:-10, 10:-10].mean((1, 2)), white, atol=1e-3, rtol=0)
    square = torch.randint(0, 256, (2, 128, 128, 3), dtype=torch.uint8)  # patches: as before, exactly
    expected = torch.nn.functional.interpolate(square.permute(0, 3, 1, 2).float() / 255, size=(card.input_size,) * 2,
                                               mode="bicubic" if card.interpolation == "bicubic" else "bilinear",
                                               align_corners=False, antialias=True)
    if card.interpolation == "bicubic":
        expected = expected.clamp(0, 1)
    mean, std = torch.tensor(card.mean)[:, None, None], torch.tensor(card.std)[:, None, None]
    assert card.resize is None  # the card resizes straight to its input size
    torch.testing.assert_close(backbone.preprocess(square), (expected - mean) / std)


def _fake_cache(tmp_path, card, with_ref=True) -> Path:
    repo = tmp_path / "hf-cache" / "models--fake-org--fake-model"
    snap = repo / "snapshots" / REV
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in build_model(card).state_dict().items()}, snap / "model.safetensors")
    if with_ref:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(REV)
    return snap / "model.safetensors"


@pytest.mark.parametrize("with_ref", [True, False])
def test_hf_cache_is_found_offline(tmp_path, with_ref):
    card = fake_card()
    path = _fake_cache(tmp_path, card, with_ref)
    found = W.resolve_weights(card, allow_download=False)
    assert found is not None and found.resolve() == path.resolve()
    model = build_model(card)
    W.load_weights_strict(model, found, card)


@pytest.mark.parametrize("with_ref", [True, False])
def test_an_unfinished_sharded_download_is_passed_over_and_named(tmp_path, with_ref):
    """A snapshot holding a sharded index with a shard missing: a complete file beside it is used; alone, the
    lookup says which shards are missing (not only "not on this machine")."""
    card = fake_card()
    complete = _fake_cache(tmp_path, card, with_ref)
    snap = complete.parent
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"a": torch.zeros(1)}, snap / "model-00001-of-00002.safetensors")
    card = replace_card(card, weight_files=("model.safetensors.index.json", "model.safetensors"))
    found = W.resolve_weights(card, allow_download=False)
    assert found is not None and found.resolve() == complete.resolve()
    complete.unlink()
    path, where = W.locate_weights(card)
    assert path is None and "model.safetensors.index.json but not its shards ['model-00002-of-00002.safetensors']" \
        in where and "--allow-download" in where


def test_nothing_found_and_no_download_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    card = fake_card()
    assert W.resolve_weights(card, allow_download=True) is None  # offline: never reaches the network
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert W.resolve_weights(card, allow_download=False) is None


class _FakeHub(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    gated: set[str] = set()
    failing: set[str] = set()  # repos whose every request gets HTTP 500
    requests: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, body: bool):
        self.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        # /{org}/{name}/resolve/{revision}/{filename}
        if len(parts) < 5 or parts[2] != "resolve":
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            return
        repo, fname = "/".join(parts[:2]), "/".join(parts[4:])
        if repo in self.failing:
            self.send_response(500)
            self.end_headers()
            return
        if repo in self.gated:
            self.send_response(403)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to this model is restricted")
            self.end_headers()
            return
        data = self.files.get(f"{repo}/{fname}")
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", REV)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", REV)
        self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)


@pytest.fixture()
def fake_hub(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "login", lambda *a, **k: pytest.fail("huggingface_hub.login() called"))
    _FakeHub.files, _FakeHub.gated, _FakeHub.failing, _FakeHub.requests = {}, set(), set(), []
    yield _FakeHub
    server.shutdown()
    server.server_close()


def test_download_from_loopback_hub(tmp_path, fake_hub):
    card = fake_card()
    src = build_model(card)
    blob = tmp_path / "blob.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, blob)
    # no model.safetensors in the repo: the resolver moves on to pytorch_model.bin
    buf = tmp_path / "blob.bin"
    torch.save(src.state_dict(), buf)
    fake_hub.files = {"fake-org/fake-model/pytorch_model.bin": buf.read_bytes(),
                      "fake-org/fake-model/config.json": json.dumps({"architecture": card.arch}).encode()}
    assert W.resolve_weights(card, allow_download=False) is None
    assert not fake_hub.requests  # no download unless allowed
    path = W.resolve_weights(card, allow_download=True)
    assert path is not None and path.name == "pytorch_model.bin"
    assert (tmp_path / "hf-cache" / "models--fake-org--fake-model" / "snapshots" / REV / "pytorch_model.bin").exists()
    assert any("model.safetensors" in r for r in fake_hub.requests)
    model = build_model(card)
    W.load_weights_strict(model, path, card)
    torch.testing.assert_close(embed(model, card), embed(src, card), rtol=0, atol=0)
    # now cached: found offline, no new request
    n = len(fake_hub.requests)
    assert W.resolve_weights(card, allow_download=False).resolve() == path.resolve()
    assert len(fake_hub.requests) == n


def test_download_of_gated_repo_explains_access(fake_hub):
    fake_hub.gated = {"fake-org/fake-model"}
    with pytest.raises(MitobenchError, match="HF_TOKEN"):
        W.resolve_weights(fake_card(gated=True), allow_download=True)


def test_download_from_an_unreachable_or_failing_hub_says_so(fake_hub, monkeypatch):
    """Not "the repo holds none of the files": huggingface_hub's no-connection error is a kind of EntryNotFoundError."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http.time, "sleep", lambda s: None)  # huggingface_hub's own retries, without their waits
    fake_hub.failing = {"fake-org/fake-model"}
    with pytest.raises(MitobenchError, match="could not reach|failed") as err:
        W.resolve_weights(fake_card(), allow_download=True)
    assert "holds none" not in str(err.value) and "--weights PATH" in str(err.value)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(MitobenchError, match="could not reach|failed") as err:
        W.resolve_weights(fake_card(), allow_download=True)
    assert "holds none" not in str(err.value)


def test_download_of_a_sharded_repo_with_a_missing_shard_names_it(fake_hub):
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    fake_hub.files = {"fake-org/fake-model/model.safetensors.index.json": json.dumps(index).encode(),
                      "fake-org/fake-model/model-00001-of-00002.safetensors": b"x"}
    with pytest.raises(MitobenchError, match="model-00002-of-00002.safetensors"):
        W.resolve_weights(fake_card(weight_files=("model.safetensors.index.json",)), allow_download=True)


def test_a_repo_that_ships_its_weights_in_shards_is_downloaded_and_loaded(tmp_path, fake_hub):
    """The card names model.safetensors; the repo holds model.safetensors.index.json and two shards instead."""
    card = fake_card()
    src = build_model(card)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    files = {}
    for shard, names in halves.items():
        save_file({k: state[k] for k in names}, tmp_path / shard)
        files[f"fake-org/fake-model/{shard}"] = (tmp_path / shard).read_bytes()
    index = {"weight_map": {k: shard for shard, names in halves.items() for k in names}}
    files["fake-org/fake-model/model.safetensors.index.json"] = json.dumps(index).encode()
    fake_hub.files = files
    path = W.resolve_weights(card, allow_download=True)
    assert path is not None and path.name == "model.safetensors.index.json"
    model = build_model(card)
    assert W.check_weights_fit(path, card)  # every shard's header
    W.load_weights_strict(model, path, card)
    torch.testing.assert_close(embed(model, card), embed(src, card), rtol=0, atol=0)
    assert W.resolve_weights(card, allow_download=False) is not None  # then found in the cache, offline


def test_config_json_that_is_not_utf8_is_one_clear_error(tmp_path):
    card = get_card("lunit_vits16")
    save_file({k: v.contiguous() for k, v in build_model(card).state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{\x00}\x00")  # UTF-16, as Windows PowerShell writes it
    with pytest.raises(MitobenchError, match="config.json is not valid UTF-8 JSON"):
        W.load_weights_strict(build_model(card), tmp_path, card)


# -------------------------------------------------------------------------------------------- doctor
def test_list_models_and_check(tmp_path):
    from mitobench.models.doctor import check_model, list_models, models_table

    rows = list_models()
    by_key = {r["key"]: r for r in rows}
    assert by_key["virchow2"]["dim"] == 2560 and by_key["virchow2"]["gated"] == "yes"
    assert by_key["uni"]["weights"] == "no"  # empty HF cache in this test
    assert by_key["efficientnetv2_m"]["weights"].startswith("random init")
    assert models_table(rows).row_count == len(rows)
    card = get_card("lunit_vits16")
    save_file({k: v.contiguous() for k, v in build_model(card).state_dict().items()}, tmp_path / "l.safetensors")
    out = check_model("lunit_vits16", weights=tmp_path / "l.safetensors", seconds=0.1)
    assert out["dim"] == 384 and out["pretrained"] and out["device"] == "cpu" and out["images_per_s"] > 0
    assert "warning" not in out


def test_check_patch_comes_from_the_data_root_else_a_clear_error(real_data, tmp_path, monkeypatch):
    from mitobench.models.doctor import _default_patch

    monkeypatch.delenv("MITOBENCH_DATA", raising=False)
    patch, source = _default_patch(real_data)  # --data-root, as `mitobench models check KEY --data-root DIR`
    assert Path(source).parent == real_data / "AMi-Br" / "Normal" and patch.shape == (128, 128, 3)
    monkeypatch.setitem(__import__("sys").modules, "skimage", None)  # a plain install: scikit-image is a test extra
    with pytest.raises(MitobenchError, match="--image") as err:
        _default_patch(tmp_path / "no-data")
    assert str(tmp_path / "no-data" / "AMi-Br" / "Normal") in str(err.value)


# ------------------------------------------------------------------------- empty / damaged / foreign files
TRUNCATED = "is truncated or not a checkpoint: re-download or re-export it"


def _small_state():
    return {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(64)}


@pytest.mark.parametrize("name", ["empty.pth", "empty.pt", "empty.bin", "empty.safetensors"])
def test_empty_weights_file_is_one_clear_error(tmp_path, name):
    path = tmp_path / name
    path.touch()
    with pytest.raises(MitobenchError, match="is empty") as err:
        W.read_checkpoint(path)
    assert str(path) in str(err.value) and "re-download or re-export" in str(err.value)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors", "safetensors-header"])
def test_truncated_checkpoint_is_one_clear_error(tmp_path, fmt):
    full = tmp_path / ("full.safetensors" if fmt.startswith("safetensors") else "full.pth")
    if fmt.startswith("safetensors"):
        save_file(_small_state(), full)
    else:
        torch.save(_small_state(), full, _use_new_zipfile_serialization=fmt == "zip")
    data = full.read_bytes()
    cut = tmp_path / f"cut-{full.name}"
    cut.write_bytes(data[:20] if fmt == "safetensors-header" else data[: len(data) // 2])
    assert W.read_checkpoint(full).keys() == {"w", "b"}
    with pytest.raises(MitobenchError) as err:
        W.read_checkpoint(cut)
    msg = str(err.value)
    assert str(cut) in msg and TRUNCATED in msg and "pickled Python objects" not in msg
    if fmt == "safetensors":
        assert "(safetensors:" in msg
    with pytest.raises(MitobenchError) as err:  # the lazy check of a run's weights says the same
        W.read_checkpoint_layout(cut)
    assert str(cut) in str(err.value) and TRUNCATED in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "zip"])
def test_lazy_layout_reads_names_shapes_and_dtypes_but_no_tensor_data(tmp_path, fmt, monkeypatch):
    state = {"w": torch.randn(64, 32), "half": torch.zeros(3, dtype=torch.float16), "step": torch.tensor(7)}
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    save_file(state, path) if fmt == "safetensors" else torch.save({"model": state, "epoch": 3}, path)
    monkeypatch.setattr(W, "read_checkpoint", lambda *a, **k: pytest.fail("the whole file was read"))
    layout = W.read_checkpoint_layout(path)
    tensors = layout if fmt == "safetensors" else layout["model"]
    assert {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in tensors.items()} == {
        k: (tuple(v.shape), v.dtype, "meta") for k, v in state.items()}


def test_a_legacy_torch_file_cannot_be_mapped_so_it_is_read_whole_and_checked(tmp_path):
    card = small_card()
    state = build_model(card).state_dict()
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert W.check_weights_fit(tmp_path / "legacy.pth", card)
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "other.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(W.WeightsMismatchError, match="1 missing, 0 unexpected"):
        W.check_weights_fit(tmp_path / "other.pth", card)


def test_safetensors_with_a_128_byte_header_is_not_taken_for_a_pickle(tmp_path):
    """Its first byte is 0x80, like a legacy torch pickle; byte 8 ("{") says safetensors."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(128)
    blob = (128).to_bytes(8, "little") + header + torch.tensor([1.0, 2.0]).numpy().tobytes()
    (tmp_path / "w.safetensors").write_bytes(blob)
    (tmp_path / "cut.safetensors").write_bytes(blob[:-4])
    assert blob[:1] == b"\x80" and W.checkpoint_format(tmp_path / "w.safetensors") == "safetensors"
    torch.testing.assert_close(W.read_checkpoint(tmp_path / "w.safetensors")["w"], torch.tensor([1.0, 2.0]))
    with pytest.raises(MitobenchError, match=r"is truncated or not a checkpoint.*\(safetensors:") as err:
        W.read_checkpoint(tmp_path / "cut.safetensors")
    assert str(tmp_path / "cut.safetensors") in str(err.value)


def test_png_renamed_pth_is_not_a_checkpoint(tmp_path):
    from fixtures import make_png

    path = tmp_path / "patch.pth"
    make_png(tmp_path / "patch.png").rename(path)
    with pytest.raises(MitobenchError) as err:
        W.load_weights_strict(build_model(get_card("efficientnet_lite0")), path, get_card("efficientnet_lite0"))
    msg = str(err.value)
    assert str(path) in msg and "is not a PyTorch or safetensors checkpoint (it looks like a PNG image)" in msg
    assert "pickled" not in msg
    unknown = tmp_path / "notes.bin"
    unknown.write_bytes(b"hello, these are not weights\n")
    with pytest.raises(MitobenchError, match="unknown format") as err:
        W.read_checkpoint(unknown)
    assert str(unknown) in str(err.value)


def test_reader_follows_content_and_real_pickles_keep_their_message(tmp_path):
    save_file(_small_state(), tmp_path / "misnamed.bin")  # safetensors content under a torch suffix
    torch.testing.assert_close(W.read_checkpoint(tmp_path / "misnamed.bin"), _small_state())
    torch.save({"w": torch.zeros(1), "obj": _NotATensor()}, tmp_path / "evil_legacy.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(MitobenchError, match="pickled Python objects") as err:
        W.read_checkpoint(tmp_path / "evil_legacy.pt")
    assert str(tmp_path / "evil_legacy.pt") in str(err.value)
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.safetensors.index.json").touch()
    with pytest.raises(MitobenchError, match="is empty") as err:
        W.load_weights_strict(build_model(get_card("efficientnet_lite0")), snap, get_card("efficientnet_lite0"))
    assert "model.safetensors.index.json" in str(err.value)


def test_cli_models_check_with_empty_weights_is_a_clear_error(tmp_path, cli):
    from typer.testing import CliRunner

    from mitobench.cli import app

    empty = tmp_path / "empty.pth"
    empty.touch()
    args = ("models", "check", "efficientnet_lite0", "--weights", str(empty))
    # in process: click no longer sees an EOFError (its Ctrl-D path: "Aborted!", exit 1)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code != 0 and "Aborted" not in result.output
    assert isinstance(result.exception, MitobenchError) and str(empty) in str(result.exception)
    # the installed command: mitobench.cli.main prints the one error and exits 2, no traceback
    proc = cli(*args, env={"COLUMNS": "1000"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert str(empty) in out and "is empty" in out and "Aborted" not in out and "Traceback" not in out
