"""``CheferLLMAttribution``: Chefer et al.'s relevance for text generation, in Captum's LLM API.

For each generated token, the teacher-forced sequence ``prompt + target[:t]`` is explained at the
position that produced ``target[t]``. Causal LMs use the lean row path of ICCV 2021 eq. 6 (one
relevance row folded in during the backward pass, attention recomputed a block of rows at a
time), so long prompts fit; encoder-decoder models use the encoder-decoder rules (eq. 6-11).
Several target tokens are explained in one batched forward and backward (``batch_size``).
``rule="attnlrp"`` or ``"cplrp"`` explains the same positions with :class:`AttnLRP` or
:class:`CPLRP` instead, through the model's fused attention kernel, so long prompts fit there
too.
The result is Captum's :class:`~captum.attr.LLMAttributionResult`, so its ``plot_seq_attr`` and
``plot_token_attr`` work as for :class:`~captum.attr.LLMGradientAttribution`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.bimodal import MultiStreamReader
from ..core.readers import CheferRowReader, Reader
from ..core.tokens import SelfRelevance
from ..families import SELF_ATTENTION, StreamMap, family_named
from ._captum import (
    DEFAULT_GEN_ARGS,
    Attribution,
    LLMAttributionResult,
    TextTokenInput,
    TokenizerLike,
    _convert_ids_to_pretty_tokens,
)
from .engine import Explained, Read, ReadSpec, Subject, read_rows
from .lrp import CPLRP, AttnLRP

Score = Literal["logit", "log_prob"]
Rule = Literal["chefer", "attnlrp", "cplrp"]
LRP_RULES = {"attnlrp": AttnLRP, "cplrp": CPLRP}


class CheferLLMAttribution(Attribution):
    r"""Relevance of the prompt (and of earlier generated tokens) for each generated token.

    Chefer, Gur & Wolf (ICCV 2021): for a causal LM, row ``p`` of
    ``R = (I + Abar_L)…(I + Abar_1)`` (eq. 6), where ``p`` is the position whose logits
    produce the token and ``Abar`` comes from the gradient of that token's score. For an
    encoder-decoder model, row ``t`` of ``R_qi`` (eq. 10), and of ``R_qq`` for the decoder
    prefix. The identity's share of the explained position is removed (``self_relevance``).

    Args:
        model: a Hugging Face causal LM or encoder-decoder model (``model(input_ids=...)``
            returning ``.logits``; ``.generate`` when no target is given).
        tokenizer: its tokenizer.
        rule: ``"chefer"`` (the relevance rows above), or ``"attnlrp"`` / ``"cplrp"``: the
            relevance of :class:`AttnLRP` / :class:`CPLRP` at the token embeddings, for the
            same score at the same positions (``self_relevance`` does not apply to them).

    Example:
        >>> import torch
        >>> from captum.attr import TextTokenInput
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = "<unk> the cat sat on a mat".split()
        >>> raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
        >>> raw.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
        >>> _ = torch.manual_seed(0)
        >>> config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(config).eval()
        >>> result = CheferLLMAttribution(model, tokenizer).attribute(
        ...     TextTokenInput("the cat sat", tokenizer), target="on a mat")
        >>> result.token_attr.shape, result.seq_attr.shape
        (torch.Size([3, 3]), torch.Size([3]))
    """

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike, rule: Rule = "chefer") -> None:
        """Explain ``model``'s generations with ``rule`` (see the class); nothing runs yet."""
        if rule != "chefer" and rule not in LRP_RULES:
            raise ValueError(f"rule must be 'chefer', 'attnlrp' or 'cplrp', not {rule!r}")
        super().__init__(model)
        self.model = model
        self.tokenizer = tokenizer
        self.rule = rule

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model has an encoder and a decoder (BART, T5)."""
        return bool(getattr(getattr(self.model, "config", None), "is_encoder_decoder", False))

    def attribute(
        self,
        inp: TextTokenInput,
        target: str | Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        *,
        include_generated: bool = False,
        score: Score = "logit",
        batch_size: int = 4,
        self_relevance: SelfRelevance = "subtract",
        block_bytes: int | None = None,
    ) -> LLMAttributionResult:
        r"""Relevance of the prompt's tokens for each token of ``target``.

        Args:
            inp: the prompt, a :class:`~captum.attr.TextTokenInput` (``skip_tokens`` are left
                out of the result as in Captum).
            target: the continuation to explain: a string (tokenized without special tokens),
                or a 1-D tensor of token ids. None generates it with ``gen_args``.
            gen_args: arguments of ``model.generate`` when ``target`` is None; Captum's
                defaults (greedy, 25 new tokens) when None.
            include_generated: also return the relevance of the generated tokens before each
                one (causal LMs), or of the decoder prefix (encoder-decoder models), as extra
                columns after the prompt's.
            score: the explained output: ``"logit"`` (the pre-softmax logit, as in the paper)
                or ``"log_prob"`` (Captum's LLM gradient target).
            batch_size: target tokens explained per forward and backward pass.
            self_relevance: the identity's share of the explained position (see
                :class:`CheferRelevance`).
            block_bytes: memory for one block of recomputed attention.

        Returns:
            ``LLMAttributionResult`` with ``token_attr`` ``(n_target, n_input)``, ``seq_attr``
            (its sum over target tokens) and ``output_probs`` (each target token's probability).
        """
        if not isinstance(inp, TextTokenInput):
            raise TypeError(
                f"CheferLLMAttribution explains token relevance and takes a TextTokenInput, not "
                f"{type(inp).__name__}; wrap the prompt as TextTokenInput(text, tokenizer)."
            )
        if score not in ("logit", "log_prob"):
            raise ValueError(f"score must be 'logit' or 'log_prob', not {score!r}")
        prompt = inp.to_model_input().to(self.device)
        target_ids = self._target_tokens(prompt, target, gen_args)
        if target_ids.numel() == 0:
            raise ValueError("The target has no tokens; pass a non-empty target or gen_args.")
        explain = self._explain_seq2seq if self.is_encoder_decoder else self._explain_causal
        rows, probs, extra_tokens = explain(
            prompt, target_ids, score, batch_size, self_relevance, block_bytes
        )
        return self._result(inp, target_ids, rows, probs, extra_tokens, include_generated)

    def _target_tokens(
        self, prompt: Tensor, target: str | Tensor | None, gen_args: dict[str, Any] | None
    ) -> Tensor:
        if target is None:
            generate = getattr(self.model, "generate", None)
            if not callable(generate):
                raise ValueError("The model cannot generate; pass target= (a string or ids).")
            output = generate(input_ids=prompt, **(gen_args or DEFAULT_GEN_ARGS))
            return output[0, 1:] if self.is_encoder_decoder else output[0, prompt.shape[1] :]
        if gen_args is not None:
            raise ValueError("gen_args only applies when target is None; drop one of them.")
        if isinstance(target, str):
            encoded = self.tokenizer.encode(target, add_special_tokens=False)
            return torch.tensor(encoded, device=self.device, dtype=torch.long)
        if isinstance(target, Tensor):
            return target.reshape(-1).to(self.device, torch.long)
        raise TypeError(f"target must be a str, a Tensor of token ids or None, not {target!r}")

    def _explain_causal(
        self,
        prompt: Tensor,
        target_ids: Tensor,
        score: Score,
        batch_size: int,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
    ) -> tuple[Tensor, Tensor, int]:
        """Rows ``(T, P + T − 1)`` over prompt and generated tokens, and target probabilities."""
        sequence = torch.cat([prompt[0], target_ids[:-1]])
        positions = list(range(prompt.shape[1] - 1, sequence.shape[0]))
        rows, probs = [], []
        for chunk in _chunks(len(positions), batch_size):
            read = positions[chunk.start : chunk.stop]
            row, prob = self._causal_rows(
                sequence, read, target_ids[chunk], score, self_relevance, block_bytes
            )
            rows.append(F.pad(row, (0, sequence.shape[0] - row.shape[1])))
            probs.append(prob)
        return torch.cat(rows), torch.cat(probs), target_ids.shape[0] - 1

    def _causal_rows(
        self,
        sequence: Tensor,
        read: list[int],
        target_ids: Tensor,
        score: Score,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
    ) -> tuple[Tensor, Tensor]:
        """Row ``read[i]`` of ``R`` for batch row ``i``, over ``sequence[: max(read) + 1]``."""
        length = read[-1] + 1
        ids = sequence[:length].expand(len(read), length)
        forward = _scores_at(self.model, read, score)
        if self.rule in LRP_RULES:
            (row,), probs = self._lrp_rows(forward, (ids,), target_ids)
            return row, probs
        index = torch.tensor(read, device=ids.device)
        explained = self._read(
            forward,
            CheferRowReader(),
            SELF_ATTENTION,
            (Read("tokens", "tokens", index),),
            (ids,),
            target_ids,
            self_relevance,
            block_bytes,
        )
        return explained.rows[0], _target_probs(explained.trace.output, target_ids)

    def _lrp_rows(
        self, forward: Callable[..., Tensor], inputs: tuple[Tensor, ...], target_ids: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """The rule's relevance at each input's token embeddings, and the target probabilities."""
        scores: list[Tensor] = []

        def scored(*ids: Tensor) -> Tensor:
            scores.append(forward(*ids))
            return scores[-1]

        explainer = LRP_RULES[self.rule](scored, self.model)
        rows = explainer.attribute(inputs, target=target_ids)  # on ids: at their embeddings
        rows = rows if isinstance(rows, tuple) else (rows,)
        return rows, _target_probs(scores[-1].detach(), target_ids)

    def _read(
        self,
        forward: Callable[..., Tensor],
        reader: Reader,
        streams: StreamMap,
        reads: tuple[Read, ...],
        inputs: tuple[Tensor, ...],
        target_ids: Tensor,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
    ) -> Explained:
        """The one flow, read as token rows (``output="token"``)."""
        spec = ReadSpec(reads, self_relevance, "token")
        subject = Subject(type(self).__name__, forward, self.model)
        return read_rows(subject, reader, streams, spec, inputs, target_ids, None, block_bytes)

    def _explain_seq2seq(
        self,
        prompt: Tensor,
        target_ids: Tensor,
        score: Score,
        batch_size: int,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
    ) -> tuple[Tensor, Tensor, int]:
        """Rows ``(T, P + T)`` over encoder and decoder tokens, and target probabilities."""
        start_id = torch.tensor([self._decoder_start_id()], device=target_ids.device)
        decoder = torch.cat([start_id, target_ids[:-1]])
        rows, probs = [], []
        for chunk in _chunks(target_ids.shape[0], batch_size):
            row, prob = self._seq2seq_rows(
                prompt, decoder, chunk, target_ids[chunk], score, self_relevance, block_bytes
            )
            rows.append(row)
            probs.append(prob)
        return torch.cat(rows), torch.cat(probs), decoder.shape[0]

    def _seq2seq_rows(
        self,
        prompt: Tensor,
        decoder: Tensor,
        chunk: slice,
        target_ids: Tensor,
        score: Score,
        self_relevance: SelfRelevance,
        block_bytes: int | None,
    ) -> tuple[Tensor, Tensor]:
        """``R_qi`` and ``R_qq`` rows of decoder positions ``chunk``, one per batch row."""
        read = list(range(chunk.start, chunk.stop))
        length = read[-1] + 1
        index = torch.tensor(read, device=prompt.device)
        inputs = (
            prompt.expand(len(read), prompt.shape[1]),
            decoder[:length].expand(len(read), length),
        )
        forward = _scores_at(self.model, read, score, seq2seq=True)
        if self.rule in LRP_RULES:
            (source, prefix), probs = self._lrp_rows(forward, inputs, target_ids)
            return torch.cat([source, F.pad(prefix, (0, decoder.shape[0] - length))], 1), probs
        explained = self._read(
            forward,
            MultiStreamReader(),
            family_named("encoder-decoder").streams,
            (Read("decoder", "encoder", index), Read("decoder", "decoder", index)),
            inputs,
            target_ids,
            self_relevance,
            block_bytes,
        )
        source, prefix = explained.rows
        row = torch.cat([source, F.pad(prefix, (0, decoder.shape[0] - length))], 1)
        return row, _target_probs(explained.trace.output, target_ids)

    def _decoder_start_id(self) -> int:
        for owner in (self.model, getattr(self.model, "generation_config", None)):
            config = getattr(owner, "config", owner)
            start = getattr(config, "decoder_start_token_id", None)
            if start is not None:
                return int(start)
        raise ValueError(
            "The encoder-decoder model's config has no decoder_start_token_id; set "
            "model.config.decoder_start_token_id."
        )

    def _result(
        self,
        inp: TextTokenInput,
        target_ids: Tensor,
        rows: Tensor,
        probs: Tensor,
        extra_tokens: int,
        include_generated: bool,
    ) -> LLMAttributionResult:
        n_prompt = rows.shape[1] - extra_tokens
        prompt_rows = rows[:, :n_prompt]
        if inp.itp_mask is not None:
            prompt_rows = prompt_rows[:, inp.itp_mask[0].to(rows.device)]
        output_tokens = _convert_ids_to_pretty_tokens(target_ids, self.tokenizer)
        input_tokens = list(inp.values)
        token_attr = prompt_rows
        if include_generated:
            token_attr = torch.cat([prompt_rows, rows[:, n_prompt:]], 1)
            input_tokens += self._generated_labels(output_tokens, extra_tokens)
        return LLMAttributionResult(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            seq_attr=token_attr.sum(0),
            token_attr=token_attr,
            output_probs=probs,
            inp=inp,
        )

    def _generated_labels(self, output_tokens: list[str], extra_tokens: int) -> list[str]:
        if not self.is_encoder_decoder:
            return output_tokens[:extra_tokens]
        first = self.tokenizer.convert_ids_to_tokens([self._decoder_start_id()])[0]
        return [str(first)] + output_tokens[: extra_tokens - 1]

    def attribute_future(self) -> Callable[[], LLMAttributionResult]:
        """Not available: the relevance needs one backward pass per batch of target tokens."""
        raise NotImplementedError("attribute_future is not implemented for CheferLLMAttribution")


def _chunks(size: int, batch_size: int) -> list[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    return [slice(start, min(start + batch_size, size)) for start in range(0, size, batch_size)]


def _scores_at(
    model: nn.Module, positions: list[int], score: Score, seq2seq: bool = False
) -> Callable[..., Tensor]:
    """A forward returning the scores ``(k, V)`` at ``positions[i]`` of batch row ``i``.

    Causal LMs that take ``logits_to_keep`` project only the ``k`` positions read onto the
    vocabulary, so a long prompt never needs ``(k, N, V)`` logits.
    """
    keep = not seq2seq and "logits_to_keep" in inspect.signature(model.forward).parameters

    def forward(*ids: Tensor) -> Tensor:
        read = torch.tensor(positions, device=ids[0].device)
        rows = torch.arange(len(positions), device=ids[0].device)
        if seq2seq:
            logits = model(input_ids=ids[0], decoder_input_ids=ids[1]).logits[rows, read]
        elif keep:
            logits = model(input_ids=ids[0], logits_to_keep=read).logits[rows, rows]
        else:
            logits = model(input_ids=ids[0]).logits[rows, read]
        return logits.log_softmax(-1) if score == "log_prob" else logits

    return forward


def _target_probs(scores: Tensor, target_ids: Tensor) -> Tensor:
    """Each target token's probability from its logits or log-probabilities ``(k, V)``."""
    probs = scores.float().softmax(-1)
    return probs.gather(1, target_ids.to(probs.device)[:, None]).squeeze(1)
