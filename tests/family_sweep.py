"""The family sweep: every installed transformers model type, and timm's ViT-like models.

For each family a tiny random-init model is built from its config (sizes shrunk generically,
no per-family settings), run on generic inputs, and explained by :class:`CheferRelevance` as
loaded (its default attention implementation) and at ``eager``. The reference is independent
of the package: a float64 eager copy whose attention maps are the ones Hugging Face returns
with ``output_attentions=True`` (timm: the input of each ``attn_drop``), their gradients taken
with ``retain_grad`` and a full backward, and ICCV 2021 eq. 5-6 applied on full matrices.

Causal families are built with a window of :data:`WINDOW` tokens where their config has one
(``sliding_window``, a layer pattern with sliding layers, GPT-Neo's local layers, Llama 4's
attention chunks), and those exact on their unpadded batch are checked again on
:data:`PADDED_LENGTH` tokens with example 1 right-padded, then left-padded, by :data:`PADDING`
tokens, read at each example's last real token: the map at the default ``token_index="auto"``
must match the reference (float32 where float64 gives NaN: a query row whose every key is
masked overflows the mask's minimum to -inf) and give exactly 0 at padding.

Outcomes: ``exact`` (both implementations match the reference), ``refused`` (a clear error
from captum_chefer, e.g. windowed attention), or ``not run`` (the sweep could not build or feed
the family generically: other modalities, configs whose sizes do not shrink). A mismatch, or a
crash inside the model caused by the capture, is a failure.

``python tests/family_sweep.py`` writes the table to ``benchmarks/results/sweep.md``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from captum_chefer import CheferRelevance

try:
    from reference import relevance_matrix
except ImportError:  # run as a script from the repository root
    from tests.reference import relevance_matrix

TINY = {
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "embed_dim": 32,
    "num_hidden_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "n_inner": 48,
    "ffn_dim": 48,
    "d_ff": 48,
    "rotary_dim": 4,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "vocab_size": 99,
    "max_position_embeddings": 64,
    "n_positions": 64,
    "head_dim": 8,
    "d_kv": 8,
    "image_size": 32,
    "patch_size": 8,
    "num_labels": 3,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
    "pad_token_id": 0,
    "mamba_n_heads": 4,
    "entity_vocab_size": 99,
    "encoder_hash_byte_group_vocab": 99,
    "vocab_size_per_layer_input": 99,
    "hidden_size_per_layer_input": 8,
    "d_latents": 32,
    "num_latents": 8,
    "num_self_attends_per_block": 2,
    "num_self_attention_heads": 4,
    "num_cross_attention_heads": 1,
}
NONE_SIZES = (
    "head_dim",
    "num_key_value_heads",
    "vocab_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
)
"""Sizes a config may leave at None for the model to derive (some models then fail on it)."""
_SWIN = {
    "image_size": 16,
    "patch_size": 2,
    "embed_dim": 16,
    "depths": [1, 1],
    "num_heads": [2, 2],
    "window_size": 2,
}
_GEMMA4_DRAFT = {  # a draft model's validators: no per-layer inputs, every layer's KV shared
    "text_config": {
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "enable_moe_block": False,
        "use_double_wide_mlp": False,
        "num_kv_shared_layers": 0,  # 0: all of the tiny layers
    }
}
QUIRKS = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "big_bird": {"attention_type": "original_full"},
    "bigbird_pegasus": {"attention_type": "original_full"},
    "lfm2": {"full_attn_idxs": [0], "layer_types": None},  # the default is attention only
    "lfm2_moe": {"layer_types": ["full_attention", "conv"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # its pattern is a period
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "bamba": {"attn_layer_indices": [1]},  # the defaults have no attention layer
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "mamba2": {"expand": 1, "n_groups": 1},  # heads * head_dim must be hidden_size * expand
    "qwen4_exp_text": {  # its default layers use the QSA indexer, whose sizes default to None
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 8,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    "esm": {"pad_token_id": 1, "mask_token_id": 2},  # position ids need a padding id
    "lilt": {"hidden_size": 48},  # its layout stream splits the hidden size in sixths
    "layoutlmv3": {"hidden_size": 48, "coordinate_size": 8, "shape_size": 8},  # 4 x + 2 y = h
    "zamba": {  # its shared transformer needs two hybrid layers to tie
        "num_hidden_layers": 4,
        "layers_block_type": ["linear_attention", "hybrid"] * 2,
        "attention_hidden_size": 64,
        "attention_head_dim": 16,
    },
    "reformer": {"axial_pos_embds": False, "attn_layers": ["local", "lsh"]},  # factor sums
    "levit": {"patch_size": 16, "image_size": 64},  # its stem always downsamples 16 times
    "shieldgemma2": {  # 2x2 image tokens in the tiny vocabulary, its yes/no tokens in it too
        "mm_tokens_per_image": 4,
        "image_token_index": 98,
        "yes_token_index": 5,
        "no_token_index": 6,
    },
    "blt": {  # its cache is built from a config with no layer count; the global width is
        "use_cache": False,  # repeated in the local models' configs
        "encoder_config": {"hidden_size_global": 32},
        "decoder_config": {"hidden_size_global": 32},
    },
    "dots3_note": {  # its adapters' output width is the text hidden size, set apart
        "vision_config": {"adapter_out_dim": 32},
        "audio_config": {"adapter_out_dim": 32},
    },
    "dory": {  # one input, one looped and one output layer (its defaults: 8 in, 8 out)
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "n_input_layers": 1,
        "n_output_layers": 1,
    },
    "gemma4_assistant": _GEMMA4_DRAFT,
    "gemma4_unified_assistant": _GEMMA4_DRAFT,
    "gemma3n_text": {"num_kv_shared_layers": 0},  # the default shares 15 of its 35 layers
    "gemma3n": {  # its vision tower is timm's 300M MobileNetV5, built by name
        "vision_config": {"model_args": {"channel_multiplier": 0.1}}
    },
    "cohere_compass_text": {  # its default has no rope parameters for its layer type
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    },
    "mobilevitv2": {
        "patch_size": 2,
        "image_size": 64,
        "width_multiplier": 0.25,
    },  # it downsamples 32 times, then unfolds
    "dbrx": {  # its attention reads a theta its config lacks, and clamps at a None clip
        "attn_config": {"rope_theta": 1e4, "clip_qkv": 8.0}
    },
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},  # its config rounds q/k widths to 64
    "swin": _SWIN,
    "swinv2": _SWIN,
    "donut-swin": _SWIN,
}
"""Config arguments that cannot be derived from the sizes above (a layer pattern spec)."""
MAX_PARAMETERS = 30_000_000
BATCH, LENGTH = 2, 7
WINDOW = 4
"""The sliding window (or attention chunk) set on every causal family whose config has one."""
WINDOW_SIZES = (
    "sliding_window",
    "sliding_window_size",
    "attention_window_size",
    "attention_chunk_size",
    "window_size",
)
"""Config names of a decoder's window (GPT-Neo's local layers: ``window_size``)."""
PADDED_LENGTH, PADDING = 12, 5
"""The padded batches of a causal family: 12 tokens, example 1 padded by 5 on one side."""


@dataclass
class Padded:
    """A causal family on a padded batch (see :func:`padded_outcome`)."""

    side: str
    """``"right"`` or ``"left"``: where example 1's padding is."""
    result: str
    """``exact``, ``not run`` (the reason in ``detail``) or ``FAILED`` (a refusal too: the rule
    is defined on the padded batch as on the unpadded one)."""
    detail: str = ""
    windowed: int = 0
    """Layers whose maps show a window: the last token of the unpadded example does not attend
    the first."""
    layers: int = 0


@dataclass
class Outcome:
    family: str
    model: str
    result: str
    detail: str = ""
    lrp: str = ""
    """AttnLRP and CP-LRP on the same model: ``ok`` (finite maps, nothing left behind),
    ``refused: …`` (a clear error from captum_chefer), or ``FAILED: …``."""
    padding: str = ""
    """The padding the family was checked with."""
    masks: str = ""
    """The attention implementations, and a causal family's window."""
    padded: list[Padded] = field(default_factory=list)


def lrp_outcome(model, forward, values: tuple, refused: bool = True) -> str:
    """Run AttnLRP and CP-LRP on ``forward(model, *values)``; each must give finite maps of the
    inputs' shape and leave no mode or hook behind, or be refused by captum_chefer. Where both
    refuse and Chefer's rule was ``refused`` too, the Integrated Gradients fix is run."""
    from captum_chefer import CPLRP, AttnLRP

    results = []
    for method in (AttnLRP, CPLRP):
        try:
            explainer = method(lambda *v: forward(model, *v), model)
            maps = explainer.attribute(values[0], 1, values[1:])
        except Exception as error:  # noqa: BLE001
            if not from_package(error):
                return f"FAILED: {method.__name__} crashed: {error!r}"[:200]
            results.append(f"refused: {_first_sentence(error)[:80]}")
            continue
        if maps.shape != values[0].shape or not bool(torch.isfinite(maps).all()):
            return f"FAILED: {method.__name__} gave {tuple(maps.shape)} or non-finite values"
        if torch._C._len_torch_function_stack() or any(
            m._forward_hooks or m._forward_pre_hooks for m in model.modules()
        ):
            return f"FAILED: {method.__name__} left a mode or hook behind"
        fused = fused_check(model, forward, values, method)
        if fused.startswith("FAILED"):
            return fused
        results.append("ok" + fused)
    summary = results[0] if results[0] == results[1] else " / ".join(results)
    if refused and all(result.startswith("refused") for result in results):
        summary += "; " + integrated_gradients_outcome(model, forward, values)
    return summary


def fused_check(model, forward, values: tuple, method) -> str:
    """Where the model calls ``scaled_dot_product_attention``, the fused rule against the
    explicit route (:func:`reference_lrp.explicit_attention`) on a float64 copy, to 1e-6
    relative (float32 and 1e-4 where the family does not run in float64): ``" (fused =
    explicit)"`` when they agree, ``""`` when no SDPA call was made, else a failure."""
    from reference_lrp import explicit_attention

    def run(twin, inputs):
        return method(lambda *v: forward(twin, *v), twin).attribute(inputs[0], 1, inputs[1:])

    try:
        twin = copy.deepcopy(model).double()
        inputs = tuple(v.double() if v.is_floating_point() else v for v in values)
        fused, tolerance = run(twin, inputs), 1e-6
    except Exception:  # noqa: BLE001 - the family does not run in float64: compare in float32
        twin, inputs, tolerance = model, values, 1e-4
        fused = run(twin, inputs)
    with explicit_attention() as decomposed:
        explicit = run(twin, inputs)
    error = float((fused - explicit).abs().max() / explicit.abs().max().clamp_min(1e-30))
    if not decomposed[0]:
        return ""
    if not error <= tolerance:
        return f"FAILED: {method.__name__} fused differs from the explicit rules by {error:.1e}"
    return " (fused = explicit)"


def integrated_gradients_outcome(model, forward, values: tuple) -> str:
    """The other fix every refusal names: Captum's (Layer) Integrated Gradients, on the token
    embeddings (or the pixels), must give finite, non-zero maps. Few steps and a small
    internal batch: the check is that it runs, not its convergence."""
    from captum.attr import IntegratedGradients, LayerIntegratedGradients

    def run(*v):  # no cache: a model may update it in place (RWKV), which no gradient allows
        use_cache = getattr(model.config, "use_cache", None) if hasattr(model, "config") else None
        if use_cache:
            model.config.use_cache = False
        try:
            return forward(model, *v)
        finally:
            if use_cache:
                model.config.use_cache = use_cache

    embeddings = None if values[0].is_floating_point() else model.get_input_embeddings()
    name = "Layer IG" if embeddings is not None else "IG"
    method = LayerIntegratedGradients(run, embeddings) if embeddings is not None else None
    method = method or IntegratedGradients(run)
    options = {"target": 1, "additional_forward_args": values[1:], "n_steps": 4}
    try:
        maps = method.attribute(values[0], internal_batch_size=2, **options)
    except AssertionError as error:  # Reformer's reversible layers back-propagate in training
        if "model.train()" not in str(error):
            return f"{name} FAILED: AssertionError: {str(error)[:80]}"
        model.train()
        try:
            maps = method.attribute(values[0], internal_batch_size=2, **options)
        finally:
            model.eval()
        name += " (in train mode, which the model asks for)"
    except Exception as error:  # noqa: BLE001
        return f"{name} FAILED: {type(error).__name__}: {str(error)[:80]}"
    if not bool(torch.isfinite(maps).all()):
        return f"{name} FAILED: non-finite maps"
    if not bool((maps != 0).any()):
        with torch.no_grad():
            constant = torch.equal(run(*values), run(torch.zeros_like(values[0]), *values[1:]))
        if not constant:
            return f"{name} FAILED: all-zero maps of an output that depends on the input"
        name += " (all zero: this random-init model's output does not depend on the input)"
    return f"{name} ok"


class NotRun(Exception):
    """The sweep cannot build or feed this family generically."""


def hf_families() -> list[str]:
    """Model types with a sequence-classification, causal-LM or image-classification head."""
    from transformers.models.auto import modeling_auto as auto

    names = (
        auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )
    return sorted(set().union(*names))


def tiny_config(family: str, deep: bool = False, window: bool = False):
    """The family's default config with its sizes shrunk, dropout off.

    A size the config's validators reject is repaired: a key/value head count made equal to
    the query heads, or any other size the error names set back to its default. ``deep`` also
    shrinks what only a model over the parameter cap needs (see :func:`deep_kwargs`);
    ``window`` sets a decoder's window, where its config has one, to :data:`WINDOW` tokens.
    """
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[family]
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 - a default its own validators reject: quirks first
        default = None
    try:
        if default is None:
            default = config_class(**QUIRKS.get(family, {}))
        kwargs = tiny_kwargs(default, deep, window)
        return config_class(**valid_kwargs(config_class, default, kwargs))
    except Exception as error:  # noqa: BLE001 - any config error means "cannot shrink"
        message = " ".join(_message(error).split())
        raise NotRun(f"config: {type(error).__name__}: {message[:100]}") from error


def valid_kwargs(config_class, default, kwargs: dict) -> dict:
    """``kwargs``, repaired until ``config_class`` accepts them (see :func:`tiny_config`)."""
    for _ in range(6):
        try:
            config_class(**kwargs)
            return kwargs
        except Exception as error:  # noqa: BLE001
            repaired = _repair(kwargs, default, error)
            if repaired is None:
                return kwargs
            kwargs = repaired
    return kwargs


def _message(error: BaseException) -> str:
    parts = [str(error)]
    while error.__cause__ is not None:
        error = error.__cause__
        parts.append(str(error))
    return " ".join(parts)


def _repair(kwargs: dict, default, error: BaseException) -> dict | None:
    """``kwargs`` with the first shrunk size the validator's message names repaired, or None."""
    import re

    message = _message(error)
    quirks = QUIRKS.get(getattr(default, "model_type", ""), {})
    named = sorted(
        (match.start(), name)
        for name in kwargs
        if name not in quirks and (match := re.search(rf"\b{name}\b", message))
    )
    for _, name in named:
        repaired = dict(kwargs)
        heads = kwargs.get("num_attention_heads", _read(default, "num_attention_heads"))
        if name == "num_key_value_heads" and isinstance(heads, int) and kwargs[name] != heads:
            repaired[name] = heads  # no grouped-query attention
        elif vars(default).get(name, kwargs[name]) != kwargs[name]:
            repaired[name] = vars(default)[name]
        else:
            continue
        return repaired
    return None


def tiny_kwargs(default, deep: bool = False, window: bool = False) -> dict:
    """Constructor arguments that shrink ``default``'s sizes and switch dropout off.

    Only integer sizes the config already has are set; properties are left alone; sub-configs
    (a composite model's towers) are shrunk the same way. ``window``: see
    :func:`window_kwargs`.
    """
    from transformers import PretrainedConfig

    kwargs: dict = {}
    for name, value in TINY.items():
        settable = not isinstance(getattr(type(default), name, None), property)
        unset = name in NONE_SIZES and name in vars(default) and _read(default, name) is None
        if settable and (isinstance(_read(default, name), int) or unset):
            kwargs[name] = value
    hidden = _read(default, "hidden_size")
    for name, value in vars(default).items():  # a size tied to the hidden size stays tied
        tied = isinstance(value, int) and not isinstance(value, bool) and value == hidden
        if (
            tied
            and name not in TINY
            and ("size" in name or "dim" in name)
            and "hidden_size" in kwargs
        ):
            kwargs[name] = kwargs["hidden_size"]
    nope, rope = _read(default, "qk_nope_head_dim"), _read(default, "qk_rope_head_dim")
    latent = isinstance(nope, int) and isinstance(rope, int)
    if "head_dim" in kwargs and latent and _read(default, "head_dim") == nope + rope:
        kwargs["head_dim"] = kwargs["qk_nope_head_dim"] + kwargs["qk_rope_head_dim"]  # its parts
    if _read(default, "kv_lora_rank") and "num_key_value_heads" in kwargs:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)  # latent attention
    layers = _read(default, "num_hidden_layers") or _read(default, "num_layers")
    patterns: dict[str, list] = {}
    for name, value in vars(default).items():
        droppy = "dropout" in name or name.endswith("_drop") or "drop_path" in name
        if droppy and isinstance(value, float):
            kwargs[name] = 0.0
        elif isinstance(value, PretrainedConfig):
            derived = ("per_layer_config",)  # keyed by the default's layer indexes: re-derived
            settings = {k: v for k, v in value.to_dict().items() if k not in derived}
            shrunk = tiny_kwargs(value, deep, window and not _other_modality(name))
            kwargs[name] = valid_kwargs(type(value), value, {**settings, **shrunk})
        elif isinstance(value, (list, tuple)) and len(value) == layers and layers > 1:
            try:
                kinds = list(dict.fromkeys(value))  # each kind of layer once, in order
            except TypeError:  # per-layer lists (dilations): the first two layers'
                kinds = list(value[:2])
            if all(isinstance(kind, str) for kind in kinds):
                patterns[name] = kinds
            else:  # per-layer numbers (indexes, sizes): the first two
                kwargs[name] = (kinds + [value[0]])[:2]
    count = max([2, *(len(kinds) for kinds in patterns.values())])
    for name, kinds in patterns.items():  # every kind of layer kept (Mamba, MoE, attention)
        kwargs[name] = (kinds * count)[:count]
    for name in ("num_hidden_layers", "num_layers"):
        if patterns and name in kwargs:
            kwargs[name] = count
    if deep:
        kwargs.update(deep_kwargs(default, kwargs))
    if window:
        kwargs.update(window_kwargs(default, kwargs))
    for name, value in QUIRKS.get(getattr(default, "model_type", ""), {}).items():
        nested = isinstance(value, dict) and isinstance(kwargs.get(name), dict)
        kwargs[name] = {**kwargs[name], **value} if nested else value  # a sub-config's setting
    return kwargs


def _other_modality(name: str) -> bool:
    """Whether a sub-config of this name configures a tower over another input than the text
    (its windows are not a decoder's)."""
    return any(word in name for word in ("vision", "audio", "image", "video", "speech"))


def window_kwargs(default, kwargs: dict) -> dict:
    """A window of :data:`WINDOW` tokens wherever the config has a window size (set or None),
    switched on where a flag switches it (``use_sliding_window``), from the second layer on
    where the config derives its layer types from ``max_window_layers`` (Qwen2's); where the
    tiny layer pattern has two full-attention layers and no sliding one, the last is made
    sliding (a family whose default uses no sliding layer, as Laguna's)."""
    window: dict = {
        name: WINDOW
        for name in WINDOW_SIZES
        if name in vars(default) and not isinstance(vars(default)[name], (bool, list, dict))
    }
    if window and "use_sliding_window" in vars(default):
        window["use_sliding_window"] = True
    pattern = kwargs.get("layer_types")
    if window and isinstance(vars(default).get("max_window_layers"), int):
        window["max_window_layers"] = 1
        window["layer_types"] = None  # derived again from the window layers
    elif window and isinstance(pattern, list) and "sliding_attention" not in pattern:
        full = [i for i, kind in enumerate(pattern) if kind == "full_attention"]
        if len(full) > 1:
            window["layer_types"] = [
                "sliding_attention" if i == full[-1] else kind for i, kind in enumerate(pattern)
            ]
    return window


WIDTHS = ("channels", "hidden_sizes", "dims", "widths")
"""Names of per-stage width lists (a CNN's channels), capped at the tiny hidden size."""


def deep_kwargs(default, kwargs: dict) -> dict:
    """More shrinking, for a model still over the parameter cap: per-stage width lists capped
    (the same cap on every entry, so a stage's output still meets the next one's input), and
    per-layer overrides (a layer type's own head count or rank) shrunk like the global sizes,
    at the tiny layers of that type.
    """
    cap = TINY["hidden_size"]
    deep: dict = {}
    for name, value in vars(default).items():
        if name in TINY or name in kwargs or isinstance(value, bool):
            continue
        words = name.lower()
        widths = isinstance(value, (list, tuple)) and any(w in words for w in WIDTHS)
        if widths and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            deep[name] = type(value)(min(v, cap) for v in value)
    overrides = _layer_overrides(default, kwargs)
    if overrides is not None:
        deep["per_layer_config"] = overrides
    return deep


def _layer_overrides(default, kwargs: dict) -> dict | None:
    """The default's per-layer overrides, shrunk, at the tiny layers of the same kinds."""
    try:
        per_layer = default.to_dict().get("per_layer_config")
    except Exception:  # noqa: BLE001
        return None
    if not per_layer:
        return None
    per_layer = {int(i): values for i, values in per_layer.items()}
    layers = kwargs.get("num_hidden_layers", kwargs.get("num_layers"))
    patterns = [
        name
        for name, value in kwargs.items()
        if isinstance(value, list)
        and len(value) == layers
        and isinstance(vars(default).get(name), list)
    ]
    shrunk: dict = {}
    for i in range(layers or 0):
        kinds = [kwargs[name][i] for name in patterns]
        same = [
            j
            for j in range(len(vars(default)[patterns[0]]) if patterns else 0)
            if [vars(default)[name][j] for name in patterns] == kinds
        ]
        if not same or same[0] not in per_layer:
            continue
        values = {
            k: kwargs.get(k, TINY.get(k, v)) if isinstance(v, int) and k in TINY else v
            for k, v in per_layer[same[0]].items()
        }
        if values.get("kv_lora_rank") and "num_attention_heads" in values:  # latent attention
            values["num_key_value_heads"] = values["num_attention_heads"]
        parts = ("head_dim", "qk_nope_head_dim", "qk_rope_head_dim")
        was = [per_layer[same[0]].get(k, _read(default, k)) for k in parts]
        now = [values.get(k, kwargs.get(k)) for k in parts]
        if all(isinstance(v, int) for v in was + now[1:]) and was[0] == was[1] + was[2]:
            values["head_dim"] = now[1] + now[2]  # a latent head is its two parts
        shrunk[i] = values
    return shrunk


def _read(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer attributes refuse a global read
        return None


def hf_task(family: str) -> tuple[str, type]:
    """``("causal" | "encoder" | "image", model class)`` for the family."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if family in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        kind, name = "image", auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[family]
    elif family in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and family not in masked:
        kind, name = "causal", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    elif family in auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        kind, name = "encoder", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[family]
    else:
        kind, name = "causal", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family]
    if isinstance(name, tuple):
        name = name[0]
    model_class = getattr(transformers, name, None)
    if model_class is None:
        raise NotRun(f"{name} is not importable")
    if kind == "image" and "pixel_values" not in inspect.signature(model_class.forward).parameters:
        kind = "encoder"  # an image classifier over token ids (ImageGPT's colour clusters)
    return kind, model_class


def build_hf(family: str, window: bool = True):
    """A tiny eval-mode model of the family at its default attention implementation, and its
    kind; with ``window``, a causal family has a window of :data:`WINDOW` tokens where its
    config has one (see :func:`window_kwargs`)."""
    kind, model_class = hf_task(family)
    return kind, _build(family, model_class, window and kind == "causal")


def _build(family: str, model_class, window: bool):
    config = tiny_config(family, window=window)
    try:
        with torch.device("meta"):
            size = sum(p.numel() for p in model_class(config).parameters())
    except AttributeError:  # a text model registered under its composite config
        try:
            config = config.get_text_config()
        except ValueError:  # a text encoder and a decoder: the causal LM is the decoder
            config = config.get_text_config(decoder=True)
        with torch.device("meta"):
            size = sum(p.numel() for p in model_class(config).parameters())
    except Exception as error:  # noqa: BLE001
        raise NotRun(f"build: {type(error).__name__}: {_oneline(error)[:100]}") from error
    if size > MAX_PARAMETERS:  # shrink what only a model this large needs
        config, size = _deep_config(family, model_class, config, size, window)
    if size > MAX_PARAMETERS:
        raise NotRun(f"{size / 1e6:.0f}M parameters after shrinking")
    torch.manual_seed(0)
    try:
        model = model_class(config).eval()
    except Exception as error:  # noqa: BLE001
        raise NotRun(f"build: {type(error).__name__}: {_oneline(error)[:100]}") from error
    if getattr(config, "is_encoder_decoder", False) and "decoder_start_token_id" not in vars(
        config
    ):
        config.decoder_start_token_id = config.pad_token_id  # T5's decoder starts at padding
    languages = getattr(config, "languages", None)
    if languages and hasattr(model, "set_default_language"):  # X-MOD's language adapters
        model.set_default_language(languages[0])
    return model


def _deep_config(family: str, model_class, config, size: int, window: bool):
    """``tiny_config(family, deep=True)`` and its size, or ``config`` and ``size`` unchanged."""
    try:
        deep = tiny_config(family, deep=True, window=window)
        if type(deep) is not type(config):  # built from the text config, as above
            try:
                deep = deep.get_text_config()
            except ValueError:
                deep = deep.get_text_config(decoder=True)
        with torch.device("meta"):
            deep_size = sum(p.numel() for p in model_class(deep).parameters())
    except Exception:  # noqa: BLE001 - the deeper shrink is not valid: report the size
        return config, size
    return (deep, deep_size) if deep_size < size else (config, size)


def hf_inputs(kind: str, model) -> tuple[dict, list[int]]:
    """Keyword inputs and the read token of each example."""
    config = model.config
    generator = torch.Generator().manual_seed(1)
    if kind == "image" and "spatial_shapes" in inspect.signature(model.forward).parameters:
        vision = getattr(config, "vision_config", config)  # NaFlex: patches cut beforehand
        width = vision.num_channels * vision.patch_size**2
        pixels = torch.randn(BATCH, 16, width, generator=generator)
        shapes = torch.tensor([[4, 4]] * BATCH)
        mask = torch.ones(BATCH, 16, dtype=torch.long)
        return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}, [
            0
        ] * BATCH
    if kind == "image":
        vision = getattr(config, "vision_config", config)
        channels = getattr(vision, "num_channels", 3)
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        pixels = torch.randn(BATCH, channels, size, size, generator=generator)
        image_token = getattr(config, "image_token_index", None)
        if "input_ids" in inspect.signature(model.forward).parameters and image_token is not None:
            ids = torch.randint(3, 90, (BATCH, LENGTH), generator=generator)  # a prompt's
            ids[:, 1 : 1 + config.mm_tokens_per_image] = image_token  # image tokens
            mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
            inputs = {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}
            return inputs, [LENGTH - 1] * BATCH  # a decoder's verdict at the last token
        return {"pixel_values": pixels}, [0] * BATCH
    vocab = getattr(config, "vocab_size", 99)
    ids = torch.randint(3, min(vocab, 99), (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    eos = getattr(config, "eos_token_id", None)
    codebooks = getattr(config, "num_codebooks", None)
    if kind == "causal" and isinstance(codebooks, int) and codebooks > 1 and _per_codebook(model):
        # an embedding per codebook (MusicGen's decoder): a row per example and codebook
        ids = torch.randint(3, min(vocab, 99), (BATCH * codebooks, LENGTH), generator=generator)
    if kind == "encoder":
        mask[1, -2:] = 0
        ids[1, -2:] = 0
        if isinstance(eos, int) and 0 < eos < vocab:  # seq2seq classifiers pool at <eos>
            ids[0, -1] = ids[1, -3] = eos
        return {"input_ids": ids, "attention_mask": mask}, [0] * BATCH
    return {"input_ids": ids, "attention_mask": mask}, [LENGTH - 1] * BATCH


def _per_codebook(model) -> bool:
    """Whether the model embeds its ids with an embedding per codebook (MusicGen's decoder)."""
    try:
        return isinstance(model.get_input_embeddings(), torch.nn.ModuleList)
    except NotImplementedError:  # a model that does not expose its embedding
        return False


def select(kind: str, output, last: torch.Tensor | None = None) -> torch.Tensor:
    """The explained logits ``(B, C)``: a causal model's at each example's ``last`` token (the
    last position where ``last`` is None), an encoder's or an image model's as they are."""
    logits = getattr(output, "logits", None)
    if logits is None and kind == "image":  # PP-LCNet returns its logits as last_hidden_state
        logits = output.last_hidden_state
    if logits.shape[0] != BATCH:  # a row per example and codebook (MusicGen): codebook 0's
        logits = logits.reshape(BATCH, -1, *logits.shape[1:])[:, 0]
    if kind != "causal":
        return logits
    return logits[:, -1] if last is None else logits[torch.arange(BATCH), last]


def plain_forward(pick, model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return pick(model(**inputs))


@dataclass
class Reference:
    """What the reference read: ``rows`` ``(B, N)`` of R minus the identity, the
    ``token_index`` that reads them (``fix``, see :func:`read_weights`), and the attention
    maps ``(B, H, N, N)`` of every layer (to see the windows the model applied)."""

    rows: torch.Tensor
    fix: dict | None
    maps: list[torch.Tensor]


class NonFinite(RuntimeError):
    """The reference's gradients are not finite in this dtype."""


def reference_rows(pick, model, inputs: dict, target: int) -> Reference:
    """The rows of R minus the identity that the output ``pick(model(**inputs))[:, target]``
    is read from, from output_attentions at eager (``model`` is the eager copy, copied again
    for the reference), with the ``token_index`` that reads them and the maps.

    In float64 where the model's kernels allow it; in float32 where they don't (grouped
    expert matmuls, some masks) or where a float64 gradient is not finite: in float64 a query
    row whose every key is masked (left padding, a window over padding only) overflows the
    dtype's minimum in the mask to -inf and gives NaN, which the backward spreads."""
    try:
        return _reference_rows(pick, model, inputs, target, torch.float64)
    except RuntimeError:
        return _reference_rows(pick, model, inputs, target, torch.float32)


def _reference_rows(pick, model, inputs, target, dtype) -> Reference:
    states = FinalStates()
    try:
        attentions = _returned_attentions(pick, model, inputs, target, dtype, states)
    except (NotRun, RuntimeError) as error:
        # The maps it returns are copies, or returning them fails: read the softmax outputs.
        states = FinalStates()
        try:
            attentions = _softmax_attentions(pick, model, inputs, target, dtype, states)
        except NotRun as second:
            raise NotRun(f"{error}; {second}") from error
    grads = [a.grad for a in attentions if a.grad is not None]
    if not all(bool(torch.isfinite(grad).all()) for grad in grads):
        raise NonFinite(f"the reference's attention gradients are not finite in {dtype}")
    used = _used_rows(attentions[-1])
    weights, fix = read_weights(used, states.alike(used))
    if weights is None:
        raise Combined(
            f"the output combines the states of tokens {used[0].nonzero().flatten().tolist()}"
        )
    maps = [a.detach().nan_to_num(0.0) for a in attentions]
    return Reference(_relevance_rows(attentions, weights), fix, maps)


class Combined(NotRun):
    """The output combines several tokens' states otherwise than by a mean: no row read is
    the rule's; ``token_index="auto"`` must refuse."""


class FinalStates:
    """The token-shaped outputs ``(B, N, ...)`` of every module of a reference copy, in forward
    order, their gradients kept: the last one whose gradient has exactly the used rows holds
    the tokens' final states, and the output weighs the tokens alike (a mean pooling) when its
    gradient rows are equal. Independent of the package: module hooks on the reference, not
    the package's hooks on autograd nodes."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def watch(self, model) -> list:
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, tuple) and output else output
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 3 and tensor.requires_grad:
                tensor.retain_grad()
                self.outputs.append(tensor)

        return [module.register_forward_hook(hook) for module in model.modules()]

    def alike(self, used: torch.Tensor) -> bool:
        """Whether the used rows (bool ``(B, N)``) get equal gradients at the final states."""
        batch, size = used.shape
        for tensor in reversed(self.outputs):
            grad = tensor.grad
            if grad is None or grad.shape[:2] != (batch, size):
                continue
            rows = grad.reshape(batch, size, -1).double()
            if not torch.equal(rows.abs().amax(-1) > 0, used):
                continue
            first = rows[torch.arange(batch), used.int().argmax(1)]
            spread = (rows - first[:, None]).abs().amax(-1).masked_fill(~used, 0).amax()
            return bool(spread <= 1e-9 * rows.abs().amax().clamp_min(1e-30))
        return False


def _used_rows(last) -> torch.Tensor:
    """Bool ``(B, N)``: the query rows of the last attention map that get a gradient, i.e. the
    tokens whose final states the output is computed from (in the reference's own backward)."""
    if last.grad is None:
        raise NotRun("the last attention map is off the gradient path")
    return last.grad.abs().amax((1, 3)) > 0


def read_weights(used: torch.Tensor, alike: bool):
    """Row weights ``(B, N)`` of the read, and the ``token_index`` that reads them: one token
    per example (CLS, the last token), or the mean of the used rows where the output weighs
    them alike (a mean pooling). ``(None, None)`` for another combination."""
    if bool((used.sum(1) == 1).all()):
        index = used.int().argmax(1)
        return torch.nn.functional.one_hot(index, used.shape[1]).double(), {"token_index": index}
    if alike:
        return used.double() / used.sum(1, keepdim=True), {"token_index": "mean"}
    return None, None


def _returned_attentions(pick, model, inputs, target, dtype, states) -> list[torch.Tensor]:
    """The maps Hugging Face returns with ``output_attentions=True``, their gradients kept."""
    reference = _reference_copy(model, dtype)
    double = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    handles = states.watch(reference)
    try:
        output = reference(**double, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    attentions = getattr(output, "attentions", None)
    if not attentions or any(a is None or a.dim() != 4 for a in attentions):
        raise NotRun("no attention maps returned at eager")
    if any(bool((a.nan_to_num(0.0) < 0).any()) for a in attentions):
        raise NotRun("the maps it returns have negative entries: scores, not probabilities")
    for attention in attentions:
        if attention.requires_grad:  # a map computed under no_grad has no gradient: zero
            attention.retain_grad()
    pick(output)[:, target].sum().backward()
    if all(a.grad is None for a in attentions):
        raise NotRun("the attention maps it returns are copies, off the gradient path")
    return list(attentions)


def _softmax_attentions(pick, model, inputs, target, dtype, states) -> list[torch.Tensor]:
    """Every 4-D softmax over the last dimension in the eager copy's forward, in order, its
    gradient kept: ``torch.softmax``, ``torch.nn.functional.softmax`` and ``Tensor.softmax``
    wrapped for the one forward and backward (``nn.Softmax`` calls the functional one)."""
    reference = _reference_copy(model, dtype)
    double = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    captured: list[torch.Tensor] = []
    originals = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)

    def keeping(original):
        def softmax(input, *args, **kwargs):
            output = original(input, *args, **kwargs)
            dim = kwargs.get("dim", args[0] if args else None)
            known = any(output is a for a in captured)  # F.softmax calls Tensor.softmax
            if output.dim() == 4 and dim in (-1, 3) and not known:
                if output.requires_grad:
                    output.retain_grad()
                captured.append(output)
            return output

        return softmax

    torch.softmax = keeping(originals[0])
    torch.nn.functional.softmax = keeping(originals[1])
    torch.Tensor.softmax = keeping(originals[2])
    handles = states.watch(reference)
    try:
        pick(reference(**double))[:, target].sum().backward()
    finally:
        torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax = originals
        for handle in handles:
            handle.remove()
    if not captured:
        raise NotRun("no 4-D softmax in its forward")
    if len({a.shape[-2:] for a in captured}) != 1:
        raise NotRun("its softmax outputs are not all over the same tokens")
    if all(a.grad is None for a in captured):
        raise NotRun("no softmax output is on the gradient path")
    return captured


def _relevance_rows(attentions, weights: torch.Tensor) -> torch.Tensor:
    maps = [a.detach().double().nan_to_num(0.0) for a in attentions]
    grads = [
        a.grad.double().nan_to_num(0.0) if a.grad is not None else torch.zeros_like(m)
        for a, m in zip(attentions, maps)
    ]
    relevance = relevance_matrix(maps, grads)
    return torch.einsum("bn,bnk->bk", weights, relevance) - weights


def ours_rows(pick, model, inputs: dict, target: int, **read) -> torch.Tensor:
    names = list(inputs)

    def forward(*values):
        return pick(model(**dict(zip(names, values))))

    values = tuple(inputs.values())
    explainer = CheferRelevance(forward, model)
    return explainer.attribute(values[0], target, values[1:], output="token", **read)


def ours_as_read(run, fix: dict | None):
    """Ours at ``token_index="auto"``, which reads the rows the output is computed from; and a
    note of how the reference read them (one token, or the mean of several)."""
    shown = fix.get("token_index") if fix else None
    note = "; auto reads the mean of the pooled rows" if shown == "mean" else ""
    return run(), note


def from_package(error: BaseException) -> bool:
    """Whether ``error`` was raised by captum_chefer itself (a refusal), not inside the model."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    last = frames[-1]  # a refusal is a `raise` in the package, not torch failing under it
    in_package = "captum_chefer" in last.filename.replace("\\", "/")
    return in_package and (last.line or "").lstrip().startswith("raise")


def compare(ours: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor | None) -> str:
    if ours.shape != expected.shape:
        raise NotRun(
            f"the reference maps cover {expected.shape[1]} tokens, the model attends over "
            f"{ours.shape[1]}"
        )
    expected = expected.float()
    if mask is not None:
        expected = expected * mask
    scale = expected.abs().max().clamp_min(1e-12)
    error = ((ours - expected).abs().max() / scale).item()
    return "" if error < 1e-3 else f"relative error {error:.2e}"


def sweep_hf(family: str) -> Outcome:
    """Build, run and check one transformers family: Chefer's rule, then AttnLRP and CP-LRP;
    a causal family exact on its unpadded batch is checked on right- and left-padded batches
    too (see :func:`padded_outcome`)."""
    no_window = ""
    try:
        try:
            kind, model, inputs, pick, before = _running(family, window=True)
        except Exception as error:  # noqa: BLE001 - without the window, if it has one
            if hf_task(family)[0] != "causal":
                raise
            kind, model, inputs, pick, before = _running(family, window=False)
            no_window = f"with one: {_describe(error)[:100]}"
    except NotRun as error:
        return Outcome(family, "", "not run", str(error))
    except Exception as error:  # noqa: BLE001 - the model does not run on generic inputs
        return Outcome(family, "", "not run", f"forward: {_describe(error)[:100]}")
    eager = _eager_copy(model)
    outcome = _chefer_outcome(family, kind, (model, eager), inputs, pick, before)
    if outcome.result != "not run":
        refused = outcome.result in ("refused", "no attention")
        outcome.lrp = lrp_outcome(model, _forward_of(pick, inputs), tuple(inputs.values()), refused)
        if outcome.result == "refused" and model.config.is_encoder_decoder:
            outcome.lrp += "; " + encoder_decoder_outcome(model, inputs)
    if kind == "causal" and outcome.result == "exact":
        outcome.padded = [padded_outcome(model, eager, side) for side in ("right", "left")]
        notes = [f"{p.side}-padded {p.result}: {p.detail}" for p in outcome.padded if p.detail]
        outcome.detail = "; ".join([outcome.detail, *notes])
        if any(p.result == "FAILED" for p in outcome.padded):
            outcome.result = "FAILED"
    outcome.padding, outcome.masks = _checked_with(kind, model, outcome, no_window)
    return outcome


def _running(family: str, window: bool):
    """The family's tiny model (see :func:`build_hf`), its inputs, the selection of its
    explained output, and that output."""
    kind, model = build_hf(family, window)
    inputs, _ = hf_inputs(kind, model)
    pick = functools.partial(select, kind)
    return kind, model, inputs, pick, plain_forward(pick, model, inputs)


def _describe(error: BaseException) -> str:
    return str(error) if isinstance(error, NotRun) else f"{type(error).__name__}: {_oneline(error)}"


def _forward_of(pick, inputs: dict):
    """``forward(model, *values)``: the explained output of ``model`` on ``inputs``' values."""
    names = list(inputs)

    def forward(model, *values):
        return pick(model(**dict(zip(names, values))))

    return forward


def padded_inputs(model, side: str) -> tuple[dict, torch.Tensor]:
    """Ids and mask of :data:`PADDED_LENGTH` tokens, example 1 padded by :data:`PADDING`
    tokens on ``side`` (its ids the padding id), and each example's last real token ``(B,)``.
    """
    config = model.config
    vocab = min(getattr(config, "vocab_size", 99) or 99, 99)
    pad = _read(config, "pad_token_id")
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    mask = torch.ones(BATCH, PADDED_LENGTH, dtype=torch.long)
    if side == "right":
        mask[1, -PADDING:] = 0
    else:
        mask[1, :PADDING] = 0
    last = PADDED_LENGTH - 1 - mask.flip(1).argmax(1)
    codebooks = getattr(config, "num_codebooks", None)  # MusicGen: a row per codebook
    rows = codebooks if isinstance(codebooks, int) and codebooks > 1 and _per_codebook(model) else 1
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (BATCH * rows, PADDED_LENGTH), generator=generator)
    ids = ids.masked_fill(mask.repeat_interleave(rows, 0) == 0, pad)
    return {"input_ids": ids, "attention_mask": mask}, last


def padded_outcome(model, eager, side: str) -> Padded:
    """A causal family on a padded batch, read at each example's last real token
    (``logits[arange(B), last]``), at its default implementation and at eager: the map at
    ``token_index="auto"`` must match the reference, with exactly 0 at padding. A model that
    attends to its own padding (its reference is not 0 there) needs only the match; where the
    model's own gradient is not finite (plain autograd, no package involved), the
    implementation is not checked and the batch is ``not run`` with the reason."""
    inputs, last = padded_inputs(model, side)
    pick = functools.partial(select, "causal", last=last)
    try:
        before = plain_forward(pick, model, inputs)
        reference = reference_rows(pick, eager, inputs, 1)
    except Combined as error:
        return Padded(side, "FAILED", f"the reference reads no row: {error}")
    except NotRun as error:
        return Padded(side, "not run", f"no reference ({error})")
    except Exception as error:  # noqa: BLE001 - the model does not run on a padded batch
        return Padded(side, "not run", f"{type(error).__name__}: {_oneline(error)[:90]}")
    windowed = sum(bool(m[0, :, -1, 0].abs().amax() == 0) for m in reference.maps)
    padded = Padded(side, "exact", windowed=windowed, layers=len(reference.maps))
    unchecked = []
    implementation = getattr(model.config, "_attn_implementation", None) or "default"
    for label, variant in ((implementation, model), ("eager", eager)):
        failure = _padded_failure(pick, variant, inputs, reference)
        if failure == NOT_FINITE:
            unchecked.append(label)
        elif failure:
            return Padded(side, "FAILED", f"{label}: {failure}")
    if not torch.equal(before, plain_forward(pick, model, inputs)):
        return Padded(side, "FAILED", "model output changed after attribution")
    padded.detail = _padded_note(reference, inputs["attention_mask"])
    if unchecked:
        padded.result = "not run"
        padded.detail = f"at {' and '.join(unchecked)} {NOT_FINITE}; {padded.detail}".strip("; ")
    return padded


NOT_FINITE = (
    "the model's own gradient is not finite (plain autograd): no map to check; the package "
    "refuses it by example"
)


def _padded_failure(pick, model, inputs: dict, reference: Reference) -> str:
    """Why ours on the padded batch fails (a mismatch, padding not 0, a crash, a refusal), or
    :data:`NOT_FINITE` where the map is not finite because the model's gradient is not; ``""``
    where it passes."""
    mask = inputs["attention_mask"]
    try:
        ours = ours_rows(pick, model, inputs, 1)
    except Exception as error:  # noqa: BLE001 - the rule is defined here: a refusal fails
        kind = "refused" if from_package(error) else "crash"
        nan_refusal = kind == "refused" and "gradient of the explained output is NaN" in str(error)
        if nan_refusal and not _own_gradient_finite(pick, model, inputs):
            return NOT_FINITE  # refused by name, rightly: the model's own backward is NaN
        return f"{kind}: {_first_sentence(error) if kind == 'refused' else repr(error)[:160]}"
    if not bool(torch.isfinite(ours).all()) and not _own_gradient_finite(pick, model, inputs):
        return NOT_FINITE
    mismatch = compare(ours, reference.rows, None)
    if mismatch or _padded_note(reference, mask):  # padding not 0 in the model, or not located
        return mismatch
    if bool((ours[mask == 0] != 0).any()):
        return f"padding gets {ours[mask == 0].abs().max().item():.2e}, not 0"
    return ""


def _padded_note(reference: Reference, mask: torch.Tensor) -> str:
    """Why padding is not checked for 0: the model attends to it, or its maps cover tokens of
    its own (CPM-Ant's prompt) so which are padding is not known; ``""`` where it is."""
    if reference.rows.shape != mask.shape:
        return (
            f"its maps cover {reference.rows.shape[1]} tokens for {PADDED_LENGTH} ids (tokens "
            "of its own): padding not located, so not checked for 0"
        )
    if bool((reference.rows[mask == 0] != 0).any()):
        return "the model attends to its padding (not 0 in the reference either)"
    return ""


def _own_gradient_finite(pick, model, inputs: dict) -> bool:
    """Whether plain autograd, on a copy of ``model``, gives every module's token-shaped
    output a finite gradient of the explained output (Gemma 3n's ``mean(h**2) ** 0.5`` at
    the zero states of left padding at sdpa does not)."""
    states = FinalStates()
    copied = copy.deepcopy(model)
    handles = states.watch(copied)
    try:
        pick(copied(**inputs))[:, 1].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return all(t.grad is None or bool(torch.isfinite(t.grad).all()) for t in states.outputs)


def _checked_with(kind: str, model, outcome: Outcome, no_window: str) -> tuple[str, str]:
    """The table's padding and mask columns for a transformers family."""
    implementation = getattr(model.config, "_attn_implementation", None) or "default"
    masks = f"{implementation}, eager" if implementation != "eager" else "eager"
    if kind == "encoder":
        return "right (example 1)", masks
    if kind != "causal":
        return "none", masks
    names = _window_names(model.config)
    if no_window:
        window = f"no window ({no_window})"
    elif not names:
        window = "no window in its config"
    else:
        window = f"{'/'.join(names)}={WINDOW}"
    exact = [p for p in outcome.padded if p.result == "exact"]
    if exact and names:
        count, layers = exact[0].windowed, exact[0].layers
        window += f": windowed in {count} of {layers} layers" if count else ": no layer windowed"
    sides = ["none"] + [
        p.side if p.result == "exact" and not p.detail else f"{p.side} ({p.result})"
        for p in outcome.padded
    ]
    return ", ".join(sides), f"{masks}; {window}"


def _window_names(config) -> list[str]:
    """The window sizes set to :data:`WINDOW` in ``config`` and its text sub-configs."""
    from transformers import PretrainedConfig

    names = [name for name in WINDOW_SIZES if vars(config).get(name) == WINDOW]
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig) and not _other_modality(key):
            names += [name for name in _window_names(value) if name not in names]
    return names


def encoder_decoder_outcome(model, inputs: dict) -> str:
    """The fix a chain-break refusal names for an encoder-decoder: ``CheferEncoderDecoder`` on
    (source ids, decoder ids) must give finite, non-zero maps of both."""
    from captum_chefer import CheferEncoderDecoder

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    start = getattr(model.config, "decoder_start_token_id", None)
    start = start if isinstance(start, int) else (model.config.pad_token_id or 0)
    decoder_ids = torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], 1)

    def forward(ids, decoder_ids, mask):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits

    try:
        maps = CheferEncoderDecoder(forward, model).attribute(
            (ids, decoder_ids), target=1, additional_forward_args=(mask,)
        )
    except Exception as error:  # noqa: BLE001
        if from_package(error):
            return f"CheferEncoderDecoder refused: {_first_sentence(error)[:80]}"
        return f"CheferEncoderDecoder FAILED: {type(error).__name__}: {str(error)[:80]}"
    if any(m.shape != ids.shape or not bool(torch.isfinite(m).all()) for m in maps):
        return "CheferEncoderDecoder FAILED: maps of the wrong shape or non-finite"
    if not all(bool((m != 0).any()) for m in maps):
        return "CheferEncoderDecoder FAILED: an all-zero map"
    return "CheferEncoderDecoder ok"


def _chefer_outcome(family, kind, models, inputs, pick, before) -> Outcome:
    model, eager = models
    name = type(model).__name__
    fix, combined = None, ""
    try:
        reference = reference_rows(pick, eager, inputs, 1)
        expected, fix = reference.rows, reference.fix
    except Combined as error:
        expected, reason, combined = None, str(error), str(error)
    except NotRun as error:
        expected, reason = None, str(error)
    except Exception as error:  # noqa: BLE001
        expected, reason = None, f"reference: {type(error).__name__}: {str(error)[:60]}"
    details, note = [], ""
    mask = inputs.get("attention_mask") if kind == "encoder" else None
    for label, variant in (("default", model), ("eager", eager)):
        try:
            ours, note = ours_as_read(functools.partial(ours_rows, pick, variant, inputs, 1), fix)
        except Exception as error:  # noqa: BLE001
            if not from_package(error):
                return Outcome(family, name, "FAILED", f"{label}: crash {error!r}"[:200])
            if str(error).startswith("No attention was captured"):
                if expected is not None:
                    return Outcome(family, name, "FAILED", f"{label}: attention not captured")
                return Outcome(family, name, "no attention", _first_sentence(error))
            return Outcome(family, name, "refused", _first_sentence(error))
        if combined:
            return Outcome(family, name, "FAILED", f"{label}: auto read a map, but {combined}")
        if expected is None:
            return Outcome(family, name, "not run", f"no reference ({reason})")
        try:
            mismatch = compare(ours, expected, mask)
        except NotRun as error:
            return Outcome(family, name, "not run", str(error))
        if mismatch:
            return Outcome(family, name, "FAILED", f"{label}: {mismatch}")
        details.append(label)
    after = plain_forward(pick, model, inputs)
    if not torch.equal(before, after):
        return Outcome(family, name, "FAILED", "model output changed after attribution")
    implementation = model.config._attn_implementation
    return Outcome(family, name, "exact", f"at {implementation} and eager{note}")


def _eager_copy(model):
    """The same weights, built at ``attn_implementation="eager"`` (some families choose their
    attention classes when they are built, so switching afterwards is not enough)."""
    config = copy.deepcopy(model.config)
    config._attn_implementation = "eager"
    eager = type(model)(config).eval()
    eager.load_state_dict(model.state_dict())
    return eager


def _reference_copy(eager, dtype: torch.dtype):
    """A copy of the eager model in ``dtype`` (a copy is cheaper than a build; a model that
    cannot be copied is built again)."""
    try:
        copied = copy.deepcopy(eager)
    except Exception:  # noqa: BLE001
        copied = _eager_copy(eager)
    return copied.to(dtype)


def _oneline(error: BaseException) -> str:
    """The error's message on one line (a table row)."""
    return " ".join(str(error).split())


def _first_sentence(error: BaseException) -> str:
    text = str(error).split(". ")[0]
    return text[:160]


TIMM_FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {}),
    "vit (registers)": (
        "vit_base_patch16_reg4_gap_256",
        {"class_token": True, "global_pool": "token"},
    ),
    "deit (distilled)": ("deit_tiny_distilled_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", {}),
    "beit": ("beit_base_patch16_224", {}),
    "beitv2": ("beitv2_base_patch16_224", {}),
    "eva02": ("eva02_tiny_patch14_224", {}),
    "eva": ("eva_giant_patch14_224", {}),
    "cait": ("cait_xxs24_224", {}),
    "xcit": ("xcit_nano_12_p16_224", {}),
    "swin": ("swin_tiny_patch4_window7_224", {}),
    "flexivit": ("flexivit_small", {}),
    "vit (siglip-style map head)": ("vit_base_patch16_siglip_224", {}),
}
TIMM_TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}


def build_timm(name: str, extra: dict):
    import timm

    torch.manual_seed(0)
    for kwargs in ({**TIMM_TINY, **extra}, {"num_classes": 3, **extra}):
        try:
            return timm.create_model(name, pretrained=False, **kwargs).eval()
        except Exception:  # noqa: BLE001,S112 - try the next, larger setting
            continue
    raise NotRun("timm cannot build it")


def timm_reference(model, pixels: torch.Tensor, target: int):
    """The read rows of R minus the identity, with maps from hooks on ``attn_drop`` (eager,
    float64), read where the output gets a gradient from the last map's rows (the class
    token, or the mean of the patches); and the ``token_index`` that reads them."""
    reference = copy.deepcopy(model).double()
    for module in reference.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        output.retain_grad()
        captured.append(output)

    handles = [
        m.attn_drop.register_forward_hook(hook)
        for m in reference.modules()
        if isinstance(getattr(m, "attn_drop", None), torch.nn.Module)
    ]
    states = FinalStates()
    handles += states.watch(reference)
    try:
        reference(pixels.double())[:, target].sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise NotRun("no attn_drop module to read the maps from")
    used = _used_rows(captured[-1])
    weights, fix = read_weights(used, states.alike(used))
    if weights is None:
        raise Combined("the output combines several tokens' states")
    return _relevance_rows(captured, weights), fix


def sweep_timm(family: str) -> Outcome:
    """Build, run and check one timm family on a batch of two images, fused and eager."""
    outcome = _sweep_timm(family)
    outcome.padding, outcome.masks = "none", "fused, eager"
    return outcome


def _sweep_timm(family: str) -> Outcome:
    name, extra = TIMM_FAMILIES[family]
    try:
        model = build_timm(name, extra)
        size = model.default_cfg.get("input_size", (3, 224, 224))[-1]
        pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            before = model(pixels)
    except NotRun as error:
        return Outcome(family, name, "not run", str(error))
    try:
        expected, fix = timm_reference(model, pixels, 1)
    except Combined as error:
        expected, fix, reason = None, None, str(error)
    except NotRun as error:
        expected, fix, reason = None, None, f"no reference ({error})"
    except RuntimeError as error:  # maps the rule does not define (CaiT's class attention)
        expected, fix, reason = None, None, f"no reference ({_first_sentence(error)[:60]})"
    note = ""
    for label, variant in (("default", model), ("eager", _timm_eager(model))):
        explainer = CheferRelevance(variant)
        try:
            run = functools.partial(explainer.attribute, pixels, 1, output="token")
            ours, note = ours_as_read(run, fix)
        except Exception as error:  # noqa: BLE001
            if not from_package(error):
                return Outcome(family, name, "FAILED", f"{label}: crash {error!r}"[:200])
            refused = Outcome(family, name, "refused", _first_sentence(error))
            refused.lrp = lrp_outcome(model, lambda m, x: m(x), (pixels,))
            return refused
        if expected is None:
            return Outcome(family, name, "not run", reason)
        mismatch = compare(ours, expected, None)
        if mismatch:
            return Outcome(family, name, "FAILED", f"{label}: {mismatch}")
    with torch.no_grad():
        if not torch.equal(before, model(pixels)):
            return Outcome(family, name, "FAILED", "model output changed after attribution")
    outcome = Outcome(family, name, "exact", f"fused and eager{note}")
    outcome.lrp = lrp_outcome(model, lambda m, x: m(x), (pixels,), refused=False)
    return outcome


def _timm_eager(model):
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if getattr(module, "fused_attn", None) is True:
            module.fused_attn = False
    return copied


def write_table(outcomes: list[Outcome], path: Path) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.result] = counts.get(outcome.result, 0) + 1
    lines = [
        "# Family sweep (`python tests/family_sweep.py`)",
        "",
        "Every transformers model type with a sequence-classification, causal-LM or "
        "image-classification head, and timm's ViT-like families: a tiny random-init model, "
        'explained at the default `token_index="auto"`, as loaded and at eager, against an '
        "eager reference in float64 (float32 where float64 fails or is not finite) read off "
        "the model's own attention maps and gradients (see `tests/family_sweep.py`). "
        "Encoders run with example 1 right-padded. Causal families run unpadded, then "
        f"on {PADDED_LENGTH} tokens with example 1 right-padded and left-padded by "
        f"{PADDING} tokens, read at each example's last real token, with a window of "
        f"{WINDOW} tokens where their config has one; padding must get exactly 0.",
        "",
        "Totals: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
        "Causal families on padded batches: " + padded_totals(outcomes),
        "",
        "AttnLRP and CP-LRP through the fused kernel, equal to the explicit rules (float64 "
        "to 1e-6, float32 to 1e-4 where a family fails in float64): "
        f"{sum('fused = explicit' in o.lrp for o in outcomes)} families; the others call no "
        "scaled_dot_product_attention or refuse.",
        "",
        "| family | model | result | padding | attention / window | detail "
        "| AttnLRP / CP-LRP; the named fix where they refuse |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        "| "
        + " | ".join(
            text.replace("|", "/")
            for text in (o.family, o.model, o.result, o.padding, o.masks, o.detail, o.lrp)
        )
        + " |"
        for o in outcomes
    ]
    path.write_text("\n".join(lines) + "\n")


def padded_totals(outcomes: list[Outcome]) -> str:
    """How many causal families were exact on each padded batch, and with a window."""
    sides = {
        side: sum(p.side == side and p.result == "exact" for o in outcomes for p in o.padded)
        for side in ("right", "left")
    }
    windowed = sum(any(p.result == "exact" and p.windowed for p in o.padded) for o in outcomes)
    other = [
        f"{o.family} {p.side}: {p.result}"
        for o in outcomes
        for p in o.padded
        if p.result != "exact"
    ]
    text = f"exact right-padded: {sides['right']}, left-padded: {sides['left']}"
    text += f"; with a window in effect: {windowed}"
    return text + (f"; otherwise: {', '.join(other)}" if other else "")


if __name__ == "__main__":
    import sys
    import warnings

    from tqdm import tqdm

    warnings.filterwarnings("ignore")
    families = sys.argv[1:] or hf_families()
    results = [sweep_hf(f) for f in tqdm(families, desc="transformers")]
    if not sys.argv[1:]:
        results += [sweep_timm(f) for f in tqdm(TIMM_FAMILIES, desc="timm")]
    for o in results:
        print(f"{o.family:28} {o.result:8} [{o.padding}; {o.masks}] {o.detail} [lrp: {o.lrp}]")
    if not sys.argv[1:]:
        root = Path(inspect.getfile(sweep_hf)).resolve().parents[1]
        write_table(results, root / "benchmarks" / "results" / "sweep.md")
