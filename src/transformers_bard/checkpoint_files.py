"""Checks of a checkpoint folder before any work is done with it (issue 23: bad files are refused up front).

Conversion copies safetensors shards byte for byte without reading them, and the trainers load the model only after
building their configuration: a truncated or corrupted shard, or a folder of another architecture, would otherwise
surface late, as a low-level error that names neither the file nor the fix. These checks read only the headers
(memory-mapped), never the tensor data.
"""

from __future__ import annotations

import json
import os
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


__all__ = ["check_model_type", "check_safetensors_files", "read_config"]
