"""One training step of BARD-VL sharded with FSDP2 (`fully_shard`), run by test_multiprocess.py.

    python tests/fsdp2_step.py MODEL TEACHER OUTPUT              # 1 process: the reference, nothing sharded
    torchrun --nproc_per_node 2 tests/fsdp2_step.py MODEL TEACHER OUTPUT   # 2 processes (gloo), FSDP2

The model is sharded as accelerate's FSDP2 plugin with TRANSFORMER_BASED_WRAP shards it (examples/accelerate_configs/
fsdp2.yaml): one unit per class in `model._no_split_modules` (decoder layers, vision blocks), then the root (embeddings,
LM head). Each rank takes its half of a fixed 4-sample batch (noise seeded by the sample's index, so the same noise as
the reference) and computes, as `BlockMergeTrainer.compute_loss` does, the PBM loss normalised by the 4 samples of the
step and multiplied by the number of processes (FSDP averages gradients over ranks):

- with the selective LM head (`logits_mask`, the head inside the sharded root unit);
- with TRL's fused LM head (`add_fused_lm_head`, which gathers the sharded head weight with `full_tensor`);

then clips nothing, takes one SGD step (lr 0.5), and writes the full (unsharded) state dict with `save_pretrained`
from rank 0, as a stage checkpoint. The distillation teacher is sharded the same way, frozen, and its top-k targets
at the masked positions are recorded. Each rank writes ``rank{r}.json`` with its losses, the global gradient norm and
the teacher's top-k values.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from conftest import tiny_chat_rows
from transformers_bard import BardVLForConditionalGeneration
from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor
from transformers_bard.trainer.block_merge_trainer import fused_lm_head_inputs
from transformers_bard.trainer.collator import LOSS_KEYS, SAMPLE_INDEX_COLUMN, BlockDiffusionCollator
from transformers_bard.trainer.diffusion_distill_trainer import distillation_positions
from transformers_bard.trainer.losses import block_merge_loss, teacher_topk

GLOBAL_BATCH = 4


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    unit_classes = tuple(
        type(module) for module in model.modules() if type(module).__name__ in model._no_split_modules
    )
    for module in model.modules():
        if isinstance(module, unit_classes):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_gradient_norm(model) -> float:
    squares = 0.0
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            squares += float(grad.double().pow(2).sum())
    return squares**0.5


def main(model_dir: str, teacher_dir: str, output: str) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))

    from trl.trainer.utils import add_fused_lm_head

    processor = BardVLProcessor.from_pretrained(model_dir)
    model = BardVLForConditionalGeneration.from_pretrained(model_dir)
    teacher = BardVLForConditionalGeneration.from_pretrained(teacher_dir).requires_grad_(False).eval()
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    if mesh is not None:
        shard(model, mesh)
        shard(teacher, mesh)

    collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=4)
    per_rank = GLOBAL_BATCH // world
    rows = [{**row, SAMPLE_INDEX_COLUMN: i} for i, row in enumerate(tiny_chat_rows(GLOBAL_BATCH))]
    batch = collator(rows[rank * per_rank : (rank + 1) * per_rank])
    targets = {key: batch.pop(key) for key in LOSS_KEYS}
    loss_args = (targets["labels"], batch["logits_mask"], targets["rates"], targets["is_eos_padding"])

    record = {}
    # 1. selective head; the gradients of this step are kept
    loss, _ = block_merge_loss(*loss_args, targets["response_lengths"], GLOBAL_BATCH, logits=model(**batch).logits)
    (loss * world).backward()
    record["loss_selective"] = loss.item()
    record["grad_norm"] = full_gradient_norm(model)
    # 2. fused head on the same batch: loss and gradient norm only
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    kept = [None if param.grad is None else param.grad.clone() for param in model.parameters()]
    optimizer.zero_grad()
    out = model(**fused_lm_head_inputs(model, batch, targets["labels"]), fused_lm_head=True)
    mask = batch["logits_mask"]
    fused, _ = block_merge_loss(
        *loss_args, targets["response_lengths"], GLOBAL_BATCH, ce=-out.log_probs[mask], correct=out.is_top1[mask]
    )
    (fused * world).backward()
    record["loss_fused"] = fused.item()
    record["grad_norm_fused"] = full_gradient_norm(model)
    for param, grad in zip(model.parameters(), kept):
        param.grad = grad
    optimizer.step()

    # 3. the sharded teacher's targets at the masked positions (DESIGN 3.6), with its own block size 4 mask
    with torch.no_grad():
        positions = distillation_positions(batch["logits_mask"], batch["input_ids"], model.config.mask_token_id)
        logits = teacher(**{**batch, "logits_mask": positions}, block_size=4).logits  # [N, V]
        values, _ = teacher_topk(logits, 4)
    record["teacher_topk"] = values.tolist()

    # 4. a complete, unsharded checkpoint from the full state dict
    if mesh is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if rank == 0:
        model.save_pretrained(output, state_dict=state)
        processor.save_pretrained(output)
    with open(os.path.join(output, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)
    if mesh is not None:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
