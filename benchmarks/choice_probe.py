"""Why large blocks fail on the choice task (issue 29): a conditioning probe, a trace of the first wrong commit and
the loss by answer part, on the models of a `transformers-bard demo --task choice` run.

    python benchmarks/choice_probe.py --run demo_output --samples 300 --out docs/demo_results/choice_probe

The choice task's answers name what they chose (`row 3 : 5 3 5 8`), so the digits depend on the choice token. In
every model of the run (the AR source, PBM at each B, PBM + SWD at each B > 4) this measures:

(a) **Conditioning.** The answer of the row's choice c (c cycles over the rows/columns/pairs so every choice is
    probed equally) is teacher-forced into one packed row ``[prompt ; x0 ; xt]`` -- the layout and forward of
    training, DESIGN 3.1 -- with these positions of xt masked and every other token visible:
    - `choice visible`: every digit masked; exact = the argmax digits are all the chosen row's digits;
    - `digits visible`: every choice token masked; exact = the argmax choice tokens name a line whose digits are the
      visible ones (any such line: two rows may hold the same digits);
    - `both masked`: choice tokens and digits masked; `coherent` = the argmax digits and choice are one accepted
      answer (the joint of independent per-position argmaxes, i.e. a one-forward commit of everything).
    A noisy token of block b sees the prompt, the clean x0 of blocks < b and the noisy tokens of its own block (DESIGN
    3.2), so where the choice and the digits share a block, only within-block attention can carry the choice. The AR
    source is teacher-forced causally (its logit at p - 1 predicts p): its numbers are the reference.
(b) **First wrong commit.** `generate(output_trace=True)` on the same prompts at tau (default 0.9) with
    `--unmask-order` (default `confidence`, the rule of the failing runs; `left_to_right` shows what is left); for every
    answer that ends wrong, the first forward after which the decided tokens fit no accepted answer, the tokens that
    forward decided, their confidence and rule (`above tau`, `forced minimum` k_s, `EOS fill`, `revision`), and
    whether one of them alone already fits no answer (`single`: a wrong token) or each fits some answer and only
    together they fit none (`joint`: parallel commits of mutually inconsistent tokens).
(c) **Loss by answer part.** Each model's training objective on training rows, batched and noised exactly as in
    training (the run's collator, the model's B and noise prior): plain CE and the share of the ELBO-weighted loss
    (1/t; half weight on EOS padding, DESIGN 3.4) at corrupted positions, split into choice tokens, digits, other
    answer tokens, the answer's EOS and the EOS padding past it.

Prints the tables and writes `probe.json` and `probe.md` to `--out`. CPU, one thread by default.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

PARTS = ("choice", "digits", "other", "eos", "eos_padding")


# ---------------------------------------------------------------------------------------------- answer parts
def answer_parts(tokens: list[str]) -> list[str]:
    """The part of every token of an answer (`row 3 : 5 3 5 8` -> words/spaces `other`, `3` `choice`, `5 3 5 8`
    `digits`): a digit token is a choice when the last non-space token before it ends a line name (`row`, or the
    `n` of a spelled-out `column`), a digit of the reading otherwise."""
    parts, last = [], ""
    for token in tokens:
        text = token.strip()
        if text.isdigit():
            parts.append("choice" if last.endswith(("row", "n")) else "digits")
        else:
            parts.append("other")
        if text:
            last = text
    return parts


def _texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text (byte-level BPE token strings spell a space as "\u0120")."""
    return [tokenizer.decode([i]) for i in ids]


# ---------------------------------------------------------------------------------------------- models
def find_models(run: Path) -> dict[str, Path]:
    """name -> folder of every model of a demo run: PBM stages, SWD students (the AR source is added by the caller)."""
    found = {}
    for stage in sorted((run / "pbm").glob("stage-b*"), key=lambda p: int(p.name[len("stage-b"):])):
        found[f"PBM B={stage.name[len('stage-b'):]}"] = stage
    for folder in sorted(run.glob("swd-b*"), key=lambda p: int(p.name[len("swd-b"):])):
        stage = folder / f"stage-b{folder.name[len('swd-b'):]}"
        if stage.exists():
            found[f"PBM+SWD B={folder.name[len('swd-b'):]}"] = stage
    return found


def load(path: Path):
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    import transformers_bard  # noqa: F401  (registers bard_vl)
    from transformers_bard import BardVLForConditionalGeneration

    if getattr(AutoConfig.from_pretrained(path), "block_size", None) is None:
        return Qwen3VLForConditionalGeneration.from_pretrained(path).eval()
    return BardVLForConditionalGeneration.from_pretrained(path).eval()


def _row_choice_ids(tokenizer, rows: int = 4) -> list[int]:
    """Token ids of the row numbers 1..rows as they appear at a choice position (single-digit tokens)."""
    ids = [tokenizer(str(k), add_special_tokens=False)["input_ids"] for k in range(1, rows + 1)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"row numbers must be single tokens, got {ids}")
    return [i[0] for i in ids]


def _second_choice(parts: list[str]) -> tuple[int, int] | None:
    """(position of the first choice, position of the second) of a two_rows answer's parts, or None."""
    choices = [i for i, p in enumerate(parts) if p == "choice"]
    return (choices[0], choices[1]) if len(choices) >= 2 else None


def _score_repeat(results, logits_row: torch.Tensor, first: int, candidates: list[int]) -> None:
    """Record p(second choice = first choice), renormalised over the row numbers, and whether the argmax repeats."""
    probs = torch.softmax(logits_row.float()[candidates], dim=-1)
    index = candidates.index(first)
    counter = results["repeat|two_rows"]
    counter["rows"] += 1
    counter["p_repeat_x1000"] += round(1000 * float(probs[index]))
    counter["argmax_repeats"] += int(int(probs.argmax()) == index)


# ---------------------------------------------------------------------------------------------- (a) probe
def probe_rows(dataset):
    """Rows with their probed answer: the accepted answer of choice (row index mod number of choices)."""
    rows = []
    for i in range(len(dataset)):
        row = dataset[i]
        accepted = row["accepted"]
        answer = accepted[i % len(accepted)]
        messages = [*row["messages"][:-1], {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        rows.append({"messages": messages, "images": row["images"], "answer": answer, "accepted": accepted,
                     "question_type": row["question_type"], "bard_sample_index": i})
    return rows


def _layout(batch):
    """Columns of x0 and xt in the packed batch: (P, R)."""
    seg = batch["segment_ids"]
    R = (seg == 3).long().sum(-1).max().item()
    L = seg.shape[1]
    return L - 2 * R, R


def conditioning_probe(model, collator, rows, tokenizer, batch_size: int = 25) -> dict:
    """(a) for one BARD model: per condition and question type, exact and coherent counts (module docstring)."""
    mask_id = model.config.mask_token_id
    candidates = _row_choice_ids(tokenizer)
    results = defaultdict(lambda: Counter())
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        P, R = _layout(batch)
        x0 = batch["input_ids"][:, P : P + R]  # [b, R]
        real = batch["segment_ids"][:, P + R :] == 3  # [b, R]
        parts, texts = [], []
        for r in range(len(chunk)):
            ids = x0[r][real[r]].tolist()
            n = len(tokenizer(chunk[r]["answer"], add_special_tokens=False)["input_ids"])
            token_texts = _texts(tokenizer, ids[:n])
            parts.append(answer_parts(token_texts) + ["eos"] * (len(ids) - n) + ["pad"] * (R - len(ids)))
            texts.append(token_texts + [""] * (R - n))
        kinds = torch.tensor([[p == "choice" for p in row] for row in parts])  # [b, R]
        digits = torch.tensor([[p == "digits" for p in row] for row in parts])
        # the second line of a two_rows answer (after its `|`): its choice and digits masked, the first line visible
        second = torch.tensor([[p in ("choice", "digits") and "|" in "".join(row_texts[:j]) for j, p in enumerate(row)]
                               for row, row_texts in zip(parts, texts)])
        for condition, hidden in (("choice visible", digits), ("digits visible", kinds),
                                  ("both masked", digits | kinds), ("first line visible", second)):
            xt = torch.where(hidden, torch.full_like(x0, mask_id), x0)
            inputs = {k: v for k, v in batch.items() if k in ("segment_ids", "mm_token_type_ids", "pixel_values",
                                                              "image_grid_thw")}
            input_ids = batch["input_ids"].clone()
            input_ids[:, P + R :] = xt
            logits_mask = torch.zeros_like(batch["segment_ids"], dtype=torch.bool)
            logits_mask[:, P + R :] = hidden
            with torch.inference_mode():
                out = model(input_ids=input_ids, logits_mask=logits_mask, **inputs)
            scores = out.logits.float().clone()
            if condition == "first line visible":
                # logits are [N, vocab] at the hidden positions, row-major: index them per row
                hidden_rows, hidden_cols = hidden.nonzero(as_tuple=True)
                for r, row in enumerate(chunk):
                    pair = _second_choice(parts[r]) if row["question_type"] == "two_rows" else None
                    if pair is None:
                        continue
                    at = ((hidden_rows == r) & (hidden_cols == pair[1])).nonzero()
                    _score_repeat(results, scores[int(at[0, 0])], int(x0[r, pair[0]]), candidates)
            scores[:, mask_id] = -float("inf")
            predicted = scores.argmax(-1)
            filled = xt.clone()
            filled[hidden] = predicted
            for r, row in enumerate(chunk):
                _score(results, condition, row, filled[r][real[r]].tolist(), x0[r][real[r]].tolist(), tokenizer)
    return {key: dict(value) for key, value in results.items()}


def _score(results, condition, row, filled: list[int], clean: list[int], tokenizer) -> None:
    n = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
    text = tokenizer.decode(filled[:n])
    kind = row["question_type"]
    counter = results[f"{condition}|{kind}"]
    counter["rows"] += 1
    if condition == "choice visible":
        exact = filled[:n] == clean[:n]
    elif condition == "digits visible":
        # any accepted answer with these digits (two rows may read the same) and this choice
        exact = text in row["accepted"]
    elif condition == "first line visible":
        # exact: the second choice names another row than the first (two_rows asks for different rows)
        names = [line.split(" : ")[0] for line in text.split(" | ")]
        exact = len(names) == 2 and names[0] != names[1]
    else:  # both masked: the probed answer itself
        exact = text == row["answer"]
    counter["exact"] += int(exact)
    counter["coherent"] += int(text in row["accepted"])


def ar_probe(model, processor, rows, tokenizer) -> dict:
    """(a) for the AR source: teacher-forced causally, the argmax at every digit/choice position from the previous
    position, given the true earlier tokens."""
    results = defaultdict(lambda: Counter())
    candidates = _row_choice_ids(tokenizer)
    for row in rows:
        messages = row["messages"]
        text = processor.apply_chat_template(messages, tokenize=False)
        inputs = processor(text=[text], images=[row["images"]], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        answer_ids = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        # the answer sits right before the final `<|im_end|>` (and its newline) of the rendered chat
        end = max(i for i in range(len(ids) - len(answer_ids) + 1) if ids[i : i + len(answer_ids)] == answer_ids)
        with torch.inference_mode():
            logits = model(**inputs).logits[0]
        predicted = logits[end - 1 : end - 1 + len(answer_ids)].argmax(-1).tolist()
        parts = answer_parts(_texts(tokenizer, answer_ids))
        kind = row["question_type"]
        pair = _second_choice(parts) if kind == "two_rows" else None
        if pair is not None:  # the logit at p - 1 predicts p, given the true first line
            _score_repeat(results, logits[end - 1 + pair[1]], answer_ids[pair[0]], candidates)
        # causal: the choice comes before the digits, so only "choice visible" is defined for the AR source
        for condition, which in (("choice visible", "digits"),):
            counter = results[f"{condition}|{kind}"]
            counter["rows"] += 1
            ok = all(p == a for p, a, part in zip(predicted, answer_ids, parts) if part == which)
            counter["exact"] += int(ok)
            counter["coherent"] += int(ok)
    return {key: dict(value) for key, value in results.items()}


# ---------------------------------------------------------------------------------------------- (b) trace
def _consistent(decided: dict[int, int], answers: list[list[int]]) -> bool:
    return any(all(pos < len(a) and a[pos] == tok for pos, tok in decided.items()) for a in answers)


def first_wrong_commits(model, processor, dataset, tau: float, max_new_tokens: int, batch_size: int = 25,
                        extra: dict | None = None) -> dict:
    """(b): for each wrong answer, the forward, tokens, confidence and rule of the first commit that leaves the
    decided tokens consistent with no accepted answer."""
    from transformers_bard.demo.digits import _prepare, score_answer

    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    B = model.config.block_size
    events, rows_out = Counter(), []
    wrong = total = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        inputs = _prepare(processor, rows)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, threshold=tau,
                                 return_dict_in_generate=True, output_trace=True,
                                 pad_token_id=tokenizer.pad_token_id, **(extra or {}))
        new = out.sequences[:, inputs["input_ids"].shape[1]:].tolist()
        for r, (tokens, accepted, kind) in enumerate(zip(new, rows["accepted"], rows["question_type"])):
            total += 1
            kept = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
            text = tokenizer.decode(kept, skip_special_tokens=True)
            if any(score_answer(text, a) for a in accepted):
                continue
            wrong += 1
            answers = []
            for a in accepted:
                ids = tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
                answers.append(ids + [eos] * (max_new_tokens + B - len(ids)))
            decided: dict[int, int] = {}
            found = None
            for event in out.trace[r]:
                changes = []  # (position, token, confidence, rule)
                base = event["block_start"]
                for pos, token, conf in event["unmasked"]:
                    filled = pos in event["eos_filled"]
                    rule = "EOS fill" if filled else ("above tau" if conf > tau else "forced minimum")
                    changes.append((base + pos, token, conf, rule))
                for pos, _old, new_token, conf in event["revised"]:
                    changes.append((base + pos, new_token, conf, "revision"))
                seen = {c[0] for c in changes}
                for pos in event["eos_filled"]:
                    if base + pos not in seen:
                        changes.append((base + pos, eos, float("nan"), "EOS fill"))
                if not changes:
                    continue
                before = dict(decided)
                for pos, token, _conf, _rule in changes:
                    decided[pos] = token
                if _consistent(decided, answers):
                    continue
                alone = [c for c in changes if not _consistent({**before, c[0]: c[1]}, answers)]
                kind_of = "single" if alone else "joint"
                culprits = alone or changes
                found = {
                    "question_type": kind, "forward": event["forward"], "kind": event["kind"],
                    "tokens_decided": len(changes), "error": kind_of,
                    "rules": sorted({c[3] for c in culprits}),
                    "confidence": [round(c[2], 3) for c in culprits if not math.isnan(c[2])],
                    "prediction": text,
                }
                events[(kind_of, ",".join(found["rules"]))] += 1
                break
            if found is None:
                events[("never inconsistent", "")] += 1
                found = {"question_type": kind, "error": "none found", "prediction": text}
            rows_out.append(found)
    return {"wrong": wrong, "total": total,
            "summary": [{"error": k[0], "rules": k[1], "count": v} for k, v in events.most_common()],
            "rows": rows_out}


# ---------------------------------------------------------------------------------------------- (c) loss by part
def loss_by_part(model, collator, rows, tokenizer, batch_size: int = 25) -> dict:
    """(c): plain CE and ELBO-weighted loss at corrupted positions, by answer part, under the training noise."""
    ce_sum, elbo_sum, count = Counter(), Counter(), Counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collator(chunk)
        P, R = _layout(batch)
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "segment_ids", "mm_token_type_ids",
                                                          "pixel_values", "image_grid_thw", "logits_mask")}
        with torch.inference_mode():
            logits = model(**inputs).logits.float()  # [N, vocab] at the corrupted positions, row-major
        target = labels[batch["logits_mask"]]
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        rates = batch["rates"][batch["logits_mask"]]
        eos_pad = batch["is_eos_padding"][batch["logits_mask"]]
        weight = torch.where(eos_pad, 0.5, 1.0) / rates.clamp(min=1e-3)
        rows_idx, cols = batch["logits_mask"].nonzero(as_tuple=True)
        part_of = {}
        for r, row in enumerate(chunk):
            n = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
            ids = batch["input_ids"][r, P : P + n].tolist()
            part_of[r] = answer_parts(_texts(tokenizer, ids)) + ["eos"]
        for i, (r, c) in enumerate(zip(rows_idx.tolist(), cols.tolist())):
            offset = c - P - R
            part = part_of[r][offset] if offset < len(part_of[r]) else "eos_padding"
            ce_sum[part] += float(ce[i])
            elbo_sum[part] += float(ce[i] * weight[i])
            count[part] += 1
    total = sum(elbo_sum.values()) or 1.0
    return {part: {"tokens": count[part], "ce": ce_sum[part] / count[part] if count[part] else None,
                   "elbo_share": elbo_sum[part] / total} for part in PARTS}


# ---------------------------------------------------------------------------------------------- main
def _fmt(hits: int, n: int) -> str:
    from transformers_bard.demo.claims import wilson_interval

    if not n:
        return "-"
    low, high = wilson_interval(hits, n)
    return f"{hits / n:.2f} [{low:.2f}, {high:.2f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of `transformers-bard demo --task choice`")
    parser.add_argument("--source", default=None, help="AR source (default: the shipped choice model)")
    parser.add_argument("--samples", type=int, default=300, help="test rows, equal per question type")
    parser.add_argument("--train-samples", type=int, default=150, help="training rows for the loss by part")
    parser.add_argument("--tau", type=float, default=0.9, help="threshold of the traced decoding")
    parser.add_argument("--unmask-order", default="confidence", choices=["confidence", "left_to_right"],
                        help="unmask_order of the traced decoding (default: confidence, the rule being diagnosed)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (test and training rows)")
    parser.add_argument("--noise-prior", default=None, help="override the noise prior read from the run")
    parser.add_argument("--models", default=None, help="comma-separated model names to probe (default all)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: probe,trace,loss")
    parser.add_argument("--out", default=None, help="folder for probe.json and probe.md")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers_bard import BardVLProcessor, MixedNoiseScheduler
    from transformers_bard.demo.digits import CHOICE_QUESTION_TYPES, build_digits_dataset, load_digits_ar_path
    from transformers_bard.trainer.collator import BlockDiffusionCollator

    run = Path(args.run)
    config = json.loads((run / "results.json").read_text())["config"] if (run / "results.json").exists() else {}
    prior = args.noise_prior or config.get("noise_prior", "mask")
    source = Path(args.source) if args.source else load_digits_ar_path("choice")
    processor = BardVLProcessor.from_pretrained(source)
    tokenizer = processor.tokenizer
    test = build_digits_dataset("test", args.samples, seed=args.seed, question_weights=CHOICE_QUESTION_TYPES,
                                balanced=True)
    train = build_digits_dataset("train", args.train_samples, seed=args.seed, question_weights=CHOICE_QUESTION_TYPES)
    probe = probe_rows(test)
    train_rows = [{**row, "bard_sample_index": i} for i, row in enumerate(probe_rows(train))]
    for row in train_rows:  # the loss by part scores the training answer itself
        row["messages"] = train[row["bard_sample_index"]]["messages"]
        row["answer"] = row["messages"][-1]["content"][-1]["text"]
    models = {"AR": source, **find_models(run)}
    if args.models:
        wanted = args.models.split(",")
        models = {k: v for k, v in models.items() if k in wanted}
    skip = set(filter(None, args.skip.split(",")))
    report = {"run": str(run), "noise_prior": prior, "samples": len(probe), "tau": args.tau,
              "unmask_order": args.unmask_order, "models": {}}
    for name, path in models.items():
        began = time.perf_counter()
        model = load(path)
        entry = {"path": str(path)}
        if name == "AR":
            if "probe" not in skip:
                entry["probe"] = ar_probe(model, processor, probe, tokenizer)
        else:
            B = model.config.block_size
            collator = BlockDiffusionCollator(processor, model.config.mask_token_id, block_size=B,
                                              noise_scheduler=MixedNoiseScheduler(prior=prior), seed=args.seed)
            if "probe" not in skip:
                entry["probe"] = conditioning_probe(model, collator, probe, tokenizer)
            if "trace" not in skip:
                extra = {"edit_threshold": 0.9} if prior == "mix" else {}
                extra["unmask_order"] = args.unmask_order
                entry["trace"] = first_wrong_commits(model, processor, test, args.tau, 96, extra=extra)
            if "loss" not in skip:
                entry["loss"] = loss_by_part(model, collator, train_rows, tokenizer)
        report["models"][name] = entry
        print(f"{name}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)

    text = render(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(report, indent=1))
        (out / "probe.md").write_text(text)
    return 0


def render(report: dict) -> str:
    from transformers_bard.demo.digits import CHOICE_QUESTION_TYPES

    lines = [f"Conditioning probe ({report['samples']} test rows, noise prior {report['noise_prior']}): exact "
             "[Wilson 95% CI] per question type", ""]
    header = "| model | condition | " + " | ".join(CHOICE_QUESTION_TYPES) + " |"
    lines += [header, "|---|---|" + "---|" * len(CHOICE_QUESTION_TYPES)]
    for name, entry in report["models"].items():
        for condition in ("choice visible", "digits visible", "both masked", "first line visible"):
            cells = []
            for kind in CHOICE_QUESTION_TYPES:
                c = entry.get("probe", {}).get(f"{condition}|{kind}")
                if not c:
                    cells.append("-")
                elif condition in ("both masked", "first line visible"):
                    cells.append(f"exact {_fmt(c['exact'], c['rows'])}, coherent {_fmt(c['coherent'], c['rows'])}")
                else:
                    cells.append(_fmt(c["exact"], c["rows"]))
            if condition == "first line visible":  # only two_rows has a second line
                cells = [cell if kind == "two_rows" else "-" for cell, kind in zip(cells, CHOICE_QUESTION_TYPES)]
            if any(cell != "-" for cell in cells):
                lines.append(f"| {name} | {condition} | " + " | ".join(cells) + " |")
    lines += ["", "Second choice of `two_rows` with the first line visible (BARD: the second line masked; AR: "
              "teacher-forced): mean probability of repeating the first choice, renormalised over the row numbers "
              "(1/4 = no exclusion, 0 = learned), and how often the argmax repeats it:", "",
              "| model | rows | p(repeat) | argmax repeats |", "|---|---:|---:|---|"]
    for name, entry in report["models"].items():
        c = entry.get("probe", {}).get("repeat|two_rows")
        if c:
            lines.append(f"| {name} | {c['rows']} | {c['p_repeat_x1000'] / 1000 / c['rows']:.3f} | "
                         f"{_fmt(c['argmax_repeats'], c['rows'])} |")
    lines += ["", f"First commit that leaves no accepted answer possible (tau {report['tau']}, unmask_order "
              f"{report.get('unmask_order', 'confidence')}):", "",
              "| model | wrong / rows | error | rules | count |", "|---|---|---|---|---:|"]
    for name, entry in report["models"].items():
        trace = entry.get("trace")
        if not trace:
            continue
        for item in trace["summary"]:
            lines.append(f"| {name} | {trace['wrong']} / {trace['total']} | {item['error']} | {item['rules']} | "
                         f"{item['count']} |")
    lines += ["", "Training objective by answer part (mean CE at corrupted positions; share of the ELBO loss):", "",
              "| model | " + " | ".join(PARTS) + " |", "|---|" + "---|" * len(PARTS)]
    for name, entry in report["models"].items():
        loss = entry.get("loss")
        if not loss:
            continue
        cells = [f"{v['ce']:.3f} ({100 * v['elbo_share']:.0f}%)" if v["ce"] is not None else "-"
                 for v in (loss[p] for p in PARTS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
