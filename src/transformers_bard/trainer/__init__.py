"""Trainers and data for BARD: progressive block merging (DESIGN 3.1-3.5) and stage-wise distillation (3.6).

Imported lazily: `import trl` costs seconds, and `import transformers_bard` should not pay it.
"""

import importlib

_EXPORTS = {
    "BlockDiffusionCollator": "collator",
    "BlockMergeConfig": "block_merge_config",
    "BlockMergeTrainer": "block_merge_trainer",
    "DiffusionDistillConfig": "diffusion_distill_config",
    "DiffusionDistillTrainer": "diffusion_distill_trainer",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
