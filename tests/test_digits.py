"""The digit-grid task (UCI handwritten digits) and the shipped autoregressive source model."""

import json
import re

import numpy as np
import pytest
import torch

from transformers_bard.demo import digits
from transformers_bard.demo.digits import (
    CELL_SIZE,
    QUESTION_TYPES,
    build_digits_dataset,
    digit_indices,
    evaluate,
    load_digits_ar_path,
    load_digits_arrays,
    make_question,
    render_grid,
    score_answer,
    time_decoding,
)
from transformers_bard.testing import build_tiny_tokenizer

# A hand-checked grid: column 3 reads 4 2 5 9; the digit at row 2, column 3 is 2.
GRID = np.array([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8], [9, 7, 9, 3]])
COLUMNS = {1: "3 5 5 9", 2: "1 9 3 7", 3: "4 2 5 9", 4: "1 6 8 3"}
ROWS = "3 1 4 1 | 5 9 2 6 | 5 3 5 8 | 9 7 9 3"


def _answer(row):
    return row["messages"][-1]["content"][-1]["text"]


def _question(row):
    return row["messages"][0]["content"][-1]["text"]


def test_packaged_digits_file():
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert labels.shape == (1797,) and sorted(set(labels.tolist())) == list(range(10))
    assert (digits.DIGITS_FILE.parent / "UCI_DIGITS_LICENSE.md").is_file()
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_splits_are_disjoint_stratified_and_complete():
    splits = {split: set(digit_indices(split).tolist()) for split in digits.SPLITS}
    assert not splits["train"] & splits["validation"]
    assert not splits["train"] & splits["test"]
    assert not splits["validation"] & splits["test"]
    assert set.union(*splits.values()) == set(range(1797))
    _, labels = load_digits_arrays()
    for label in range(10):
        share = np.isin(digit_indices("test"), np.flatnonzero(labels == label)).sum() / (labels == label).sum()
        assert 0.12 < share < 0.18


def test_datasets_use_only_their_split_images():
    train = build_digits_dataset("train", 40, seed=0)
    test = build_digits_dataset("test", 40, seed=0)
    train_ids = {i for ids in train["digit_ids"] for i in ids}
    test_ids = {i for ids in test["digit_ids"] for i in ids}
    assert train_ids <= set(digit_indices("train").tolist())
    assert test_ids <= set(digit_indices("test").tolist())
    assert not train_ids & test_ids


def test_deterministic_for_a_seed():
    first = build_digits_dataset("validation", 12, seed=3)
    second = build_digits_dataset("validation", 12, seed=3)
    other = build_digits_dataset("validation", 12, seed=4)
    assert first["messages"] == second["messages"] and first["digit_ids"] == second["digit_ids"]
    for a, b in zip(first["images"], second["images"]):
        assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert first["digit_ids"] != other["digit_ids"]


def test_vision_format():
    row = build_digits_dataset("train", 1, seed=0, question_weights=["read"])[0]
    user, assistant = row["messages"]
    assert user["role"] == "user" and user["content"][0]["type"] == "image"
    assert user["content"][1] == {"type": "text", "text": "Read all digits row by row."}
    assert assistant["role"] == "assistant" and assistant["content"][0]["type"] == "text"
    (image,) = row["images"]
    assert image.mode == "RGB" and image.size == (4 * CELL_SIZE, 4 * CELL_SIZE)


def test_render_grid_places_each_digit_in_its_cell():
    images, _ = load_digits_arrays()
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    pixels = np.asarray(render_grid(images[ids]))  # [64, 96, 3]
    assert pixels.shape == (2 * CELL_SIZE, 3 * CELL_SIZE, 3)
    scale = CELL_SIZE // 8
    for row in range(2):
        for col in range(3):
            cell = pixels[row * CELL_SIZE : (row + 1) * CELL_SIZE, col * CELL_SIZE : (col + 1) * CELL_SIZE, 0]
            ink = images[ids[row, col]]
            expected = 255 - (ink.astype(int) * 255 + 8) // 16
            np.testing.assert_array_equal(cell[::scale, ::scale], expected)
    assert pixels[..., 0].max() == 255  # white paper, dark ink


def test_render_grid_shifts_move_each_digit_inside_its_cell():
    images, _ = load_digits_arrays()
    ids = np.array([[10, 11]])
    plain = np.asarray(render_grid(images[ids]))
    assert np.array_equal(np.asarray(render_grid(images[ids], np.zeros((1, 2, 2), dtype=int))), plain)
    # 4 pixels = one original pixel: the first digit moves down one row (white row on top), the second stays.
    moved = images[ids].copy()
    moved[0, 0] = np.concatenate([np.zeros((1, 8), dtype=np.uint8), images[10][:-1]])
    shifted = np.asarray(render_grid(images[ids], np.array([[[4, 0], [0, 0]]])))
    assert np.array_equal(shifted, np.asarray(render_grid(moved)))
    with pytest.raises(ValueError, match="shifts"):
        render_grid(images[ids], np.full((1, 2, 2), 9))


def test_augment_changes_pixels_only():
    plain = build_digits_dataset("train", 6, seed=7)
    augmented = build_digits_dataset("train", 6, seed=7, augment=True)
    assert plain["messages"] == augmented["messages"] and plain["digit_ids"] == augmented["digit_ids"]
    differs = [
        not np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(plain["images"], augmented["images"])
    ]
    assert any(differs)


def test_hand_checked_answers():
    rng = np.random.default_rng(0)
    assert make_question("read", GRID, rng) == ("Read all digits row by row.", ROWS)
    assert make_question("read_twice", GRID, rng) == (
        "Read all digits row by row, then column by column.",
        ROWS + " ; 3 5 5 9 | 1 9 3 7 | 4 2 5 9 | 1 6 8 3",
    )
    asked = set()
    for _ in range(40):
        question, answer = make_question("column", GRID, rng)
        col = int(re.fullmatch(r"Read column (\d)\.", question).group(1))
        assert answer == COLUMNS[col]
        question, answer = make_question("position", GRID, rng)
        row, col = map(int, re.fullmatch(r"What digit is at row (\d), column (\d)\?", question).groups())
        assert int(answer) == GRID[row - 1, col - 1]
        asked.add((row, col))
    assert len(asked) > 8  # the cell is drawn, not fixed
    with pytest.raises(ValueError, match="question_type"):
        make_question("count", GRID, rng)


def test_answers_match_the_digit_labels():
    _, labels = load_digits_arrays()
    dataset = build_digits_dataset("test", 60, seed=1)
    assert set(dataset["question_type"]) == set(QUESTION_TYPES)
    for row in dataset:
        grid = np.asarray(row["digits"]).reshape(4, 4)
        np.testing.assert_array_equal(grid.reshape(-1), labels[row["digit_ids"]])
        question, answer = _question(row), _answer(row)
        numbers = [int(n) for n in re.findall(r"\d", question)]
        by_rows = " | ".join(" ".join(map(str, r)) for r in grid)
        if row["question_type"] == "read":
            expected = by_rows
        elif row["question_type"] == "read_twice":
            expected = by_rows + " ; " + " | ".join(" ".join(map(str, c)) for c in grid.T)
        elif row["question_type"] == "column":
            expected = " ".join(map(str, grid[:, numbers[0] - 1]))
        else:
            expected = str(grid[numbers[0] - 1, numbers[1] - 1])
        assert answer == expected


def test_answer_length_of_every_question_type():
    # The supervised response (answer + <|im_end|>) spans the lengths the issue asks for: one token, about a row, all
    # digits, and more than 32 + 1 tokens (a B = 32 model decodes it in several blocks).
    tokenizer = build_tiny_tokenizer()
    expected = {"position": 2, "column": 8, "read": 38, "read_twice": 78}
    dataset = build_digits_dataset("train", 40, seed=2, balanced=True)
    seen = set()
    for row in dataset:
        length = len(tokenizer.encode(_answer(row) + "<|im_end|>"))
        assert length == expected[row["question_type"]], (row["question_type"], _answer(row))
        seen.add(row["question_type"])
    assert seen == set(QUESTION_TYPES)


def test_question_weights_are_respected():
    weights = {"position": 3, "column": 2, "read": 1, "read_twice": 1}
    dataset = build_digits_dataset("train", 1400, seed=4, question_weights=weights)
    counts = {kind: dataset["question_type"].count(kind) for kind in weights}
    for kind, weight in weights.items():
        expected = 1400 * weight / 7
        # 4 binomial standard deviations: fails by chance about once in 10^4 seeds; a wrong weight misses by far more.
        assert abs(counts[kind] - expected) < 4 * (expected * (1 - weight / 7)) ** 0.5, counts
    only_read = build_digits_dataset("train", 10, seed=0, question_weights={"read": 1.0, "position": 0.0})
    assert set(only_read["question_type"]) == {"read"}


def test_balanced_rows_take_turns():
    dataset = build_digits_dataset("test", 10, seed=0, balanced=True)
    assert list(dataset["question_type"]) == [QUESTION_TYPES[i % 4] for i in range(10)]
    fewer = build_digits_dataset("test", 4, seed=0, question_weights={"read": 1, "column": 0, "position": 2},
                                 balanced=True)
    assert list(fewer["question_type"]) == ["read", "position", "read", "position"]


def test_question_weights_errors():
    with pytest.raises(ValueError, match="question_weights"):
        build_digits_dataset("train", 2, question_weights=["read", "sum"])
    with pytest.raises(ValueError, match="question_weights"):
        build_digits_dataset("train", 2, question_weights={"read": -1.0})
    with pytest.raises(ValueError, match="question_weights"):
        build_digits_dataset("train", 2, question_weights={"read": 0.0})
    with pytest.raises(ValueError, match="split"):
        build_digits_dataset("dev", 2)
    with pytest.raises(ValueError, match="num_samples"):
        build_digits_dataset("train", 0)


def test_score_answer():
    assert score_answer(" 3 1  4 |\n5 ", "3 1 4 | 5")
    assert not score_answer("3 1 4 | 6", "3 1 4 | 5")
    assert not score_answer("314", "3 1 4")


def test_shipped_checkpoint_layout_and_size():
    path = load_digits_ar_path()
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    ):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    assert (path / "model.safetensors").stat().st_size <= 11_000_000


@pytest.fixture(scope="module")
def shipped():
    from transformers import Qwen3VLForConditionalGeneration

    from transformers_bard.models.bard_vl.processing_bard_vl import BardVLProcessor

    path = load_digits_ar_path()
    return Qwen3VLForConditionalGeneration.from_pretrained(path).eval(), BardVLProcessor.from_pretrained(path)


def test_shipped_checkpoint_reads_one_token_per_digit(shipped):
    model, processor = shipped
    assert sum(p.numel() for p in model.parameters()) <= 5_000_000
    row = build_digits_dataset("test", 1, seed=0)[0]
    inputs = processor.apply_chat_template(
        row["messages"][:1],
        images=row["images"],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_shipped_checkpoint_reads_test_grids(shipped):
    # Measured on 200 unseen test grids per type (training_info.json): >= 98% on every type. Three of each must
    # mostly pass with greedy AR decoding; a broken checkpoint, processor or prompt format scores ~0.
    model, processor = shipped
    dataset = build_digits_dataset("test", 12, seed=123, balanced=True)
    scores = evaluate(model, processor, dataset, batch_size=12)
    assert scores["num_samples"] == 12 and scores["counts"] == {kind: 3 for kind in QUESTION_TYPES}
    assert scores["accuracy"] >= 0.75, scores["predictions"]
    assert scores["correct"] == [
        score_answer(p, _answer(row)) for p, row in zip(scores["predictions"], dataset)
    ]
    assert scores["tokens_per_forward"] == 1.0 and scores["num_forwards"] == scores["generated_tokens"]


def test_evaluate_batched_matches_one_by_one(shipped):
    # Left-padded batches must give the same greedy answers as batch 1.
    model, processor = shipped
    dataset = build_digits_dataset("test", 6, seed=5)
    single = evaluate(model, processor, dataset, batch_size=1)
    batched = evaluate(model, processor, dataset, batch_size=4)
    assert batched["predictions"] == single["predictions"]
    assert batched["generated_tokens"] == single["generated_tokens"]


def test_evaluate_and_time_a_bard_model(shipped, tmp_path):
    # The same loop decodes a converted BARD model: it reports tokens per forward, and the timing counts the same
    # answer tokens as the accuracy pass.
    from transformers_bard import BardVLForConditionalGeneration, convert_from_autoregressive

    model, processor = shipped
    convert_from_autoregressive(load_digits_ar_path(), tmp_path / "b4", block_size=4)
    bard = BardVLForConditionalGeneration.from_pretrained(tmp_path / "b4").eval()
    dataset = build_digits_dataset("test", 2, seed=6, question_weights=["column"])
    scores = evaluate(bard, processor, dataset, max_new_tokens=8, batch_size=2, generate_kwargs={"threshold": 0.5})
    assert scores["num_forwards"] >= 2 and scores["tokens_per_forward"] > 0
    timed = time_decoding({"ar": (model, None), "bard": (bard, {"threshold": 0.5})}, processor, dataset, 8)
    assert timed["bard"]["tokens"] == scores["generated_tokens"]
    assert timed["ar"]["tokens"] == evaluate(model, processor, dataset, max_new_tokens=8)["generated_tokens"]
    assert all(t["tokens_per_second"] > 0 for t in timed.values())
    with pytest.raises(ValueError, match="decoders"):
        time_decoding({}, processor, dataset)


def test_train_digits_ar_script_end_to_end(tmp_path):
    # The shipped source's training script, shrunk to seconds: it writes a loadable Hub-layout checkpoint and its
    # per-type test accuracies in training_info.json.
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "scripts" / "train_digits_ar.py"
    spec = importlib.util.spec_from_file_location("train_digits_ar", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "ar"
    module.main([
        "--output_dir", str(out), "--max_steps", "2", "--curriculum_steps", "1", "--batch_size", "2",
        "--text_hidden", "64", "--text_layers", "1", "--vision_hidden", "48", "--vision_depth", "1",
        "--num_threads", "1", "--eval_samples", "1", "--eval_batch_size", "1", "--logging_steps", "1",
    ])
    info = json.loads((out / "training_info.json").read_text())
    assert info["train_steps"] == 2 and info["torch_threads"] == 1
    for kind in QUESTION_TYPES:
        assert info[f"test_{kind}"]["num_samples"] == 1 and 0.0 <= info[f"test_{kind}"]["accuracy"] <= 1.0
    assert (out / "model.safetensors").is_file() and (out / "chat_template.json").is_file()

    # --init_from: continue from that checkpoint on the choice questions (how the choice task's source is made)
    more = tmp_path / "choice"
    module.main([
        "--output_dir", str(more), "--init_from", str(out), "--max_steps", "1", "--batch_size", "2",
        "--learning_rate", "0", "--question_weights", "any_row:1,two_rows:1", "--num_threads", "1",
        "--eval_samples", "1", "--eval_batch_size", "1", "--logging_steps", "1",
    ])
    info = json.loads((more / "training_info.json").read_text())
    assert {key for key in info if key.startswith("test_")} == {"test_any_row", "test_two_rows"}
    assert json.loads((more / "config.json").read_text())["text_config"]["hidden_size"] == 64  # not the default 192
    assert (more / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    before, after = load_file(out / "model.safetensors"), load_file(more / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # learning rate 0: the weights it started from


# ------------------------------------------------------------------------------------- the choice task (--task choice)
def _reference_choices(kind, grid):
    # Written from the task's definition, independently of `accepted_answers`: "row i : d d d d" (from 1), every
    # column likewise, and every ordered pair of two different rows joined by " | ".
    rows = [f"row {i + 1} : " + " ".join(map(str, grid[i])) for i in range(grid.shape[0])]
    cols = [f"column {j + 1} : " + " ".join(map(str, grid[:, j])) for j in range(grid.shape[1])]
    pairs = [a + " | " + b for a in rows for b in rows if a != b]
    return {"any_row": rows, "any_column": cols, "two_rows": pairs}[kind]


def test_choice_answers_hand_checked():
    assert digits.accepted_answers("any_row", GRID)[1] == "row 2 : 5 9 2 6"
    assert digits.accepted_answers("any_column", GRID)[2] == "column 3 : " + COLUMNS[3]
    pairs = digits.accepted_answers("two_rows", GRID)
    assert len(pairs) == 12 and "row 4 : 9 7 9 3 | row 1 : 3 1 4 1" in pairs
    assert "row 2 : 5 9 2 6 | row 2 : 5 9 2 6" not in pairs
    for kind in digits.CHOICE_QUESTION_TYPES:
        assert sorted(digits.accepted_answers(kind, GRID)) == sorted(_reference_choices(kind, GRID))
    with pytest.raises(ValueError, match="question_type"):
        digits.accepted_answers("read", GRID)


def test_choice_rows_accept_every_choice_and_draw_them_uniformly():
    dataset = build_digits_dataset("train", 300, seed=2, question_weights=list(digits.CHOICE_QUESTION_TYPES))
    chosen = {kind: [] for kind in digits.CHOICE_QUESTION_TYPES}
    for row in dataset:
        grid = np.asarray(row["digits"]).reshape(4, 4)
        kind, answer = row["question_type"], _answer(row)
        assert sorted(row["accepted"]) == sorted(_reference_choices(kind, grid))
        assert answer in row["accepted"]
        chosen[kind].append(int(answer.split(" ")[1]))  # the (first) row or column the answer names
    for kind, picks in chosen.items():
        counts = np.bincount(picks, minlength=5)[1:]
        assert counts.min() >= len(picks) / 4 * 0.5, (kind, counts)  # every choice is drawn, none dominates
    # the digits task's rows accept exactly their reference
    plain = build_digits_dataset("train", 8, seed=2)
    assert all(row["accepted"] == [_answer(row)] for row in plain)


def test_evaluate_scores_a_choice_answer_against_every_accepted_one(shipped, monkeypatch):
    # The AR source of the digits task answers a choice question with something; replace the decoded text by a
    # right answer other than the reference, then by a row number that does not match its digits.
    model, processor = shipped
    dataset = build_digits_dataset("test", 2, seed=9, question_weights=["any_row"])
    grids = [np.asarray(row["digits"]).reshape(4, 4) for row in dataset]
    others = [next(a for a in row["accepted"] if a != _answer(row)) for row in dataset]
    decoded = iter(others + ["row 1 : " + " ".join(map(str, grids[0][1])), _answer(dataset[1])])
    monkeypatch.setattr(processor.tokenizer, "decode", lambda *args, **kwargs: next(decoded))
    assert evaluate(model, processor, dataset, batch_size=2, max_new_tokens=2)["correct"] == [True, True]
    wrong = evaluate(model, processor, dataset, batch_size=2, max_new_tokens=2)
    assert wrong["correct"] == [grids[0][0].tolist() == grids[0][1].tolist(), True]
    assert wrong["per_type"] == {"any_row": wrong["accuracy"]}


def test_choice_task_shipped_source_and_config():
    from transformers_bard.demo.pipeline import PipelineConfig

    path = load_digits_ar_path("choice")
    info = json.loads((path / "training_info.json").read_text())
    for kind in digits.CHOICE_QUESTION_TYPES:  # the task's bar for its AR source
        assert info[f"test_{kind}"]["accuracy"] >= 0.98, (kind, info[f"test_{kind}"])
    config = PipelineConfig(task="choice")
    assert config.question_types == digits.CHOICE_QUESTION_TYPES
    assert set(config.question_weights) == set(digits.CHOICE_QUESTION_TYPES)
    with pytest.raises(ValueError, match="question_weights.*choice"):
        PipelineConfig(task="choice", question_weights={"read": 1.0})
    with pytest.raises(ValueError, match="task"):
        PipelineConfig(task="arithmetic")
    with pytest.raises(ValueError, match="task"):
        load_digits_ar_path("arithmetic")
