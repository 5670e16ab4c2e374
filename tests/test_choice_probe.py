"""benchmarks/choice_probe.py (issue 29's diagnosis): the answer-part labels, the consistency test of the trace
analysis, and a whole run of the script on a converted (untrained) checkpoint of the shipped choice source."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import choice_probe  # noqa: E402


def test_answer_parts_label_choices_and_digits():
    row = ["row", " ", "3", " ", ":", " ", "5", " ", "3"]
    assert choice_probe.answer_parts(row) == ["other", "other", "choice", "other", "other", "other", "digits",
                                              "other", "digits"]
    column = list("column") + [" ", "2", " ", ":", " ", "1"]
    assert choice_probe.answer_parts(column)[7] == "choice" and choice_probe.answer_parts(column)[-1] == "digits"
    two = ["row", " ", "1", " ", ":", " ", "4", " ", "|", " ", "row", " ", "2", " ", ":", " ", "9"]
    parts = choice_probe.answer_parts(two)
    assert [i for i, p in enumerate(parts) if p == "choice"] == [2, 12]
    assert [i for i, p in enumerate(parts) if p == "digits"] == [6, 16]


def test_consistency_is_checked_against_every_accepted_answer():
    answers = [[1, 2, 3], [1, 5, 6]]
    assert choice_probe._consistent({0: 1}, answers)
    assert choice_probe._consistent({0: 1, 2: 6}, answers)
    assert not choice_probe._consistent({1: 2, 2: 6}, answers)  # each fits one answer, together none
    assert not choice_probe._consistent({5: 1}, answers)  # past every answer's end


def test_repeat_probability_is_renormalised_over_the_row_numbers():
    from collections import Counter, defaultdict

    import torch

    results = defaultdict(Counter)
    logits = torch.full((10,), -50.0)
    logits[[3, 4, 5, 6]] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))  # row numbers 1..4 at ids 3..6
    logits[0] = 10.0  # a non-row token outside the candidates does not count
    choice_probe._score_repeat(results, logits, first=6, candidates=[3, 4, 5, 6])
    choice_probe._score_repeat(results, logits, first=3, candidates=[3, 4, 5, 6])
    c = results["repeat|two_rows"]
    assert c["rows"] == 2 and c["argmax_repeats"] == 1 and c["p_repeat_x1000"] == 400 + 100
    assert choice_probe._second_choice(["other", "choice", "digits", "other", "choice"]) == (1, 4)
    assert choice_probe._second_choice(["other", "choice", "digits"]) is None


@pytest.mark.slow
def test_probe_runs_on_a_converted_choice_checkpoint(tmp_path):
    from transformers_bard.conversion import convert_from_autoregressive
    from transformers_bard.demo.digits import load_digits_ar_path

    run = tmp_path / "run"
    convert_from_autoregressive(load_digits_ar_path("choice"), run / "pbm" / "stage-b4", block_size=4)
    out = tmp_path / "out"
    assert choice_probe.main(["--run", str(run), "--samples", "6", "--train-samples", "6", "--out", str(out)]) == 0
    report = json.loads((out / "probe.json").read_text())
    assert set(report["models"]) == {"AR", "PBM B=4"}
    ar = report["models"]["AR"]["probe"]
    # the AR source reads the chosen line exactly when teacher-forced (a wrong reading would show here)
    assert all(c["exact"] == c["rows"] == 2 for key, c in ar.items() if key.startswith("choice visible"))
    bard = report["models"]["PBM B=4"]
    assert sum(c["rows"] for key, c in bard["probe"].items() if key.startswith("choice visible")) == 6
    trace = bard["trace"]
    assert trace["total"] == 6 and sum(item["count"] for item in trace["summary"]) == trace["wrong"]
    assert len(trace["rows"]) == trace["wrong"]
    loss = bard["loss"]
    assert sum(part["tokens"] for part in loss.values()) > 0
    assert abs(sum(part["elbo_share"] for part in loss.values()) - 1.0) < 1e-6
    # the second choice of each two_rows row (2 of the 6 balanced rows), for the AR source and the BARD model
    for name in ("AR", "PBM B=4"):
        repeat = report["models"][name]["probe"]["repeat|two_rows"]
        assert repeat["rows"] == 2 and 0 <= repeat["p_repeat_x1000"] <= 2000
    assert "Conditioning probe" in (out / "probe.md").read_text()
    assert "p(repeat)" in (out / "probe.md").read_text()
