"""Write the built-in tiny BARD-VL model and a tiny chat dataset, for `examples/configs/block_merge_tiny.yaml`.

    python examples/scripts/make_tiny_assets.py --output_dir outputs

writes `outputs/tiny-bard-vl` (a ~0.2M-parameter Qwen3-VL converted to BARD-VL at block size 4) and
`outputs/tiny-chat/train.parquet` (chats in TRL's vision format: `messages` with `{"type": "image"}` placeholders, and
`images`). Everything is generated offline.
"""

import argparse
import tempfile
from pathlib import Path

from datasets import Dataset

from transformers_bard.conversion import convert_from_autoregressive
from transformers_bard.testing import build_tiny_qwen3_vl, make_image

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}


def tiny_chat_dataset(num_rows: int = 32) -> Dataset:
    """Captioning chats: a flat coloured image, "What color is the image?", "It is <color>." (every 4th text-only)."""
    rows = []
    names = sorted(COLORS)
    for index in range(num_rows):
        color = names[index % len(names)]
        if index % 4 == 3:
            user, images = [{"type": "text", "text": f"Say the word {color}."}], []
        else:
            user = [{"type": "image"}, {"type": "text", "text": "What color is the image?"}]
            images = [make_image(index, (32 * (1 + index % 2), 32), color=COLORS[color])]
        answer = f"It is {color}." if images else f"{color}."
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": images,
            }
        )
    return Dataset.from_list(rows)


def main(output_dir: str, num_rows: int = 32) -> tuple[Path, Path]:
    output = Path(output_dir)
    model_dir, data_dir = output / "tiny-bard-vl", output / "tiny-chat"
    with tempfile.TemporaryDirectory() as scratch:
        source = build_tiny_qwen3_vl(Path(scratch) / "tiny-qwen3-vl")
        convert_from_autoregressive(source, model_dir, block_size=4, overwrite=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    tiny_chat_dataset(num_rows).to_parquet(str(data_dir / "train.parquet"))
    return model_dir, data_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--num_rows", type=int, default=32)
    cli = parser.parse_args()
    model_dir, data_dir = main(cli.output_dir, cli.num_rows)
    print(f"model: {model_dir}\ndataset: {data_dir}")
