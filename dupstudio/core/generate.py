"""Text generation shared by the CLI (``dupstudio generate``) and the GUI's generation panel.

:func:`generate_stream` yields :class:`GenerationChunk` objects as mlx-lm's ``stream_generate``
produces text; the caller prints or displays them. Greedy decoding (``temp=0``) by default.
It works on any mlx-lm model object, so a replicated / quantized model built from a
configuration can be passed in place of the plain one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from dupstudio.core.jobs import CancelToken, DupstudioError


@dataclass
class GenerationChunk:
    """One piece of streamed text with running statistics (tokens/s as mlx-lm measures them)."""

    text: str
    token: int
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: Optional[str] = None  # None while streaming; "stop" (EOS) or "length" at the end


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_tokens(tokenizer: Any, prompt: str, chat: Optional[bool] = None) -> list[int]:
    """Token ids for ``prompt``: through the chat template (one user turn, generation prompt
    added) when ``chat`` is true, or when it is ``None`` and the tokenizer has a template."""
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        if not has_chat_template(tokenizer):
            raise DupstudioError("this model's tokenizer has no chat template (use --no-chat)")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token", None)
    add_special = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special))


def generate_stream(model: Any, tokenizer: Any, prompt: Union[str, list[int]], max_tokens: int = 256,
                    *, chat: Optional[bool] = None, temp: float = 0.0, top_p: float = 0.0,
                    seed: Optional[int] = None,
                    cancel: Optional[CancelToken] = None) -> Iterator[GenerationChunk]:
    """Stream the continuation of ``prompt`` (text, or token ids used as they are).

    ``chat``: apply the tokenizer's chat template (``None``: when it has one).
    ``temp`` 0 is greedy; ``seed`` seeds MLX's sampler for ``temp > 0``.
    ``cancel`` is checked between tokens (raises :class:`~dupstudio.core.jobs.Cancelled`).
    The last chunk has ``finish_reason`` set."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    if max_tokens < 1:
        raise DupstudioError(f"--max-tokens must be at least 1 (got {max_tokens})")
    if temp < 0:
        raise DupstudioError(f"--temp must be >= 0 (got {temp})")
    ids = prompt_tokens(tokenizer, prompt, chat) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise DupstudioError("the prompt is empty")
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler):
        if cancel is not None:
            cancel.check()
        yield GenerationChunk(text=r.text, token=int(r.token), prompt_tokens=int(r.prompt_tokens),
                              prompt_tps=float(r.prompt_tps), generation_tokens=int(r.generation_tokens),
                              generation_tps=float(r.generation_tps), finish_reason=r.finish_reason)


def generate_text(model: Any, tokenizer: Any, prompt: Union[str, list[int]], max_tokens: int = 256,
                  **kwargs) -> str:
    """The whole continuation as one string (see :func:`generate_stream`)."""
    return "".join(c.text for c in generate_stream(model, tokenizer, prompt, max_tokens, **kwargs))
