"""The guide cannot rot: every relative link of README.md and docs/ resolves (anchors included), every command the
pages show names real subcommands, flags, files and extras, and every public name has a docstring with an example.

Commands are checked with the real parsers, in this process: `transformers_bard.cli.build_parser()` for
`transformers-bard`, TRL's dataclasses for the training flags, the Makefile's targets, setup.cfg's extras, the scripts'
own argparse flags. Nothing is run; the tiny path the README walks through is exercised by tests/test_examples.py.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# programs a page may show without a check here: other projects' tools and the shell's
EXTERNAL = {"vllm", "git", "cp", "curl", "cd", "export", "ls", "echo", "cat"}


# ---------------------------------------------------------------------------------------------- markdown
def without_code(text: str) -> str:
    """The page without its fenced blocks and inline code spans (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not resolved.exists():
            problems.append(f"{where}: {path} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(root)}")
    return problems


def code_blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    return [body for language, body in FENCE.findall(text) if language in languages]


def shell_commands(text: str) -> list[list[str]]:
    """Each command of the page's bash blocks as argv: continuations joined, comments and env assignments dropped,
    `&&` / `;` / `|` split."""
    commands = []
    for body in code_blocks(text, ("bash", "sh", "shell")):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith(("#", "$ ")):
                continue
            for part in re.split(r"\s(?:&&|;|\|)\s", line):
                argv = shlex.split(part, comments=True)
                while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # OMP_NUM_THREADS=1 cmd ...
                    argv = argv[1:]
                if argv:
                    commands.append(argv)
    return commands


def synopsis_lines(text: str) -> list[str]:
    """`transformers-bard ...` usage lines: in text blocks and in inline code of the prose."""
    lines = [line for body in code_blocks(text, ("text",)) for line in body.splitlines()]
    lines += re.findall(r"`(transformers-bard [^`]+)`", FENCE.sub("", text).replace("\n", " "))
    return [line.split("#")[0].strip() for line in lines if line.startswith("transformers-bard ")]


# ---------------------------------------------------------------------------------------------- what is real
def cli_parser() -> argparse.ArgumentParser:
    from transformers_bard.cli import build_parser

    return build_parser()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def trl_fields(script: str) -> set[str]:
    """Field names `TrlParser` accepts as flags for a training entry point (`--config` included)."""
    from trl import ModelConfig, ScriptArguments

    if script in ("block-merge", "block_merge.py"):
        from transformers_bard.trainer.block_merge_config import BlockMergeConfig as config
    else:
        from transformers_bard.trainer.diffusion_distill_config import DiffusionDistillConfig as config
    return {"config"} | {field.name for cls in (ScriptArguments, config, ModelConfig) for field in dataclasses.fields(cls)}


def flag_names(arguments: list[str]) -> list[str]:
    return [arg[2:].split("=")[0] for arg in arguments if arg.startswith("--")]


def lmms_eval_flags() -> set[str] | None:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        return None
    source = (Path(spec.origin).parent / "__main__.py").read_text()
    return set(re.findall(r'"--([\w-]+)"', source))


def lmms_eval_models() -> set[str]:
    source = (ROOT / "src" / "transformers_bard_lmms_eval.py").read_text()
    names = set(re.findall(r'model_id="(\w+)"', source))
    return names | set(re.findall(r'aliases=\("(\w+)"', source))


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def extras() -> set[str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return set(config["options.extras_require"])


# ---------------------------------------------------------------------------------------------- command checks
def check_training_flags(name: str, arguments: list[str]) -> list[str]:
    problems = [f"unknown flag --{flag} of {name}" for flag in flag_names(arguments) if flag not in trl_fields(name)]
    recipes = [arguments[i + 1] for i, arg in enumerate(arguments[:-1]) if arg == "--config"]
    return problems + [f"recipe {recipe} does not exist" for recipe in recipes if not (ROOT / recipe).is_file()]


def check_transformers_bard(argv: list[str]) -> list[str]:
    """Parse with the CLI's own parser; pass-through arguments go to the parser they are passed to. A command with
    `[optional]` parts is a usage line: `check_synopsis`."""
    if any(arg.startswith("[") for arg in argv):
        return check_synopsis(" ".join(argv))
    parser = cli_parser()
    try:
        args, extra = parser.parse_known_args(argv[1:])
    except SystemExit:
        return [f"`{shlex.join(argv)}` does not parse (transformers-bard {argv[1:2]} --help)"]
    if args.command in ("block-merge", "distill"):
        return check_training_flags(args.command, extra)
    if args.command == "eval":
        known = lmms_eval_flags()
        return [] if known is None else [f"unknown lmms-eval flag --{f}" for f in flag_names(extra) if f not in known]
    return [f"unrecognized arguments {extra}"] if extra else []


def check_python(argv: list[str]) -> list[str]:
    if argv[1] == "-c":
        compile(argv[2], "<python -c>", "exec")
        return []
    if argv[1] == "-m":
        return []
    script = ROOT / argv[1]
    if not script.is_file():
        return [f"script {argv[1]} does not exist"]
    if script.name in ("block_merge.py", "diffusion_distill.py"):
        return check_training_flags(script.name, argv[2:])
    source = script.read_text()  # argparse scripts: every flag shown must be one the script defines
    return [f"{argv[1]} has no flag --{flag}" for flag in flag_names(argv[2:]) if f'"--{flag}"' not in source]


def check_command(argv: list[str], strict: bool) -> list[str]:
    program = argv[0]
    if program == "transformers-bard":
        return check_transformers_bard(argv)
    if program == "python":
        return check_python(argv)
    if program == "accelerate":
        config = argv[argv.index("--config_file") + 1]
        script = next(i for i, arg in enumerate(argv) if arg.endswith(".py"))
        problems = [] if (ROOT / config).is_file() else [f"accelerate config {config} does not exist"]
        return problems + check_python(["python", *argv[script:]])
    if program == "make":
        return [f"no Makefile target {target}" for target in argv[1:] if target not in make_targets()]
    if program == "pip":
        requested = {name for arg in argv for group in re.findall(r"\[([\w,]+)\]", arg) for name in group.split(",")}
        files = [argv[i + 1] for i, arg in enumerate(argv) if arg == "-c"]
        return [f"no extra [{name}] in setup.cfg" for name in requested - extras()] + [
            f"{name} does not exist" for name in files if not (ROOT / name).is_file()
        ]
    if program == "lmms-eval":
        problems = [] if argv[argv.index("--model") + 1] in lmms_eval_models() else [f"no lmms-eval model {argv}"]
        known = lmms_eval_flags()
        return problems + ([] if known is None else [f"no lmms-eval flag --{f}" for f in flag_names(argv) if f not in known])
    return [f"`{program}` is not a command this test knows; add a check for it"] if strict and program not in EXTERNAL else []


def check_synopsis(line: str) -> list[str]:
    """A usage line with placeholders: the subcommand exists and every --flag is one of its options."""
    words = line.split()
    parser = cli_parser()
    commands = subparsers(parser)
    if words[1:] and words[1] in {option for action in parser._actions for option in action.option_strings}:
        return []  # transformers-bard --help / --version
    if len(words) < 2 or words[1] not in commands:
        return [f"`{line}`: no subcommand {words[1:2]}"]
    options = {option for action in commands[words[1]]._actions for option in action.option_strings}
    flags = [flag for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", line) if not flag.startswith("--any_")]
    if words[1] in ("block-merge", "distill"):
        return check_training_flags(words[1], flags)
    if words[1] == "eval":
        flags = [flag for flag in flags if flag not in options and flag not in ("--batch_size",)]
    return [f"`{line}`: {words[1]} has no option {flag}" for flag in flags if flag not in options]


def command_problems(page: Path) -> list[str]:
    text = page.read_text()
    strict = page == README
    problems = [p for argv in shell_commands(text) for p in check_command(argv, strict)]
    problems += [p for line in synopsis_lines(text) for p in check_synopsis(line)]
    return [f"{page.relative_to(ROOT)}: {problem}" for problem in problems]


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_name_real_subcommands_flags_and_files(page):
    assert command_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_compile(page):
    """`compile` raises SyntaxError on a broken snippet, which fails the test."""
    for block in code_blocks(page.read_text(), ("python",)):
        compile(block, str(page), "exec")


def test_readme_is_a_guide():
    """Issue 30: at most 350 lines, the Quick start is exactly `make demo` and `make test`, every step of the path
    has a section."""
    text = README.read_text()
    assert len(text.splitlines()) <= 350
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert [argv for argv in shell_commands(quick)] == [["make", "demo"], ["make", "test"]]
    for heading in ("Install", "Convert", "Load and generate", "Train: progressive block merging",
                    "Distill: stage-wise distillation", "Evaluate with lmms-eval", "Serve", "Watch it decode",
                    "Push to the Hub", "Results"):
        assert re.search(rf"^#+ {re.escape(heading)}$", text, re.M), heading


def test_the_checks_can_fail(tmp_path):
    """A broken link, a missing anchor, an unknown flag, subcommand, recipe or extra are each reported."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [anchor](#nowhere)\n")
    assert [problem.split(": ", 2)[-1] for problem in broken_links(page, tmp_path)] == [
        "missing.md does not exist", "no heading with anchor #nowhere in page.md"]
    assert check_command(["transformers-bard", "convert", "a", "b", "--no-such-flag"], strict=True)
    assert check_command(["transformers-bard", "frobnicate"], strict=True)
    assert check_command(["transformers-bard", "generate", "ckpt"], strict=True)  # --prompt is required
    assert check_command(["transformers-bard", "block-merge", "--config", "examples/configs/nope.yaml"], strict=True)
    assert check_command(["transformers-bard", "block-merge", "--no_such_field", "1"], strict=True)
    assert check_command(["python", "examples/scripts/make_tiny_assets.py", "--outdir", "x"], strict=True)
    assert check_command(["pip", "install", "-e", ".[nonexistent]"], strict=True)
    assert check_command(["make", "deploy"], strict=True)
    assert check_command(["mystery-tool", "--x"], strict=True)
    assert check_synopsis("transformers-bard serve CHECKPOINT [--no-such-option]")
    assert not check_command(["transformers-bard", "convert", "a", "b", "--block-size", "8"], strict=True)
    assert not check_synopsis("transformers-bard serve CHECKPOINT [--port 8000]")


def public_objects():
    import transformers_bard

    return [(name, getattr(transformers_bard, name)) for name in transformers_bard.__all__ if name != "__version__"]


def user_set_arguments(obj) -> bool:
    signature = inspect.signature(obj)
    return any(name not in ("self", "args", "kwargs") for name in signature.parameters)


def docstring_examples(doc: str) -> list[str]:
    """The code of the docstring's ```python blocks, doctest prompts removed."""
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    return ["\n".join(re.sub(r"^\s*(>>> |\.\.\. ?)", "", line) for line in inspect.cleandoc(block).splitlines())
            for block in blocks]


@pytest.mark.parametrize("name", [name for name, _ in public_objects()])
def test_public_names_have_a_docstring_with_an_example(name):
    obj = dict(public_objects())[name]
    doc = obj.__doc__  # its own: a class without one would otherwise show a base class's
    assert doc and doc.strip(), f"{name} has no docstring"
    if user_set_arguments(obj):
        examples = docstring_examples(doc)
        assert examples, f"{name}'s docstring has no ```python example"
        for code in examples:
            compile(code, f"{name} docstring", "exec")
