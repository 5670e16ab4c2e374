"""Serving BARD-VL over an OpenAI-compatible HTTP API with continuous batching (`transformers-bard serve`).

`scheduler` needs only torch, `limits` nothing; `openai_api` needs the `serve` extra (fastapi, uvicorn).
"""

import ipaddress
import logging
import os

from .limits import ServeLimits
from .scheduler import BlockDiffusionScheduler, DecodeRequest

__all__ = ["BlockDiffusionScheduler", "DecodeRequest", "ServeLimits", "load_engine", "run_server"]

logger = logging.getLogger(__name__)


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
        from ..models.bard_vl.verification_bard_vl import load_verifier
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
               log_level: str = "warning", verifier: str | None = None, limits: ServeLimits | None = None,
               api_key: str | None = None, shutdown_grace: float = 20.0, access_log: bool = False) -> None:
    """Serve the checkpoint until interrupted (`transformers-bard serve`).

    `limits` bounds what a request may cost (`ServeLimits`' defaults when None). `api_key` (default: the
    environment variable TRANSFORMERS_BARD_API_KEY, if set) is required on every `/v1` route. On SIGTERM or SIGINT
    the server stops accepting connections, lets the requests in flight finish for `shutdown_grace` seconds, then
    cancels the rest and exits. `access_log` logs one line per request."""
    import uvicorn

    from .openai_api import API_KEY_ENV, create_app

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    if not shutdown_grace >= 0:
        raise ValueError(f"`--shutdown-grace` must be a number of seconds >= 0, got {shutdown_grace}.")
    warn_if_exposed(host, api_key)
    engine, processor = load_engine(checkpoint, autoregressive=autoregressive, max_batch_size=max_batch_size,
                                    verifier=verifier)
    text_config = engine.model.config.get_text_config()
    context = text_config.max_position_embeddings
    if max_model_len is not None and not 1 <= max_model_len <= context:
        raise ValueError(f"`--max-model-len` must be in [1, {context}] (the model's context), got {max_model_len}.")
    default_max_tokens = getattr(engine.model.generation_config, "max_new_tokens", None) or 256
    app = create_app(engine, processor, served_model_name or checkpoint, max_model_len or context,
                     default_max_tokens=default_max_tokens, limits=limits, api_key=api_key)
    try:
        uvicorn.Server(uvicorn_config(app, host, port, log_level, access_log, shutdown_grace)).run()
    finally:
        engine.close()


def uvicorn_config(app, host: str, port: int, log_level: str, access_log: bool, shutdown_grace: float):
    """uvicorn's configuration for `run_server`: after a SIGTERM, requests in flight have `shutdown_grace` seconds
    before they are cancelled (without it uvicorn waits for every connection, however long it hangs); with
    `access_log`, one line per request whatever the log level."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_grace)
    if access_log:  # uvicorn gives its access logger the server's level, where warning would hide every line
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return config


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Log a warning (and return True) when `host` is reachable from other machines and no API key is set."""
    if api_key:
        return False
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if not loopback:
        logger.warning("Serving on %s without an API key: anyone who can reach this address can use the model. Pass "
                       "--api-key (or set %s), or bind to 127.0.0.1.", host, "TRANSFORMERS_BARD_API_KEY")
    return not loopback
