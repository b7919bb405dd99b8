"""``train.compile``: torch.compile applied in place, one repeated block at a time ("regional compilation").

A ViT-H has 32 identical blocks: compiling each block's forward (they share one code object, so one
compilation serves all 32) took 27 s on an H100 where compiling the whole model took one to two minutes,
and trained as fast (330 vs 325 img/s for Virchow2 LoRA, benchmarks/RESULTS.md). In place (``Module.compile``) keeps the state-dict keys as they
are, so checkpoints, LoRA adapter saving and resume see the same names as without compilation.
"""

from __future__ import annotations

from torch import nn

BLOCK_CONTAINERS = ("blocks", "layers", "stages")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every ``blocks``/``layers``/``stages`` container whose children are all of one class,
    innermost containers first (Swin's ``layers.N.blocks`` gives its blocks, not its stages)."""
    found: list[nn.Module] = []
    claimed: set[int] = set()
    containers = [(name, m) for name, m in model.named_modules()
                  if name.rsplit(".", 1)[-1] in BLOCK_CONTAINERS and isinstance(m, (nn.Sequential, nn.ModuleList))]
    for name, container in sorted(containers, key=lambda item: -item[0].count(".")):
        children = list(container.children())
        if len(children) < 2 or len({type(c) for c in children}) != 1:
            continue
        if any(id(m) in claimed for child in children for m in child.modules()):
            continue  # an inner container's blocks are already compiled
        found.extend(children)
        claimed.update(id(m) for child in children for m in child.modules())
    return found


def allow_recompiles(regions: int) -> None:
    """Raise dynamo's limit of compiled versions per code object to fit every region.

    The compiled blocks share one code object (``nn.Module._call_impl``), and each distinct block (Swin's stage
    widths x shifted/unshifted windows, a CNN's stages) is one cache entry of it in training and another in
    evaluation; past the default limit (8) dynamo warns once and runs the rest eagerly (Swin-B: 16 of 24 blocks)."""
    import torch._dynamo

    want = max(64, 4 * regions)
    for name in ("recompile_limit", "cache_size_limit"):  # torch >= 2.6 / older
        if getattr(torch._dynamo.config, name, want) < want:
            setattr(torch._dynamo.config, name, want)


def compile_model(model: nn.Module, mode: str | None = None) -> int:
    """Compile ``model`` in place, block by block where it has repeated blocks, else as a whole.

    Returns the number of compiled regions (1 for a whole-model compile)."""
    blocks = repeated_blocks(model)
    allow_recompiles(len(blocks))
    for block in blocks:
        block.compile(mode=mode)
    if not blocks:
        model.compile(mode=mode)
    return max(1, len(blocks))
