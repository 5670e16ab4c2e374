"""Where the B = 4 anchor is right on an SWD batch: top-1 accuracy at the masked positions, EOS padding apart.

    python docs/demo_results/swd_settings/teacher_at_padding.py demo_output

Collates 32 training rows of the digits task at B = 32 (the SWD student's layout, mask rates [0.1, 0.5]) and at
B = 4 (the anchor's own training layout), and scores the anchor (`pbm/stage-b4`, at its block size 4) and the PBM
B = 32 student at the masked positions against the clean tokens.
"""

import sys

import torch

from transformers_bard.demo.digits import build_digits_dataset
from transformers_bard.models.bard_vl.modeling_bard_vl import BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.noise import MixedNoiseScheduler
from transformers_bard.trainer.collator import BlockDiffusionCollator, add_sample_index

run = sys.argv[1]
torch.set_num_threads(1)
rows = add_sample_index(build_digits_dataset("train", 32, seed=0))
processor = BardVLProcessor.from_pretrained(f"{run}/pbm/stage-b4")
models = {
    "anchor (B=4)": (BardVLForConditionalGeneration.from_pretrained(f"{run}/pbm/stage-b4").eval(), 4),
    "PBM B=32": (BardVLForConditionalGeneration.from_pretrained(f"{run}/pbm/stage-b32").eval(), 32),
}
mask_id = models["anchor (B=4)"][0].config.mask_token_id
for layout in (32, 4):
    collator = BlockDiffusionCollator(processor, mask_token_id=mask_id, block_size=layout,
                                      noise_scheduler=MixedNoiseScheduler(min_rate=0.1, max_rate=0.5))
    batch = collator([rows[i] for i in range(len(rows))])
    masked = batch["logits_mask"] & (batch["input_ids"] == mask_id)
    padding = batch["is_eos_padding"].bool()[masked]
    labels = batch["labels"][masked]
    inputs = {key: batch[key] for key in ("input_ids", "segment_ids", "mm_token_type_ids", "pixel_values",
                                          "image_grid_thw")}
    for name, (model, block_size) in models.items():
        with torch.no_grad():
            hits = model(**inputs, logits_mask=masked, block_size=block_size).logits.argmax(-1) == labels
        print(f"rows at B={layout}: {name}: top-1 right at {hits.float().mean():.3f} of {len(labels)} masked positions; "
              f"{hits[~padding].float().mean():.3f} before the EOS padding, "
              f"{hits[padding].float().mean() if padding.any() else float('nan'):.3f} on it ({int(padding.sum())})")
