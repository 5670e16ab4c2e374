"""Serving BARD-VL over an OpenAI-compatible HTTP API with continuous batching (`transformers-bard serve`).

`scheduler` needs only torch; `openai_api` needs the `serve` extra (fastapi, uvicorn).
"""

from .scheduler import BlockDiffusionScheduler, DecodeRequest

__all__ = ["BlockDiffusionScheduler", "DecodeRequest", "load_engine", "run_server"]


def load_engine(checkpoint: str, autoregressive: bool = False, max_batch_size: int = 32, verifier: str | None = None):
    """Load the checkpoint and its processor and start the engine that owns the model: the continuous-batching
    `BlockDiffusionScheduler` for a BARD-VL checkpoint, (``autoregressive=True``, for baselines) the
    `SequentialGenerateEngine` for a stock Qwen3-VL one, or (``verifier`` = the AR source's folder) the
    `VerifiedGenerateEngine` (DESIGN 4.2 a). Returns ``(engine, processor)``."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    import transformers_bard  # noqa: F401  (registers the Auto classes)

    from ..models.bard_vl.processing_bard_vl import BardVLProcessor

    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    if autoregressive == (model_type == "bard_vl"):
        fix = ("drop --autoregressive" if autoregressive else
               "pass --autoregressive to serve it autoregressively, or convert it with `transformers-bard convert`")
        raise ValueError(f"{checkpoint} is a {model_type!r} checkpoint: {fix}.")
    # the torchvision-free Qwen3-VL processor (DESIGN 6); a BARD checkpoint's own processor is this class too
    processor = BardVLProcessor.from_pretrained(checkpoint)
    if verifier is not None and autoregressive:
        raise ValueError(f"--verifier {verifier} checks a BARD model's drafts; with --autoregressive there are none. "
                         "Drop one of them.")
    if verifier is not None:
        from ..cli import load_verifier
        from .autoregressive import VerifiedGenerateEngine

        engine = VerifiedGenerateEngine(AutoModel.from_pretrained(checkpoint).eval(), load_verifier(verifier))
    elif autoregressive:
        from .autoregressive import SequentialGenerateEngine

        engine = SequentialGenerateEngine(AutoModelForImageTextToText.from_pretrained(checkpoint).eval())
    else:
        engine = BlockDiffusionScheduler(AutoModel.from_pretrained(checkpoint).eval(), max_batch_size=max_batch_size)
    engine.start()
    return engine, processor


def run_server(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, served_model_name: str | None = None,
               max_batch_size: int = 32, max_model_len: int | None = None, autoregressive: bool = False,
               log_level: str = "warning", verifier: str | None = None) -> None:
    """Serve the checkpoint until interrupted (`transformers-bard serve`)."""
    import uvicorn

    from .openai_api import create_app

    engine, processor = load_engine(checkpoint, autoregressive=autoregressive, max_batch_size=max_batch_size,
                                    verifier=verifier)
    text_config = engine.model.config.get_text_config()
    context = text_config.max_position_embeddings
    if max_model_len is not None and not 1 <= max_model_len <= context:
        raise ValueError(f"`--max-model-len` must be in [1, {context}] (the model's context), got {max_model_len}.")
    default_max_tokens = getattr(engine.model.generation_config, "max_new_tokens", None) or 256
    app = create_app(engine, processor, served_model_name or checkpoint, max_model_len or context,
                     default_max_tokens=default_max_tokens)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.close()
