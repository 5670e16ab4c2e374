"""Issue 13 measurement: how often is a freshly converted model's first answer token right, before any training?

Run after `transformers-bard demo --ablations shift --output-dir OUT ...` (README, "Shifted prediction"): it reads
OUT/bard-b4 (the paper's setting) and OUT/bard-b4-shift (`prediction_shift=True`). Every answer token is masked and
the first one is scored with the training-layout logits, which equal decoding's first step (tests/test_modeling.py).

    python docs/shift_results/first_token.py OUT
"""

import collections
import sys

import torch

from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.demo.digits import build_digits_dataset
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.trainer.collator import SAMPLE_INDEX_COLUMN, BlockDiffusionCollator


def first_token_accuracy(path: str, test) -> dict[str, float]:
    model = BardVLForConditionalGeneration.from_pretrained(path).eval()
    processor = BardVLProcessor.from_pretrained(path)
    collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=model.config.block_size)
    hits, total = collections.Counter(), collections.Counter()
    for index, row in enumerate(test):
        batch = collator([{**row, SAMPLE_INDEX_COLUMN: index}])
        segments = batch["segment_ids"]
        R = int(batch["response_lengths"][0])
        P = segments.shape[1] - 2 * R  # packed row [prefix ; x0 ; xt]
        ids = batch["input_ids"].clone()
        ids[0, P + R :] = model.config.mask_token_id  # every answer token masked
        first = torch.zeros_like(segments, dtype=torch.bool)
        first[0, P + R] = True
        with torch.no_grad():
            logits = model(input_ids=ids, segment_ids=segments, mm_token_type_ids=batch["mm_token_type_ids"],
                           pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"),
                           logits_mask=first).logits  # [1, vocab]
        logits[:, model.config.mask_token_id] = -float("inf")  # never a candidate (DESIGN 4.2)
        total[row["question_type"]] += 1
        hits[row["question_type"]] += int(logits.argmax(-1).item() == batch["input_ids"][0, P].item())
    accuracy = {kind: hits[kind] / total[kind] for kind in total}
    accuracy["all"] = sum(hits.values()) / sum(total.values())
    return accuracy


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    test = build_digits_dataset("test", 40, seed=0, balanced=True)  # the demo's 40 test rows
    for name in ("bard-b4", "bard-b4-shift"):
        print(name, {kind: round(value, 3) for kind, value in first_token_accuracy(f"{out}/{name}", test).items()})
