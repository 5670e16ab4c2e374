"""Built-in data: the handwritten-digit grid task (UCI digits, CC BY 4.0) and its autoregressive source model."""

from .digits import (
    QUESTION_TYPES,
    build_digits_dataset,
    digit_indices,
    evaluate_ar,
    load_digits_ar_path,
    load_digits_arrays,
    render_grid,
    score_answer,
    write_digits_file,
)

__all__ = [
    "QUESTION_TYPES",
    "build_digits_dataset",
    "digit_indices",
    "evaluate_ar",
    "load_digits_ar_path",
    "load_digits_arrays",
    "render_grid",
    "score_answer",
    "write_digits_file",
]
