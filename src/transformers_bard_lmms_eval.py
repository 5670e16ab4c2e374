"""The `lmms_eval.models` entry point of transformers-bard: the manifests of `bard_vl`, its alias and `bard_vl_ar`.

A top-level module, outside the `transformers_bard` package, on purpose: lmms-eval loads every `lmms_eval.models`
entry point on each `import lmms_eval.models`, and importing anything inside `transformers_bard` first runs the
package's `__init__`, which imports torch and transformers to register the Auto classes (the package's contract). This
module imports only lmms-eval's registry, and only when called; the adapters it names
(`transformers_bard.integrations.lmms_eval_models`) are imported by lmms-eval when one of their names is requested.
"""

_MODELS = "transformers_bard.integrations.lmms_eval_models"


def model_manifests():
    """The payload of the `lmms_eval.models` entry point: one `ModelManifest` per model name."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id="bard_vl",
            simple_class_path=f"{_MODELS}.BardVLSimple",
            chat_class_path=f"{_MODELS}.BardVLChat",
            aliases=("transformers_bard",),
        ),
        ModelManifest(
            model_id="bard_vl_ar",
            simple_class_path=f"{_MODELS}.BardVLARSimple",
            chat_class_path=f"{_MODELS}.BardVLARChat",
        ),
    ]
