"""The vLLM plugin's glue (`transformers_bard.integrations.vllm`: `register`, `config`, `model`), run against a
stand-in of the few vLLM names it imports, since vLLM itself cannot be installed or run on this CPU machine.

The stand-in runner follows vLLM 0.33's diffusion contract as read from its source (docs/serving/engines.md):
requests arrive at different steps, prompts are prefilled in chunks, the attention of each request in a forward is
causal or bidirectional as the plugin's `prepare_attn` says (the runner builds its masks from that flag, so a wrong
flag changes the answers), canvas tokens come from the runner's draft-token buffer that the plugin's sampler writes,
and the KV and output of a forward follow the sampler's `num_sampled`/`num_rejected`. Every answer must equal
`model.generate(fuse_commit=False, prefill_step=False)`.
"""

import enum
import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the stand-in of vLLM
class CUDAGraphMode(enum.Enum):
    NONE = 0
    FULL = 2


class AttentionBackendEnum(enum.Enum):
    FLASH_ATTN = "flash"
    TRITON_ATTN = "triton"
    FLASHINFER = "flashinfer"
    CPU_ATTN = "cpu"


@dataclass
class DiffusionConfig:
    canvas_length: int
    max_denoising_steps: int | None = None


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor
    logprobs_tensors: object
    num_nans: object
    num_sampled: torch.Tensor
    num_rejected: torch.Tensor


class DefaultModelState:
    def __init__(self, vllm_config, model, encoder_cache, device):
        self.vllm_config, self.model, self.device = vllm_config, model, device
        self.model_config = vllm_config.model_config
        self.max_num_reqs = vllm_config.scheduler_config.max_num_seqs
        self.max_model_len = self.model_config.max_model_len

    def add_request(self, req_index, new_req_data):
        pass

    def remove_request(self, req_id):
        pass


class ModelRegistry:
    models: dict = {}

    @classmethod
    def get_supported_archs(cls):
        return set(cls.models)

    @classmethod
    def register_model(cls, arch, model_cls):
        cls.models[arch] = model_cls


class Logger:
    def info(self, *args):
        pass

    def warning_once(self, *args):
        pass


STAND_IN = {
    "vllm": {"ModelRegistry": ModelRegistry},
    "vllm.config": {},
    "vllm.config.compilation": {"CUDAGraphMode": CUDAGraphMode},
    "vllm.config.diffusion": {"DiffusionConfig": DiffusionConfig},
    "vllm.logger": {"init_logger": lambda name: Logger()},
    # a GPU platform: the CPU platform's choice (CPU_ATTN) runs on the real vLLM, tests/test_vllm_engine.py
    "vllm.platforms": {"current_platform": SimpleNamespace(is_cpu=lambda: False)},
    "vllm.model_executor": {},
    "vllm.model_executor.models": {},
    "vllm.model_executor.models.config": {"VerifyAndUpdateConfig": type("VerifyAndUpdateConfig", (), {}),
                                          "MODELS_CONFIG_MAP": {}},
    "vllm.model_executor.models.qwen3_vl": {"Qwen3VLForConditionalGeneration": type("Qwen3VL", (), {})},
    "vllm.v1": {},
    "vllm.v1.attention": {},
    "vllm.v1.attention.backends": {},
    "vllm.v1.attention.backends.registry": {"AttentionBackendEnum": AttentionBackendEnum},
    "vllm.v1.worker": {},
    "vllm.v1.worker.gpu": {},
    "vllm.v1.worker.gpu.attn_utils": {"build_attn_metadata": lambda **kwargs: kwargs},
    "vllm.v1.worker.gpu.model_states": {},
    "vllm.v1.worker.gpu.model_states.default": {"DefaultModelState": DefaultModelState},
    "vllm.v1.worker.gpu.sample": {},
    "vllm.v1.worker.gpu.sample.output": {"SamplerOutput": SamplerOutput},
}
PLUGIN_MODULES = ("transformers_bard.integrations.vllm.model", "transformers_bard.integrations.vllm.config")


@pytest.fixture
def fake_vllm(monkeypatch):
    for name, attributes in STAND_IN.items():
        module = types.ModuleType(name)
        for key, value in attributes.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
    for name in PLUGIN_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    ModelRegistry.models = {}
    yield sys.modules
    for name in PLUGIN_MODULES:  # imported against the stand-in: never reuse them
        sys.modules.pop(name, None)


# ---------------------------------------------------------------------------------------------- registration, config
def test_register_without_vllm_names_the_extra(monkeypatch):
    from transformers_bard.integrations.vllm import register

    monkeypatch.setitem(sys.modules, "vllm", None)  # import fails
    with pytest.raises(ImportError, match=r"transformers-bard\[vllm\]"):
        register()


def test_the_entry_point_is_installed():
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "bard_vl"]
    assert entry.value == "transformers_bard.integrations.vllm:register"


def test_register_adds_the_architecture_and_its_config_hook(fake_vllm):
    from transformers_bard.integrations.vllm import ARCHITECTURE, register

    register()
    register()  # vLLM calls it once per process; twice must be harmless
    assert ModelRegistry.models == {ARCHITECTURE: "transformers_bard.integrations.vllm.model:BardVLForVLLM"}
    hook = fake_vllm["vllm.model_executor.models.config"].MODELS_CONFIG_MAP[ARCHITECTURE]
    assert hook.__name__ == "BardVLVerifyConfig"


def test_config_hook_turns_the_diffusion_path_on_and_refuses_what_it_cannot_serve(fake_vllm, tiny_bard_vl_dir):
    from transformers_bard import BardVLConfig
    from transformers_bard.integrations.vllm.config import BardVLVerifyConfig

    hf_config = BardVLConfig.from_pretrained(tiny_bard_vl_dir)
    model_config = SimpleNamespace(hf_config=hf_config, override_generation_config={"max_new_tokens": 7})
    with pytest.raises(ValueError, match="prompt_attention"):
        BardVLVerifyConfig.verify_and_update_model_config(model_config)
    hf_config.prompt_attention = "causal"
    BardVLVerifyConfig.verify_and_update_model_config(model_config)
    assert hf_config.canvas_length == hf_config.block_size == 4
    assert model_config.override_generation_config == {"temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                                       "max_new_tokens": 7}

    def vllm_config(diffusion=None, backend=None, v2=True):
        return SimpleNamespace(model_config=model_config, diffusion_config=diffusion, use_v2_model_runner=v2,
                               attention_config=SimpleNamespace(backend=backend))

    config = vllm_config()
    BardVLVerifyConfig.verify_and_update_config(config)
    assert config.diffusion_config.canvas_length == 4
    assert config.attention_config.backend is AttentionBackendEnum.TRITON_ATTN
    config = vllm_config(backend=AttentionBackendEnum.FLASH_ATTN)
    BardVLVerifyConfig.verify_and_update_config(config)
    assert config.attention_config.backend is AttentionBackendEnum.FLASH_ATTN
    with pytest.raises(ValueError, match="FLASHINFER cannot mix"):
        BardVLVerifyConfig.verify_and_update_config(vllm_config(backend=AttentionBackendEnum.FLASHINFER))
    with pytest.raises(ValueError, match="only Model Runner V2 runs"):
        BardVLVerifyConfig.verify_and_update_config(vllm_config(v2=False))
    with pytest.raises(ValueError, match="canvas_length=8 does not match the checkpoint's block_size=4"):
        BardVLVerifyConfig.verify_and_update_config(vllm_config(diffusion=DiffusionConfig(canvas_length=8)))


# ---------------------------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def causal_model(tiny_bard_vl_dir, tmp_path_factory):
    """The confident tiny checkpoint (LM head x30, threshold 0.6) with a causal prompt, saved (vLLM reads the
    generation config from the folder)."""
    from transformers_bard import BardVLForConditionalGeneration, BardVLProcessor

    model = BardVLForConditionalGeneration.from_pretrained(tiny_bard_vl_dir, prompt_attention="causal").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.generation_config.threshold = 0.6
    folder = tmp_path_factory.mktemp("causal_bard_vl")
    model.save_pretrained(folder)
    return model, BardVLProcessor.from_pretrained(tiny_bard_vl_dir), folder


class StandInRunner:
    """vLLM's runner and scheduler, reduced to the diffusion contract, with the transformers model computing each
    request's forward on its own DynamicCache."""

    def __init__(self, model, folder, max_model_len: int, chunk: int, max_num_seqs: int = 4):
        from transformers_bard.integrations.vllm.model import BardVLForVLLM, BardVLModelState

        self.model, self.max_model_len, self.chunk = model, max_model_len, chunk
        from transformers_bard.models.bard_vl.generation_bard_vl import BardVLGenerationConfig

        generation = BardVLGenerationConfig.from_pretrained(folder).to_diff_dict()
        model_config = SimpleNamespace(hf_config=model.config, max_model_len=max_model_len,
                                       try_get_generation_config=lambda: dict(generation))
        vllm_config = SimpleNamespace(model_config=model_config,
                                      scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs))
        self.state = BardVLForVLLM.get_model_state_cls()(vllm_config, model, None, torch.device("cpu"))
        assert isinstance(self.state, BardVLModelState)
        B = model.config.block_size
        sampling_states = SimpleNamespace(add_request=lambda *a: None, apply_staged_writes=lambda: None)
        self.req_states = SimpleNamespace(draft_tokens=torch.zeros(max_num_seqs, B, dtype=torch.long))
        self.sampler, rejection = self.state.custom_sampler(SimpleNamespace(sampling_states=sampling_states,
                                                                            req_states=self.req_states))
        assert rejection is None
        self.requests, self.free = {}, list(range(max_num_seqs))
        self.eos = set(model.generation_config.eos_token_id)

    def add(self, req_id: str, prompt: list[int], max_tokens: int):
        from transformers import DynamicCache

        slot = self.free.pop(0)
        params = SimpleNamespace(max_tokens=max_tokens)
        self.state.add_request(slot, SimpleNamespace(req_id=req_id, prompt_token_ids=prompt,
                                                     prefill_token_ids=prompt, sampling_params=params))
        self.sampler.add_request(slot, params)
        self.requests[req_id] = SimpleNamespace(slot=slot, prompt=prompt, computed=0, output=[], max_tokens=max_tokens,
                                                cache=DynamicCache(config=self.model.config))

    def step(self) -> None:
        """One forward over every running request, then the sampler, then vLLM's bookkeeping."""
        B, running = self.model.config.block_size, list(self.requests.items())
        queries, num_logits = [], []
        for _, request in running:
            P = len(request.prompt)
            if request.computed < P:  # a prefill chunk
                queries.append(request.prompt[request.computed: request.computed + self.chunk])
                num_logits.append(0)
            else:  # a canvas: the draft tokens the sampler wrote, cut at the end of the context
                width = min(B, self.max_model_len - request.computed)
                queries.append(self.req_states.draft_tokens[request.slot, :width].tolist())
                num_logits.append(width)
        lengths = np.array([len(q) for q in queries])
        batch = SimpleNamespace(
            num_reqs=len(running), num_tokens=int(lengths.sum()),
            idx_mapping_np=np.array([r.slot for _, r in running]),
            num_scheduled_tokens=lengths,
            query_start_loc_np=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            cu_num_logits_np=np.concatenate([[0], np.cumsum(num_logits)]).astype(np.int32),
            num_computed_prefill_tokens_np=np.array([min(r.computed, len(r.prompt)) for _, r in running]),
            prefill_len_np=np.array([len(r.prompt) for _, r in running]),
            is_prefilling_np=np.array([r.computed < len(r.prompt) for _, r in running]),
            query_start_loc=None, seq_lens=None,
        )
        attention = self.state.prepare_attn(batch, CUDAGraphMode.NONE, None, None, None, None)
        causal = attention["causal"].tolist()
        logits = [self.forward(request, query, bool(flag), n)
                  for (_, request), query, flag, n in zip(running, queries, causal, num_logits)]
        out = self.sampler(torch.cat(logits), batch)
        for i, (req_id, request) in enumerate(running):
            kept = len(queries[i]) - int(out.num_rejected[i])
            dropped = len(queries[i]) - kept
            if dropped:
                request.cache.crop(-dropped)
            request.computed += kept
            for token in out.sampled_token_ids[i, : int(out.num_sampled[i])].tolist():  # check_stop
                request.output.append(token)
                if (token in self.eos or len(request.output) >= request.max_tokens
                        or request.computed >= self.max_model_len):
                    self.finish(req_id)
                    break

    def forward(self, request, query, causal: bool, num_logits: int):
        P, start = len(request.prompt), request.computed
        ids = torch.tensor([query])
        n = len(query)
        keys = torch.arange(start + n)[None, :]
        q = torch.arange(start, start + n)[:, None]
        mask = (keys <= q) if causal else torch.ones(n, start + n, dtype=torch.bool)
        positions = torch.arange(start, start + n)[None, None].expand(3, 1, -1)  # text: M-RoPE = 1-D positions
        wanted = torch.zeros(1, n, dtype=torch.bool)
        wanted[0, n - num_logits:] = True
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask[None, None], position_ids=positions,
                             cache=request.cache, use_cache=True, logits_mask=wanted).logits
        assert start >= P or num_logits == 0
        return out

    def finish(self, req_id: str):
        request = self.requests.pop(req_id)
        self.state.remove_request(req_id)
        self.free.append(request.slot)
        self.done[req_id] = request.output


PROMPTS = ["hello there, how are you doing today?", "x", "Describe a red square in three words, please.",
           "What is two plus two?"]


@pytest.mark.parametrize("chunk", [5, 1000])
def test_stand_in_runner_answers_equal_generate(fake_vllm, causal_model, chunk):
    model, processor, folder = causal_model
    runner = StandInRunner(model, folder, max_model_len=4096, chunk=chunk)
    runner.done = {}
    prompts = {}
    for index, text in enumerate(PROMPTS):
        prompts[f"r{index}"] = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": text}]}], add_generation_prompt=True,
            tokenize=True, return_dict=True, return_tensors="pt")
    arrivals = {0: ["r0", "r1"], 2: ["r2"], 5: ["r3"]}  # requests join a running batch
    max_tokens = {"r0": 24, "r1": 16, "r2": 24, "r3": 10}
    for step in range(400):
        for req_id in arrivals.get(step, []):
            runner.add(req_id, prompts[req_id]["input_ids"][0].tolist(), max_tokens[req_id])
        if not runner.requests and step > max(arrivals):
            break
        if runner.requests:
            runner.step()
    assert sorted(runner.done) == sorted(prompts)
    for req_id, inputs in prompts.items():
        out = model.generate(**inputs, return_dict_in_generate=True, max_new_tokens=max_tokens[req_id],
                             fuse_commit=False, prefill_step=False)
        expected = out.sequences[0, inputs["input_ids"].shape[1]:][: int(out.num_generated_tokens[0])].tolist()
        assert runner.done[req_id] == expected, req_id
    assert not runner.state.slots and not runner.state.slot_of  # finished requests leave no state


def test_sampler_ignores_the_rows_of_vllms_dummy_runs(fake_vllm, causal_model):
    """vLLM profiles and warms up the sampler with a dummy batch (`InputBatch.make_dummy`: one logit row per
    request, request slots 0..n-1 that hold no request)."""
    model, _, folder = causal_model
    runner = StandInRunner(model, folder, max_model_len=256, chunk=8)
    n = 3
    dummy = SimpleNamespace(num_reqs=n, idx_mapping_np=np.arange(n), cu_num_logits_np=np.arange(n + 1),
                            query_start_loc_np=np.arange(n + 1), num_scheduled_tokens=np.ones(n, dtype=np.int32),
                            num_computed_prefill_tokens_np=np.zeros(n), prefill_len_np=np.zeros(n))
    out = runner.sampler(torch.zeros(n, model.config.text_config.vocab_size), dummy)
    assert out.num_sampled.tolist() == [0] * n and out.num_rejected.tolist() == [0] * n


def test_stand_in_runner_ends_a_request_the_context_cuts(fake_vllm, causal_model):
    model, processor, folder = causal_model
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt")
    P, B = inputs["input_ids"].shape[1], model.config.block_size
    runner = StandInRunner(model, folder, max_model_len=P + 2 * B + 2, chunk=7)
    runner.done = {}
    runner.add("r", inputs["input_ids"][0].tolist(), 5 * B)
    for _ in range(100):
        if not runner.requests:
            break
        runner.step()
    out = model.generate(**inputs, return_dict_in_generate=True, max_new_tokens=2 * B, fuse_commit=False,
                         prefill_step=False)
    expected = out.sequences[0, P:][: int(out.num_generated_tokens[0])].tolist()
    if expected[-1] in runner.eos:
        assert runner.done["r"] == expected
    else:  # two whole blocks fit; the request then ends with the end token
        assert runner.done["r"] == expected + [runner.state.end_token]
