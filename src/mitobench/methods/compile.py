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


def compile_model(model: nn.Module, mode: str | None = None) -> int:
    """Compile ``model`` in place, block by block where it has repeated blocks, else as a whole.

    Returns the number of compiled regions (1 for a whole-model compile)."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(mode=mode)
    if not blocks:
        model.compile(mode=mode)
    return max(1, len(blocks))
