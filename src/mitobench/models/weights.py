"""Where a backbone's weights come from, and a safe, strict load.

Resolution order (every step is logged at INFO level, see ``docs/models.md``):

1. an explicit path the user passes (``create_backbone(key, weights=PATH)`` or
   ``mitobench models check KEY --weights PATH``): a weights file, or a folder holding a Hugging Face
   snapshot (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin`` / sharded index);
2. the user mapping file named by the environment variable ``MITOBENCH_WEIGHTS``: a YAML file of
   ``key: path`` lines (relative paths are relative to the mapping file);
3. the local Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``), looked up without any network;
4. a download with ``huggingface_hub.hf_hub_download``, only when the caller allows downloads and
   ``HF_HUB_OFFLINE`` is not set. Tokens come from ``HF_TOKEN`` or the Hugging Face token file, as
   ``huggingface_hub`` reads them by default; this module never calls ``huggingface_hub.login()``.

Loading reads a safetensors file with safetensors and a torch zip / pickle checkpoint with
``torch.load(..., weights_only=True)`` (told apart by the file's first bytes; an empty, truncated or foreign
file raises one :class:`MitobenchError` naming it), unwraps ``state_dict`` / ``model`` / ``teacher`` containers,
strips known prefixes, applies the card's ``state_dict_filter``, converts known foreign key layouts
(Hugging Face transformers ViT / DINOv2, original DINOv2), resamples ``pos_embed`` to the built grid,
then checks keys and shapes *before* touching the model: a checkpoint that does not fit raises one
:class:`WeightsMismatchError` naming the file, the key counts and examples. The model is never half
loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mitobench.errors import MitobenchError

if TYPE_CHECKING:  # pragma: no cover
    from mitobench.models.registry import ModelCard

log = logging.getLogger(__name__)

ENV_MAPPING = "MITOBENCH_WEIGHTS"
#: file names tried inside a snapshot folder when the card names none, in this order
DEFAULT_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json", "pytorch_model.pth", "model.pth", "checkpoint.pth")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".torch", ".ckpt")
#: containers unwrapped, in this order of preference (DINO-style checkpoints: the teacher is the eval model)
CONTAINER_KEYS = ("state_dict", "model", "teacher", "model_state_dict", "module")
#: prefixes stripped from keys (``visual.trunk.``: OpenCLIP/CONCH trunks; ``backbone.``: DINOv2 training)
STRIP_PREFIXES = ("module.", "_orig_mod.", "visual.trunk.", "backbone.")


class WeightsMismatchError(MitobenchError):
    """The checkpoint does not fit the architecture; attributes hold the full report."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mis_shaped: list[tuple[str, tuple, tuple]]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mis_shaped = mis_shaped


# --------------------------------------------------------------------------------------------- env
def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (the environment wins over the value read at import time)."""
    if "HF_HUB_OFFLINE" in os.environ:
        return _truthy(os.environ["HF_HUB_OFFLINE"])
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, honouring ``HF_HUB_CACHE`` / ``HF_HOME`` set after import."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return Path("~/.cache/huggingface/hub").expanduser()


def _card_files(card: "ModelCard") -> tuple[str, ...]:
    """The card's weight file names, each followed by its shard index (``model.safetensors.index.json``): a repo
    that re-uploads its weights in shards (large ViT-g checkpoints often are) is still found and downloaded."""
    if not card.weight_files:
        return DEFAULT_WEIGHT_FILES
    names: list[str] = []
    for name in card.weight_files:
        names.append(name)
        if name.endswith((".safetensors", ".bin")):
            names.append(f"{name}.index.json")
    return tuple(names)


# ------------------------------------------------------------------------------------- mapping file
def read_mapping() -> tuple[Path | None, dict[str, Path]]:
    """The user mapping file named by ``$MITOBENCH_WEIGHTS``: ``{key: path}`` (empty when unset)."""
    name = os.environ.get(ENV_MAPPING)
    if not name:
        return None, {}
    path = Path(name).expanduser()
    if not path.is_file():
        raise MitobenchError(f"{ENV_MAPPING}={name} names no file. Create a YAML file of `key: /path/to/weights` "
                             f"lines there, or unset {ENV_MAPPING}.")
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, OSError, ValueError) as exc:  # ValueError: not UTF-8
        raise MitobenchError(f"{path} (named by {ENV_MAPPING}) is not valid YAML: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"weights"} and isinstance(data["weights"], dict):
        data = data["weights"]
    if not isinstance(data, dict):
        raise MitobenchError(f"{path} (named by {ENV_MAPPING}) must be a YAML mapping `model key: path`, "
                             f"got {type(data).__name__}.")
    out: dict[str, Path] = {}
    for key, value in data.items():
        if value is None:
            continue
        p = Path(os.path.expandvars(str(value))).expanduser()
        out[str(key)] = p if p.is_absolute() else (path.parent / p)
    return path, out


# ----------------------------------------------------------------------------------------- HF cache
def _from_hf_cache(repo: str, files: tuple[str, ...], incomplete: list[Path] | None = None) -> Path | None:
    """The first of ``files`` present in the local HF cache (refs/main first, then any snapshot). A sharded index
    whose shards are not all there (an unfinished download) is passed over, and appended to ``incomplete``."""
    incomplete = [] if incomplete is None else incomplete
    cache = hf_cache_dir()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        try_to_load_from_cache = None
    for fname in files:
        if try_to_load_from_cache is not None:
            try:
                hit = try_to_load_from_cache(repo, fname, cache_dir=str(cache))
            except Exception as exc:  # noqa: BLE001 - a malformed cache must not break resolution
                log.debug("try_to_load_from_cache(%s, %s) failed: %s", repo, fname, exc)
                hit = None
            if isinstance(hit, str) and Path(hit).exists():
                complete = _complete_sharded(Path(hit))
                if complete is not None:  # else an index whose shards are missing: try the next name, the snapshots
                    return complete
                incomplete.append(Path(hit))
    # a snapshot without refs/main (pinned revision) or another spelling of the repo id
    if cache.is_dir():
        want = "models--" + repo.replace("/", "--")
        folders = [d for d in cache.iterdir() if d.name.lower() == want.lower()]
        for folder in folders:
            snaps = sorted((folder / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
            for fname in files:
                for snap in snaps:
                    if (snap / fname).exists():
                        complete = _complete_sharded(snap / fname)
                        if complete is not None:
                            return complete
                        incomplete.append(snap / fname)
    return None


def _complete_sharded(path: Path) -> Path | None:
    """An index file counts only when all its shards are there too."""
    if path.name.endswith(".index.json"):
        shards = set(_index_shards(path))
        if not all((path.parent / s).exists() for s in shards):
            return None
    return path


def _index_shards(path: Path) -> list[str]:
    """The shard file names a sharded checkpoint's ``*.index.json`` lists (its ``weight_map`` values)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        what = "is empty" if path.is_file() and path.stat().st_size == 0 else f"is not valid JSON ({exc})"
        raise MitobenchError(f"sharded checkpoint index {path} {what}: re-download or re-export it.") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise MitobenchError(f"sharded checkpoint index {path} has no \"weight_map\": re-download or re-export it.")
    return sorted(set(map(str, weight_map.values())))


def _download(card: "ModelCard") -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    repo = card.hf_repo
    kwargs: dict[str, Any] = {"cache_dir": str(hf_cache_dir())}
    if os.environ.get("HF_ENDPOINT"):
        kwargs["endpoint"] = os.environ["HF_ENDPOINT"]
    access = (f"{repo} is gated: accept its terms at https://huggingface.co/{repo} with your account, then put a "
              "read token in the environment variable HF_TOKEN (or run `hf auth login` yourself once); "
              "mitobench never logs in for you.")
    yourself = f"Download it yourself and pass --weights PATH, or list it in the file named by ${ENV_MAPPING}."

    def fetch_one(fname: str) -> Path:
        try:
            return Path(hf_hub_download(repo, fname, **kwargs))
        except GatedRepoError as exc:
            raise MitobenchError(access) from exc
        except RepositoryNotFoundError as exc:
            raise MitobenchError(f"{repo} was not found or you have no access to it. "
                                 + (access if card.gated else "Check the repository id.")) from exc
        except LocalEntryNotFoundError as exc:  # a subclass of EntryNotFoundError: the Hub could not be reached
            raise MitobenchError(f"could not reach {kwargs.get('endpoint', 'https://huggingface.co')} to download "
                                 f"{repo}/{fname} (offline, a proxy, or the Hub failed: {_first_line(exc)}). "
                                 + yourself) from exc
        except EntryNotFoundError:
            raise
        except (HfHubHTTPError, OSError) as exc:
            raise MitobenchError(f"downloading {repo}/{fname} failed: {_first_line(exc)}. " + yourself) from exc

    for fname in _card_files(card):
        log.info("%s: downloading %s/%s", card.key, repo, fname)
        try:
            path = fetch_one(fname)
        except EntryNotFoundError:
            log.info("%s: %s has no %s, trying the next file name", card.key, repo, fname)
            continue
        if fname.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
            except (OSError, ValueError, AttributeError) as exc:
                raise MitobenchError(f"{path} (downloaded from {repo}) is not a valid shard index: "
                                     f"{_first_line(exc)}. " + yourself) from exc
            for shard in shards:
                try:
                    fetch_one(shard)
                except EntryNotFoundError as exc:
                    raise MitobenchError(f"{repo}: the shard {shard} listed in {fname} is not on the Hub. "
                                         + yourself) from exc
        try:  # config.json lets load_weights_strict check the card's unverified facts
            hf_hub_download(repo, "config.json", **kwargs)
        except Exception as exc:  # noqa: BLE001
            log.debug("%s: no config.json in %s (%s)", card.key, repo, exc)
        return path
    raise MitobenchError(f"{repo} holds none of {list(_card_files(card))}; download the weights yourself and "
                         "pass --weights PATH.")


# ----------------------------------------------------------------------------------------- resolve
def locate_weights(card: "ModelCard") -> tuple[Path | None, str]:
    """Weights already on this machine for ``card`` (no network): ``(path, where)`` or ``(None, reason)``."""
    mapping_file, mapping = read_mapping()
    if card.key in mapping:
        path = mapping[card.key]
        if not path.exists():
            raise MitobenchError(f"{mapping_file} maps {card.key!r} to {path}, which does not exist.")
        return path, f"mapping file {mapping_file}"
    if card.hf_repo:
        incomplete: list[Path] = []
        hit = _from_hf_cache(card.hf_repo, _card_files(card), incomplete)
        if hit is not None:
            return hit, f"Hugging Face cache {hf_cache_dir()}"
        if incomplete:
            index = incomplete[0]
            missing = [s for s in _index_shards(index) if not (index.parent / s).exists()]
            return None, (f"the Hugging Face cache holds {index} but not its shards {missing[:4]}: an unfinished "
                          "download, which --allow-download completes")
        return None, f"not in {ENV_MAPPING} mapping nor in the Hugging Face cache {hf_cache_dir()}"
    return None, "no weights source for this card"


def resolve_weights(card: "ModelCard", allow_download: bool) -> Path | None:
    """Mapping file -> local HF cache -> download (only when allowed and online). None: nothing found."""
    mapping_file, mapping = read_mapping()
    log.info("%s: weights lookup 1/3: mapping file %s", card.key, mapping_file or f"(${ENV_MAPPING} unset)")
    path, where = locate_weights(card)
    if path is not None:
        log.info("%s: weights found in %s: %s", card.key, where, path)
        return path
    if card.hf_repo is None:
        return None
    log.info("%s: weights lookup 2/3: not in the Hugging Face cache %s", card.key, hf_cache_dir())
    if not allow_download:
        log.info("%s: weights lookup 3/3: download not allowed", card.key)
        return None
    if hf_offline():
        log.info("%s: weights lookup 3/3: HF_HUB_OFFLINE is set, no download", card.key)
        return None
    return _download(card)


# ------------------------------------------------------------------------------------------ digest
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, cached in memory by (path, mtime, size)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 22):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def weights_digest(files: list[Path]) -> str:
    if len(files) == 1:
        return file_digest(files[0])[:16]
    return hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()[:16]


# -------------------------------------------------------------------------------------------- read
def _weight_files(path: Path, card: "ModelCard") -> tuple[list[Path], Path | None]:
    """The weight file(s) and the config.json for a file or a snapshot folder."""
    if path.is_dir():
        names = list(dict.fromkeys((*card.weight_files, *DEFAULT_WEIGHT_FILES)))
        chosen = next((path / n for n in names if (path / n).is_file()), None)
        if chosen is None:
            cands = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
            if len(cands) == 1:
                chosen = cands[0]
            else:
                raise MitobenchError(f"{path} holds {'no' if not cands else 'several'} weight files "
                                     f"({[c.name for c in cands]}); expected one of {names}. Pass the file itself.")
        config = path / "config.json"
    else:
        chosen, config = path, path.parent / "config.json"
    if chosen.name.endswith(".index.json"):
        shards = _index_shards(chosen)
        missing = [s for s in shards if not (chosen.parent / s).is_file()]
        if missing:
            raise MitobenchError(f"{chosen}: shards missing next to the index: {missing[:4]}")
        files = [chosen.parent / s for s in shards]
    else:
        files = [chosen]
    return files, (config if config.is_file() else None)


#: first bytes of files people pass as weights by mistake -> what to call them in the error
FOREIGN_MAGIC = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                 (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"GIF8", "a GIF image"),
                 (b"\x1f\x8b", "a gzip archive (unpack it first)"), (b"7z\xbc\xaf", "a 7-Zip archive (unpack it first)"),
                 (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"),
                 (b"<", "an HTML/XML page (an error or login page saved instead of the file?)"),
                 (b"{", "a JSON file"))
_TRUNCATED = "is truncated or not a checkpoint: re-download or re-export it"


def _first_line(exc: BaseException) -> str:
    """The telling line of a reader's (often long) message, for the error's parenthesis."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "Unsupported operand" in line), lines[0] if lines else "")
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def checkpoint_format(path: Path) -> str:
    """``"torch"`` (zip or legacy pickle) or ``"safetensors"``, from the file's first bytes.

    An empty file, a safetensors file cut inside its header, or a file of another kind raises
    :class:`MitobenchError` naming the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise MitobenchError(f"weights file {path} could not be read: {exc}") from exc
    if size == 0:
        raise MitobenchError(f"weights file {path} is empty (0 bytes): re-download or re-export it.")
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header length, then JSON
        # (torch zip / legacy pickle headers never hold "{" at byte 8)
        header = int.from_bytes(head[:8], "little")
        if 8 + header > size:
            raise MitobenchError(f"weights file {path} {_TRUNCATED} (its safetensors header says {header} bytes, "
                                 f"the file has {size}).")
        return "safetensors"
    # torch zip, legacy pickle, legacy tar (tested after safetensors: a 128-byte header also starts with 0x80)
    if head.startswith((b"PK", b"\x80")) or head[257:262] == b"ustar":
        return "torch"
    if size < 9:
        raise MitobenchError(f"weights file {path} {_TRUNCATED} (only {size} bytes).")
    kind = next((name for magic, name in FOREIGN_MAGIC if head.startswith(magic)), None)
    looks = f"it looks like {kind}" if kind else f"unknown format, it starts with {head[:8]!r}"
    raise MitobenchError(f"{path} is not a PyTorch or safetensors checkpoint ({looks}). Pass the weights file "
                         "itself (.safetensors, or a .pth/.pt/.bin written by torch.save).")


def read_checkpoint(path: Path) -> Any:
    """safetensors, else ``torch.load(weights_only=True)``; never unpickles arbitrary objects.

    The reader follows the file's content (:func:`checkpoint_format`), not its suffix; an empty,
    truncated or foreign file raises one :class:`MitobenchError` naming it.
    """
    if checkpoint_format(path) == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - SafetensorError and friends on a damaged file
            raise MitobenchError(f"weights file {path} {_TRUNCATED} (safetensors: {_first_line(exc)}).") from exc
    try:
        with warnings.catch_warnings():  # torch's "looks like a TorchScript archive" warning: the error below says more
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - EOFError, RuntimeError, OSError, UnpicklingError on a damaged file
        text = str(exc)
        if "TorchScript" in text:
            raise MitobenchError(
                f"{path} is a TorchScript model, not a state dict. If you trust the file, convert it once: python -c "
                "\"import torch; from safetensors.torch import save_file; "
                f"m = torch.jit.load('{path}', map_location='cpu'); "
                "save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'OUT.safetensors')\" "
                "and pass OUT.safetensors.") from exc
        damaged = isinstance(exc, (EOFError, OSError)) or any(
            s in text for s in ("Unsupported operand", "truncated", "EOF", "corrupted", "zip archive"))
        refused = "weights_only" in text or "Weights only" in text or isinstance(exc, pickle.UnpicklingError)
        if refused and not damaged:
            raise MitobenchError(
                f"{path} holds pickled Python objects besides tensors, and mitobench only loads checkpoints with "
                "torch.load(weights_only=True). If you trust the file, convert it once: python -c \"import torch; "
                "from safetensors.torch import save_file; "
                f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
                "sd = sd if hasattr(sd, 'state_dict') else sd.get('state_dict', sd.get('model', sd.get('teacher', sd))); "
                "sd = sd.state_dict() if hasattr(sd, 'state_dict') else sd; "
                "save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, 'OUT.safetensors')\""
            ) from exc
        raise MitobenchError(f"weights file {path} {_TRUNCATED} (torch.load: {_first_line(exc)}).") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


class NotAStateDictError(MitobenchError):
    """A checkpoint that holds no tensors by name (a list, a whole pickled model converted to something else)."""


def unwrap_state_dict(obj: Any, notes: list[str]) -> dict[str, torch.Tensor]:
    for _ in range(4):
        if not isinstance(obj, dict) or _is_tensor_dict(obj):
            break
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        notes.append(f"unwrapped '{inner}'")
        obj = obj[inner]
    if not isinstance(obj, dict):
        raise NotAStateDictError(f"the checkpoint holds a {type(obj).__name__}, not a state dict. Pass the model's "
                                 "weights: a .safetensors file, or a file saved with torch.save(model.state_dict()).")
    dropped = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if dropped:
        notes.append(f"ignored {len(dropped)} non-tensor entries ({dropped[:3]})")
    return {str(k): v for k, v in obj.items() if torch.is_tensor(v)}


#: stripped only when every key carries it (``model.``: a state dict saved from a wrapper such as mitobench's
#: ``Backbone``; a prefix some keys carry may be part of the architecture's own names)
STRIP_IF_ALL = ("model.",)


def strip_prefixes(state: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_IF_ALL:
        if state and all(k.startswith(prefix) for k in state):
            notes.append(f"stripped '{prefix}' from all {len(state)} keys")
            state = {k[len(prefix):]: v for k, v in state.items()}
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            hits = [k for k in state if k.startswith(prefix)]
            if hits:
                notes.append(f"stripped '{prefix}' from {len(hits)} keys")
                state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
                changed = True
    return state


def convert_dinov2_original(state: dict[str, torch.Tensor], model: nn.Module,
                            notes: list[str]) -> dict[str, torch.Tensor]:
    """Original facebookresearch DINOv2 layout -> timm (same rules as timm's ``_convert_dinov2``)."""
    state = dict(state)
    state.pop("mask_token", None)
    out: dict[str, torch.Tensor] = {}
    if "register_tokens" in state:
        out["reg_token"] = state.pop("register_tokens")
        if getattr(model, "no_embed_class", False):
            out["cls_token"] = state.pop("cls_token") + state["pos_embed"][:, :1]
            out["pos_embed"] = state.pop("pos_embed")[:, 1:]
    for k, v in state.items():
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))] = v
    notes.append("converted the original DINOv2 layout")
    return out


def _resample_pos_embed(state: dict[str, torch.Tensor], model: nn.Module, antialias: bool,
                        notes: list[str]) -> dict[str, torch.Tensor]:
    target = getattr(model, "pos_embed", None)
    pe = state.get("pos_embed")
    if target is None or pe is None or pe.shape == target.shape or pe.ndim != 3 or pe.shape[-1] != target.shape[-1]:
        return state
    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old = pe.shape[1] - n_prefix
    side = math.isqrt(max(old, 0))
    if side * side != old:
        return state  # not a square grid: let the fit report show it
    from timm.layers import resample_abs_pos_embed

    grid = tuple(model.patch_embed.grid_size)
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid), old_size=[side, side],
                                                num_prefix_tokens=n_prefix, interpolation="bicubic",
                                                antialias=antialias)
    notes.append(f"resampled pos_embed {side}x{side} -> {grid[0]}x{grid[1]} (bicubic, antialias={antialias})")
    return state


def prepare_state_dict(raw: Any, model: nn.Module, card: "ModelCard", notes: list[str]) -> dict[str, torch.Tensor]:
    """Unwrap, strip prefixes, card filter, foreign layouts, pos_embed resampling."""
    from mitobench.models import hf_builders

    state = unwrap_state_dict(raw, notes)
    state = strip_prefixes(state, notes)
    if card.state_dict_filter is not None:
        before = len(state)
        state = card.state_dict_filter(state)
        notes.append(f"card filter: {before} -> {len(state)} tensors")
    antialias = True  # timm's runtime resampling, which the timm-based recipes use
    if hf_builders.is_hf_layout(state):
        # transformers' interpolate_pos_encoding: bicubic without antialias for ViT/DINOv2, with it for
        # Dinov2WithRegistersModel (the layout with embeddings.register_tokens)
        antialias = any(k.endswith("embeddings.register_tokens") for k in state)
        state = hf_builders.convert_hf_vit_state_dict(state, model, notes)
    elif "mask_token" in state or "register_tokens" in state or any(".mlp.w12." in k for k in state):
        state = convert_dinov2_original(state, model, notes)
    elif "_conv_stem.weight" in state and hasattr(model, "blocks") and hasattr(model, "conv_stem"):
        state = convert_lukemelas(state, model, notes)
    return _resample_pos_embed(state, model, antialias, notes)


def convert_lukemelas(state: dict[str, torch.Tensor], model: nn.Module, notes: list[str]) -> dict[str, torch.Tensor]:
    """lukemelas ``EfficientNet-PyTorch`` layout (``_blocks.N._expand_conv``; the file EfficientNet-Lite0's package
    ships) -> the timm EfficientNet's keys; its ImageNet classifier dropped where the model is built without one."""
    from mitobench.models.efficientnet_lite import convert_lukemelas_state_dict

    state = convert_lukemelas_state_dict(state, model)
    if not any(k.startswith("classifier.") for k in model.state_dict()):
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    notes.append("converted the lukemelas EfficientNet-PyTorch layout")
    return state


# ------------------------------------------------------------------------------------ config check
def _model_facts(model: nn.Module) -> dict[str, Any]:
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        return {}
    block = model.blocks[0]
    facts = {"embed_dim": int(getattr(model, "embed_dim", model.num_features)), "depth": len(model.blocks),
             "patch_size": int(model.patch_embed.patch_size[0]),
             "reg_tokens": int(getattr(model, "num_reg_tokens", 0))}
    if hasattr(block, "attn") and hasattr(block.attn, "num_heads"):
        facts["num_heads"] = int(block.attn.num_heads)
    if hasattr(block, "mlp") and hasattr(block.mlp, "fc1"):
        facts["mlp_fc1_out"] = int(block.mlp.fc1.out_features)
        facts["swiglu"] = type(block.mlp).__name__ in ("GluMlp", "SwiGLU", "SwiGLUPacked")
    facts["layerscale"] = type(getattr(block, "ls1", nn.Identity())).__name__ != "Identity"
    norm = getattr(model, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        facts["layer_norm_eps"] = float(norm.eps)
    return facts


def _config_facts(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(architecture facts, recipe facts) from a timm-style or transformers-style config.json."""
    arch: dict[str, Any] = {}
    recipe: dict[str, Any] = {}
    if "architecture" in config:  # timm hub config
        args = dict(config.get("model_args") or {})
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "reg_tokens"):
            if name in args:
                arch[name] = int(args[name])
        if "init_values" in args:
            arch["layerscale"] = bool(args["init_values"])
        if "mlp_ratio" in args and "embed_dim" in args:
            arch["mlp_fc1_out"] = int(args["embed_dim"] * args["mlp_ratio"])
        cfg = config.get("pretrained_cfg") or {}
        for name in ("mean", "std", "interpolation"):
            if name in cfg:
                recipe[name] = tuple(cfg[name]) if isinstance(cfg[name], list) else cfg[name]
    elif "model_type" in config or "hidden_size" in config:  # transformers config
        mapping = {"hidden_size": "embed_dim", "num_hidden_layers": "depth", "num_attention_heads": "num_heads",
                   "patch_size": "patch_size", "num_register_tokens": "reg_tokens"}
        for src, dst in mapping.items():
            if isinstance(config.get(src), (int, float)):
                arch[dst] = int(config[src])
        if "layer_norm_eps" in config:
            arch["layer_norm_eps"] = float(config["layer_norm_eps"])
        d = config.get("hidden_size")
        if config.get("use_swiglu_ffn"):
            arch["swiglu"] = True
            if d and "mlp_ratio" in config:
                hidden = (int(int(d * config["mlp_ratio"]) * 2 / 3) + 7) // 8 * 8
                arch["mlp_fc1_out"] = 2 * hidden
        elif d and "mlp_ratio" in config:
            arch["swiglu"] = False
            arch["mlp_fc1_out"] = int(d * config["mlp_ratio"])
        elif "intermediate_size" in config:
            arch["mlp_fc1_out"] = int(config["intermediate_size"])
        if config.get("model_type", "").startswith("dinov2"):
            arch["layerscale"] = True
    return arch, recipe


def verify_config(card: "ModelCard", model: nn.Module, config: dict[str, Any], config_path: Path) -> list[str]:
    """Compare the card's build with a config.json shipped next to the weights.

    Architecture conflicts a strict load cannot see (number of heads, LayerNorm eps) or that it
    would report obscurely raise :class:`MitobenchError`; recipe differences are logged as warnings.
    """
    have = _model_facts(model)
    arch, recipe = _config_facts(config)
    conflicts = [f"{name}: config.json says {arch[name]}, the card builds {have[name]}"
                 for name in arch if name in have and name != "layer_norm_eps" and arch[name] != have[name]]
    if conflicts:
        raise MitobenchError(f"{config_path} does not match the architecture of card {card.key!r} ({card.arch}): "
                             + "; ".join(conflicts) + ". Most likely these are another model's weights: check that "
                             f"the folder is {card.hf_repo or card.key}'s. If it is, the card's unverified facts are "
                             "wrong for this checkpoint: please report it with the config.json.")
    notes = []
    if "layer_norm_eps" in arch and "layer_norm_eps" in have and not math.isclose(arch["layer_norm_eps"],
                                                                                  have["layer_norm_eps"]):
        log.warning("%s: config.json layer_norm_eps=%g, the card builds %g (a tiny numeric difference)",
                    card.key, arch["layer_norm_eps"], have["layer_norm_eps"])
    for name, value in recipe.items():
        mine = getattr(card, name)
        same = (all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(value, mine))
                if isinstance(value, tuple) else value == mine)
        if not same:
            log.warning("%s: config.json pretrained_cfg %s=%s, the card uses %s (the card follows the "
                        "authors' published recipe; see docs/models.md)", card.key, name, value, mine)
    if arch:
        notes.append(f"config.json agrees on {sorted(k for k in arch if k in have)}")
    return notes


# ----------------------------------------------------------------------------------------- fitting
def fit_report(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mis_shaped = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    return missing, unexpected, mis_shaped


def _hints(missing: list[str], unexpected: list[str], mis_shaped: list, n_model: int) -> list[str]:
    hints = []
    if any(".ls1." in k for k in unexpected):
        hints.append("the checkpoint has LayerScale (ls1/ls2) but the build has none: pass init_values")
    if any(".ls1." in k for k in missing):
        hints.append("the build has LayerScale but the checkpoint has none")
    if "reg_token" in missing or "reg_token" in unexpected:
        hints.append("the number of register tokens differs (reg_tokens)")
    if any(".mlp.fc" in k for k, *_ in mis_shaped):
        hints.append("the MLP differs (SwiGLU packed vs plain, or mlp_ratio)")
    if any(k.startswith(("head", "fc.", "classifier.")) for k in unexpected):
        hints.append("the checkpoint has a classifier head; mitobench builds the network without one "
                     "(num_classes=0): save the weights without it (e.g. model.reset_classifier(0) before "
                     "state_dict()), or drop those keys")
    if "patch_embed.proj.weight" in [k for k, *_ in mis_shaped]:
        hints.append("the patch size or embedding width differs: this is probably another model's checkpoint")
    if len(missing) > 0.8 * max(1, n_model) and unexpected:
        hints.append("almost nothing matches: another model's checkpoint, or a key layout mitobench does not know")
    return hints


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], source: Path, card: "ModelCard") -> None:
    missing, unexpected, mis_shaped = fit_report(model, state)
    if not (missing or unexpected or mis_shaped):
        return
    n_model = len(model.state_dict())
    lines = [f"{source}: the checkpoint does not fit {card.key!r} ({card.arch}): {len(missing)} missing, "
             f"{len(unexpected)} unexpected, {len(mis_shaped)} mis-shaped keys "
             f"(checkpoint {len(state)} tensors, architecture {n_model}). Nothing was loaded."]
    if missing:
        lines.append(f"  missing (in the architecture, not in the file): {', '.join(missing[:6])}"
                     + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        lines.append(f"  unexpected (in the file, not in the architecture): {', '.join(unexpected[:6])}"
                     + (" ..." if len(unexpected) > 6 else ""))
    if mis_shaped:
        lines.append("  mis-shaped: " + ", ".join(f"{k} file {a} vs model {b}" for k, a, b in mis_shaped[:4])
                     + (" ..." if len(mis_shaped) > 4 else ""))
    lines += [f"  hint: {h}" for h in _hints(missing, unexpected, mis_shaped, n_model)]
    lines.append(f"  Check the file belongs to {card.key} ({card.hf_repo or card.arch}).")
    raise WeightsMismatchError("\n".join(lines), missing, unexpected, mis_shaped)


def _fitted_state(model: nn.Module, path: Path, card: "ModelCard",
                  read=None) -> tuple[list[Path], dict[str, torch.Tensor], list[str]]:
    """The checkpoint at ``path`` (a file or a snapshot folder) read with ``read`` (default
    :func:`read_checkpoint`), unwrapped, converted and checked against ``model``. Raises
    :class:`WeightsMismatchError` when it does not fit."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MitobenchError(f"weights path {path} does not exist")
    read = read or read_checkpoint
    files, config_path = _weight_files(path, card)
    notes: list[str] = []
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or not UTF-8 (a UTF-16 file, a binary)
            raise MitobenchError(f"{config_path} is not valid UTF-8 JSON ({_first_line(exc)}): re-download it, or "
                                 "delete it if the weights file beside it is all you have.") from exc
        if isinstance(config, dict):
            notes += verify_config(card, model, config, config_path)
    raw: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            part = read(f)
            if len(files) > 1:
                raw.update(unwrap_state_dict(part, []))
            else:
                raw = part
        state = prepare_state_dict(raw, model, card, notes)
    except NotAStateDictError as exc:
        raise MitobenchError(f"{files[0] if len(files) == 1 else path}: {exc}") from None
    check_fit(model, state, files[0] if len(files) == 1 else path, card)
    return files, state, notes


def load_weights_strict(model: nn.Module, path: Path, card: "ModelCard") -> tuple[str, str]:
    """Load ``path`` (a file or a HF snapshot folder) into ``model`` strictly.

    Returns ``(weights_id, source_description)``; ``weights_id`` is the first 16 hex digits of the
    file's sha256 (of the shards' digests for a sharded checkpoint).
    """
    path = Path(path).expanduser()
    files, state, notes = _fitted_state(model, path, card)
    model.load_state_dict(state, strict=True)
    weights_id = weights_digest(files)
    shown = files[0] if len(files) == 1 else f"{path} ({len(files)} shards)"
    source = f"{shown}" + (f" [{'; '.join(notes)}]" if notes else "")
    log.info("%s: loaded weights %s (sha256 %s) strictly%s", card.key, shown, weights_id,
             f": {'; '.join(notes)}" if notes else "")
    return weights_id, source


# ------------------------------------------------------------------------------------ lazy fit check
#: safetensors header dtype names -> torch dtypes (a name not here reads as float32: only shapes are compared)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _on_meta(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return torch.empty(obj.shape, dtype=obj.dtype, device="meta")
    if isinstance(obj, dict):
        return {k: _on_meta(v) for k, v in obj.items()}
    return obj


def read_checkpoint_layout(path: Path) -> Any:
    """The checkpoint's tensors as meta tensors (names, shapes, dtypes), reading no tensor data: the safetensors
    header, or a torch zip archive memory-mapped. A legacy (pre-zip) torch file cannot be mapped: it is read whole
    (such files are old and small: EfficientNet-Lite0's package file is 19 MB)."""
    if checkpoint_format(path) == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                return {k: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                       device="meta") for k, s in slices.items()}
        except Exception as exc:  # noqa: BLE001 - SafetensorError on a damaged header
            raise MitobenchError(f"weights file {path} {_TRUNCATED} (safetensors: {_first_line(exc)}).") from exc
    with open(path, "rb") as fh:
        if fh.read(2) != b"PK":
            return _on_meta(read_checkpoint(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the full reader names the fault (damaged, pickled objects, TorchScript)
        mapped = read_checkpoint(path)
    return _on_meta(mapped)


def check_weights_fit(path: Path, card: "ModelCard") -> bool:
    """Check that the checkpoint at ``path`` fits ``card``'s architecture without loading it: the names and shapes
    are read from the file's header (:func:`read_checkpoint_layout`) and checked, after the same unwrapping and
    conversions as a load, against the architecture built on the meta device. Seconds and no memory even for a
    ViT-g, so a run refuses another model's checkpoint before it makes a folder. Raises what
    :func:`load_weights_strict` would; returns False when the architecture cannot be built or converted on the meta
    device (the load itself checks it then)."""
    from mitobench.models.registry import build_architecture

    try:
        with torch.device("meta"):
            model = build_architecture(card)
    except Exception as exc:  # noqa: BLE001 - an architecture that needs real tensors to build
        log.debug("lazy weights check of %s skipped: %s", card.key, exc)
        return False
    try:
        _fitted_state(model, Path(path), card, read=read_checkpoint_layout)
        return True
    except MitobenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - a conversion that needs real tensor data
        log.debug("lazy weights check of %s skipped: %s", card.key, exc)
        return False
