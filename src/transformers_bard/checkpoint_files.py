"""Checks of a checkpoint folder before any work is done with it (issue 23: bad files are refused up front), and of
where a command writes (issue 39: the inputs are never written to).

Conversion copies safetensors shards byte for byte without reading them, and the trainers load the model only after
building their configuration: a truncated or corrupted shard, or a folder of another architecture, would otherwise
surface late, as a low-level error that names neither the file nor the fix. These checks read only the headers
(memory-mapped), never the tensor data.

`check_output_dir` is the one check, shared by the conversion, the trainers and their command lines, that an output
folder stays apart from the inputs: writing into a source, or replacing a folder that holds it, destroys it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

INDEX_NAME = "model.safetensors.index.json"


def read_config(folder: str | os.PathLike, argument: str) -> dict:
    """``config.json`` of a local checkpoint folder, as a dict; a clear error if it is absent or unreadable."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"`{argument}`={str(folder)!r} has no config.json; it is not a transformers checkpoint.")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"`{argument}`: {str(config_file)!r} is not valid JSON ({error}); the file is damaged. Restore it from the "
            "original checkpoint."
        ) from error


def check_model_type(folder: str | os.PathLike, argument: str, expected: tuple[str, ...], fix: str) -> dict:
    """Raise if the checkpoint's ``model_type`` is not one of `expected`; returns its config dict."""
    config = read_config(folder, argument)
    model_type = config.get("model_type")
    if model_type not in expected:
        architectures = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ValueError(
            f"`{argument}`={str(folder)!r} is a {model_type!r} checkpoint ({architectures}), not one of {expected}. "
            f"{fix}"
        )
    return config


def check_safetensors_files(folder: str | os.PathLike, argument: str) -> None:
    """Raise, naming the file, if a ``*.safetensors`` file of `folder` is truncated or corrupted (its header does not
    parse or does not cover the file), or if a shard listed in ``model.safetensors.index.json`` is missing."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            listed = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"`{argument}`: {str(index)!r} is not a valid safetensors index ({type(error).__name__}: {error}). "
                "Restore it from the original checkpoint."
            ) from error
        missing = sorted(name for name in listed if not (folder / name).is_file())
        if missing:
            raise ValueError(
                f"`{argument}`: {str(index)!r} lists shard(s) {missing} that are not in the folder (an incomplete "
                "download or copy). Download or copy the checkpoint again."
            )
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"`{argument}`: {str(path)!r} is truncated or corrupted ({error}). Download or copy the checkpoint "
                "again; nothing was written."
            ) from error


def _path_forms(path: str | os.PathLike) -> list[Path]:
    """`path` made absolute as written (``..`` folded, trailing slashes dropped), then with every symbolic link
    resolved: a symbolic link can make two paths that read apart name the same folder, and the other way round."""
    path = Path(path).expanduser()
    return list(dict.fromkeys([Path(os.path.abspath(path)), path.resolve()]))


def _overlap(output: Path, other: Path) -> str | None:
    if output == other:
        return "is"
    if other in output.parents:
        return "lies inside"
    if output in other.parents:
        return "contains"
    return None


def check_output_dir(
    output_dir: str | os.PathLike,
    argument: str,
    inputs: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike] | None],
    *,
    replaced: bool = False,
    suffix: str = "output",
) -> None:
    """Raise before anything is written if `output_dir` is, contains or lies inside one of `inputs`.

    Args:
        output_dir: where the command writes.
        argument: its name in the errors (`output_dir`, `--output_dir`, ...).
        inputs: argument name -> the local path(s) it reads; paths that do not exist (a Hub id) and None are skipped.
        replaced: the command replaces `output_dir` as a whole (conversion): the current folder and its ancestors are
            refused too, since replacing them pulls the folder the user works in from under them.
        suffix: the fix proposes a folder beside the input named ``{input}-{suffix}``.
    """
    outputs = _path_forms(output_dir)
    for name, paths in inputs.items():
        for path in [paths] if paths is None or isinstance(paths, (str, os.PathLike)) else paths:
            if path is None or not os.path.lexists(os.path.expanduser(str(path))):
                continue
            for output in outputs:
                relation = next(filter(None, (_overlap(output, form) for form in _path_forms(path))), None)
                if relation is None:
                    continue
                example = f"{os.path.abspath(os.path.expanduser(str(path)))}-{suffix}"
                raise ValueError(
                    f"`{argument}`={str(output_dir)!r} ({output}) {relation} `{name}`={str(path)!r}: writing there "
                    f"could change or delete `{name}`, which is only ever read. Choose a folder outside it, such "
                    f"as {example!r}. Nothing was written."
                )
    if replaced:
        cwd = Path.cwd().resolve()
        for output in outputs:
            if output == cwd or output in cwd.parents:
                where = "the current folder" if output == cwd else "an ancestor of the current folder"
                raise ValueError(
                    f"`{argument}`={str(output_dir)!r} ({output}) is {where}: the folder is replaced as a whole, which "
                    f"would pull it from under you. Pass a new folder, such as {str(cwd / suffix)!r}. Nothing was "
                    "written."
                )


__all__ = ["check_model_type", "check_output_dir", "check_safetensors_files", "read_config"]
