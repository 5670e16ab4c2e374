"""The warning filters of pyproject.toml: a deprecation attributed to our modules fails the test; the third-party
deprecations it lists are ignored by message and module, and only those."""

import warnings

import pytest


def warn_from(module: str, message: str, category: type[Warning]) -> None:
    """`warnings.warn` run by code whose module is `module`: the filters match the caller's `__name__`."""
    code = compile(f"import warnings\nwarnings.warn({message!r}, {category.__name__})", f"<{module}>", "exec")
    exec(code, {"__name__": module})


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["transformers_bard", "transformers_bard.trainer.block_merge_trainer"])
def test_our_deprecations_are_errors(module, category):
    with pytest.raises(category, match="old name"):
        warn_from(module, "`old name` is deprecated", category)


@pytest.mark.parametrize(
    "module, message, category, shown",
    [
        # peft's read of transformers' deprecated alias: ignored
        ("transformers.modeling_utils", "`is_gradient_checkpointing` is deprecated and will be removed in v6.",
         FutureWarning, False),
        # torch.compile's import of torch.utils.mkldnn: ignored
        ("torch.jit._script", "`torch.jit.script_method` is deprecated. Please switch to `torch.compile`.",
         DeprecationWarning, False),
        # any other transformers deprecation, and the same message from elsewhere, stay visible
        ("transformers.modeling_utils", "`something_else` is deprecated", FutureWarning, True),
        ("transformers.training_args", "`is_gradient_checkpointing` is deprecated", FutureWarning, True),
        ("peft.peft_model", "`is_gradient_checkpointing` is deprecated", FutureWarning, True),
        ("torch.utils.data", "deprecated", DeprecationWarning, True),
        # a module whose name merely starts like ours is not ours
        ("transformers", "`x` is deprecated", FutureWarning, True),
    ],
)
def test_third_party_deprecations_are_filtered_one_by_one(module, message, category, shown):
    with warnings.catch_warnings(record=True) as record:  # keeps the active filters, records what passes them
        warn_from(module, message, category)
    assert [str(w.message) for w in record] == ([message] if shown else [])
