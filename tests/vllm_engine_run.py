"""Runs inside the vLLM virtual environment (`make vllm`), started by tests/test_vllm_engine.py: BARD-VL through a
real `vllm.LLM` on CPU, the plugin loaded by vLLM's own entry-point discovery (the package is installed there).

    .venv-vllm/bin/python tests/vllm_engine_run.py config CHECKPOINT OUT.json [CHECKPOINT OUT.json ...]
    .venv-vllm/bin/python tests/vllm_engine_run.py generate CHECKPOINT REQUESTS.json OUT.json

`config`: vLLM's plugin discovery (`load_general_plugins`, the `vllm.general_plugins` entry point) and vLLM's own
engine configuration of CHECKPOINT (`EngineArgs.create_engine_config`, which runs the plugin's config hook): whether
the architecture was registered, and the diffusion settings or vLLM's error; several checkpoints in one process, each
configured on its own, share the cost of importing vLLM. `generate`: the answers.

REQUESTS.json: a list of requests, each ``{"prompt_token_ids": [...]}`` or ``{"prompt": chat_text, "image_seed": s,
"image_size": [w, h]}`` (the image is rebuilt with `transformers_bard.testing.make_image`, so vLLM runs its own
Qwen3-VL processor and vision tower), with ``"max_tokens"`` and ``"join_after"`` (the number of engine steps after
which the request is added: requests join a running batch at different steps). OUT.json: the answers' token ids
in request order, the engine start-up seconds and the versions.
"""

import json
import sys
import time


def engine_config(checkpoint: str, out_path: str) -> int:
    import vllm
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    # the plugin's model module against the real runner's names (DefaultModelState, build_attn_metadata, ...)
    from transformers_bard.integrations.vllm.model import BardVLForVLLM

    record = {"model_state": BardVLForVLLM.get_model_state_cls().__mro__[1].__module__,
              "vllm": vllm.__version__,
              "registered": "BardVLForConditionalGeneration" in ModelRegistry.get_supported_archs()}
    try:
        config = EngineArgs(model=checkpoint, dtype="float32", max_model_len=512, enforce_eager=True).create_engine_config()
        record.update(ok=True, is_diffusion=config.model_config.is_diffusion,
                      canvas_length=config.diffusion_config.canvas_length,
                      backend=config.attention_config.backend.name, model_runner_v2=config.use_v2_model_runner)
    except Exception as error:  # vLLM's refusal, recorded for the test to check
        record.update(ok=False, error=f"{type(error).__name__}: {error}")
    from transformers_bard.integrations.vllm.config import _attention_backends

    allowed, default = _attention_backends()  # on vLLM's real platform object
    record.update(platform_is_cpu=vllm.platforms.current_platform.is_cpu(), default_backend=default.name,
                  allowed_backends=[backend.name for backend in allowed])
    open(out_path, "w").write(json.dumps(record))
    return 0


def main() -> int:
    if sys.argv[1] == "config":
        pairs = sys.argv[2:]
        for checkpoint, out_path in zip(pairs[::2], pairs[1::2]):
            engine_config(checkpoint, out_path)
        return 0
    checkpoint, requests_path, out_path = sys.argv[2:5]
    import vllm
    from vllm import LLM, SamplingParams

    from transformers_bard.testing import make_image

    requests = json.loads(open(requests_path).read())
    start = time.perf_counter()
    # CPU: no CUDA graphs; a small context (the tiny checkpoint), eager so that start-up stays short
    llm = LLM(model=checkpoint, dtype="float32", max_model_len=512, max_num_seqs=8, enforce_eager=True,
              limit_mm_per_prompt={"image": 1, "video": 0})
    startup = time.perf_counter() - start
    engine = llm.llm_engine
    pending = sorted(range(len(requests)), key=lambda i: requests[i]["join_after"])
    answers: dict[int, list[int]] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        while pending and requests[pending[0]]["join_after"] <= steps:
            i = pending.pop(0)
            request = requests[i]
            if "prompt_token_ids" in request:
                prompt = {"prompt_token_ids": request["prompt_token_ids"]}
            else:
                image = make_image(request["image_seed"], tuple(request["image_size"]))
                prompt = {"prompt": request["prompt"], "multi_modal_data": {"image": image}}
            params = SamplingParams(max_tokens=request["max_tokens"], temperature=1.0, detokenize=False)
            engine.add_request(str(i), prompt, params)
        for output in engine.step():
            if output.finished:
                answers[int(output.request_id)] = list(output.outputs[0].token_ids)
        steps += 1
    record = {"answers": [answers[i] for i in range(len(requests))], "startup_s": round(startup, 1),
              "engine_steps": steps, "vllm": vllm.__version__}
    open(out_path, "w").write(json.dumps(record))
    return 0


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from rerunning this script
    sys.exit(main())
