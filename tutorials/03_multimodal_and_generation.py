# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Tutorial 3: bi-modal models, encoder-decoders and text generation
#
# Chefer, Gur & Wolf (ICCV 2021) extend their relevance rule beyond self-attention. Every
# modality `x` keeps a map `R_xx` (from `I`) and every pair `R_xy` (from `0`):
#
# - self-attention within `s` (eq. 6-7): `R_ss += Abar_ss·R_ss`, `R_sq += Abar_ss·R_sq`;
# - `s` attending to `q` (eq. 10-11): `R_sq += R̄_ssᵀ·Abar_sq·R̄_qq`, `R_ss += Abar_sq·R_qs`,
#   with `R̄_xx = rownorm(R_xx − I) + I` (eq. 8-9);
#
# where `Abar = mean_h(clamp(dA ⊙ A, 0))`. This tutorial explains
#
# 1. a dual encoder's (CLIP) image-text match: `CheferDualEncoder`;
# 2. a sequence-to-sequence model's (BART) output: `CheferLLMAttribution` over an
#    encoder-decoder, built on `CheferEncoderDecoder`;
# 3. a causal LM's (Llama) generated continuation: `CheferLLMAttribution`.
#
# The pictures use Captum's own visualization: `visualize_image_attr`, `visualize_text`, and
# `LLMAttributionResult.plot_token_attr` / `plot_seq_attr`.
#
# **The models here are randomly initialised** (nothing is downloaded), so the maps show the
# mechanics, not meaningful explanations; every figure says so ("untrained model: the maps are
# not meaningful"), in the quick and the full run alike. The cells marked *real checkpoints*
# show the same calls on pretrained weights; they only run when `CAPTUM_CHEFER_PRETRAINED=1` is
# set on a machine with internet access.
#
# Run it as a script, `python tutorials/03_multimodal_and_generation.py`, or open the paired
# notebook `tutorials/03_multimodal_and_generation.ipynb`; it needs the `[tutorials]` extra.
# `CAPTUM_CHEFER_QUICK=1` runs a small version; figures go to `$CAPTUM_CHEFER_TUTORIAL_OUT`
# (default `tutorial_output/`).

# %%
import os
import sys
import warnings
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from captum.attr import TextTokenInput
from captum.attr import visualization as viz
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    CLIPConfig,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from captum_chefer import CheferDualEncoder, CheferLLMAttribution
from captum_chefer.viz import (
    UNTRAINED,
    colour_bar,
    from_zero,
    image_attr_arguments,
    label_figure,
    records_html,
    save_text_heatmap,
    visualization_records,
    visualize_text,
)

warnings.filterwarnings("ignore", message=".*generation flags.*")
QUICK = os.environ.get("CAPTUM_CHEFER_QUICK") == "1"
PRETRAINED = os.environ.get("CAPTUM_CHEFER_PRETRAINED") == "1"
OUT = Path(os.environ.get("CAPTUM_CHEFER_TUTORIAL_OUT", "tutorial_output"))
OUT.mkdir(parents=True, exist_ok=True)
print(f"outputs go to {OUT.resolve()}")
LAYERS = 2 if QUICK else 4
WIDTH = 32 if QUICK else 64
IMAGE = 64 if QUICK else 224
torch.manual_seed(0)
print(UNTRAINED, "(random weights: this tutorial shows the calls and the shapes)")


def save(figure, name):
    """Write the figure to OUT; in a notebook, also show it."""
    figure.savefig(OUT / name, bbox_inches="tight")
    if "ipykernel" in sys.modules:
        from IPython.display import display

        display(figure)
    plt.close(figure)
    print("wrote", OUT / name)


# %% [markdown]
# A word-level tokenizer built in place of a downloaded one: Captum's `TextTokenInput` and the
# LLM result's plots only need `encode`, `decode` and offsets, which any fast tokenizer has.

# %%
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["a", "photo", "of", "red", "square", "on", "blue", "background"]
WORDS += ["the", "cat", "sat", "mat", "and", "dog", "ran", "far", "away"]
raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, "<unk>"))
raw.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
)
VOCAB = len(tokenizer)
EOS = tokenizer.eos_token_id

# %% [markdown]
# ## 1. A dual encoder: which pixels and words make an image and a caption match
#
# `CheferDualEncoder` explains the similarity logit `logits_per_image[i, j]` of each (image,
# text) pair. Each tower only attends within itself, so each gets the self-attention rule
# with its own attention calls (told apart by the module that made them). The image
# relevance is the vision CLS row, laid on the patch grid and upsampled to the pixels; the
# text relevance is the row of the token CLIP pools the text from (its EOT token).
# `target=None` explains the diagonal pairs (image `i` with caption `i`); a list gives the
# caption for each image.

# %%
tower = dict(
    hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=2 * WIDTH
)
clip_config = CLIPConfig(
    text_config=dict(vocab_size=VOCAB, max_position_embeddings=32, eos_token_id=EOS, **tower),
    vision_config=dict(image_size=IMAGE, patch_size=IMAGE // 8, **tower),
    projection_dim=WIDTH,
)
clip = CLIPModel(clip_config).eval()

# A synthetic picture in [0, 1]: a red square on a blue background.
picture = torch.zeros(3, IMAGE, IMAGE)
picture[2] = 0.8
picture[:, IMAGE // 4 : IMAGE // 2, IMAGE // 3 : 3 * IMAGE // 4] = torch.tensor([0.9, 0.1, 0.1])[
    :, None, None
]
pixels = ((picture - 0.5) / 0.5).unsqueeze(0)
captions = ["a photo of a red square </s>", "a photo of a dog </s> <pad> <pad>"]
batch = tokenizer(captions, return_tensors="pt", padding=True)
images = pixels.expand(2, -1, -1, -1)

explainer = CheferDualEncoder(clip)
image_maps, text_relevance = explainer.attribute(
    (images, batch["input_ids"]), target=None, additional_forward_args=batch["attention_mask"]
)
print("image map", tuple(image_maps.shape), "text relevance", tuple(text_relevance.shape))

# %%
figure, axes = plt.subplots(1, 3, figsize=(10, 3.6))
axes[0].imshow(picture.permute(1, 2, 0).numpy())
axes[0].set_title("the picture", fontsize=9)
axes[0].set_axis_off()
for i, axis in enumerate(axes[1:]):
    # The map divided by its maximum, which the title states; one colour bar for both.
    arguments = image_attr_arguments(
        image_maps[i].sum(0), picture, title=captions[i].replace(" <pad>", ""), method="heat_map"
    )
    arguments["show_colorbar"] = False
    viz.visualize_image_attr(**arguments, plt_fig_axis=(figure, axis), use_pyplot=False)
    axis.title.set_fontsize(9)
colour_bar(figure, list(axes), "relevance ÷ the map's max (in its title)", cmap="Greens")
label_figure(
    figure,
    "CLIP: which pixels make the picture match each caption",
    "Darker green = more relevant to the similarity logit of the picture and the caption above "
    "the map.",
    warning=UNTRAINED,
)
save(figure, "03_clip_image_relevance.png")

# The caption relevance on one scale shared by both captions: as a coloured-token page, and as
# Captum's `visualize_text` table (`records_html` writes it without IPython; in a notebook
# `visualize_text` shows it).
with torch.no_grad():
    logits = clip(input_ids=batch["input_ids"], pixel_values=images).logits_per_image
rows = []
for i in range(len(captions)):
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][i].tolist())
    real = int(batch["attention_mask"][i].sum())
    rows.append((f"logit {float(logits[i, i]):.3f}", tokens[:real], text_relevance[i, :real]))
save_text_heatmap(
    OUT / "03_clip_text_relevance.html",
    rows,
    "CLIP caption relevance",
    intro=f"{UNTRAINED.capitalize()}. Colour: how much each word of the caption drives the "
    "similarity logit of the picture and the caption (title), on one scale for both captions.",
)
print("wrote", OUT / "03_clip_text_relevance.html")
special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
records = visualization_records(
    text_relevance,
    [tokens for _, tokens, _ in rows],
    special_mask=special & (batch["input_ids"] != EOS),  # CLIP reads the text from its EOT
    pred_class=["similarity logit"] * len(rows),
    pred_prob=[float(logits[i, i]) for i in range(len(rows))],
)
title = f"CLIP caption relevance in Captum's table ({UNTRAINED})"
(OUT / "03_clip_captum_records.html").write_text(
    records_html(records, title=title), encoding="utf-8"
)
print("wrote", OUT / "03_clip_captum_records.html")
if "ipykernel" in sys.modules:
    visualize_text(records)

# %% [markdown]
# *Real checkpoints* (not run here): the same call on OpenAI's CLIP. Load the model with
# `attn_implementation="sdpa"` or leave the default; captum_chefer captures either.

# %%
if PRETRAINED:  # needs internet access; never runs in the tests
    from PIL import Image
    from transformers import CLIPProcessor

    real = CLIPModel.from_pretrained("openai/clip-vit-base-patch32").eval()
    processor = CLIPProcessor.from_pretrained("openai/clip-vit-base-patch32")
    inputs = processor(
        text=["a photo of a cat"], images=Image.open("cat.jpg"), return_tensors="pt", padding=True
    )
    real_maps = CheferDualEncoder(real).attribute(
        (inputs["pixel_values"], inputs["input_ids"]),
        additional_forward_args=inputs["attention_mask"],
    )

# %% [markdown]
# ## 2. A sequence-to-sequence output
#
# For an encoder-decoder, the encoder's self-attention updates `R_ii`; in each decoder layer
# the decoder self-attention updates `R_qq` and `R_qi` (eq. 6-7) and the cross-attention adds
# `R̄_qqᵀ·Abar_qi·R̄_ii` to `R_qi` (eq. 10). The relevance of the source for a generated token
# is the `R_qi` row of the decoder position that produced it. `CheferLLMAttribution` runs
# this for every token of a target (teacher-forced), in Captum's LLM API: the result is a
# `captum.attr.LLMAttributionResult`. `include_generated=True` adds the decoder prefix (the
# start token and the earlier output tokens) as extra columns.

# %%
bart_config = BartConfig(
    vocab_size=VOCAB,
    d_model=WIDTH,
    encoder_layers=LAYERS,
    decoder_layers=LAYERS,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=2 * WIDTH,
    decoder_ffn_dim=2 * WIDTH,
    max_position_embeddings=64,
    pad_token_id=tokenizer.pad_token_id,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=EOS,
    decoder_start_token_id=EOS,
)
bart = BartForConditionalGeneration(bart_config).eval()
source = TextTokenInput("the cat sat on a red mat", tokenizer)
seq2seq = CheferLLMAttribution(bart, tokenizer).attribute(
    source, target="a cat sat", include_generated=True
)
print(seq2seq.input_tokens, "->", seq2seq.output_tokens)
figure = seq2seq.plot_token_attr()[0]
from_zero(figure, "Chefer relevance (never negative)")
label_figure(
    figure,
    "BART: which source tokens (and earlier outputs) produced each output token",
    "Rows: the output tokens; columns: the source, then the decoder prefix. Darker = more "
    "relevant; a blank cell is a token the decoder could not see yet.",
    warning=UNTRAINED,
)
save(figure, "03_bart_token_attr.png")

# %% [markdown]
# ## 3. A generated continuation of a causal LM
#
# With no `target`, the continuation is generated first (`gen_args` go to `model.generate`),
# then each generated token is explained by the row of the position that produced it. Causal
# LMs use the lean path: one relevance row is folded in during the backward pass and the
# attention is recomputed a block of query rows at a time, so long prompts fit.
# `batch_size` target tokens share one forward and backward pass.

# %%
llama_config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=2 * WIDTH,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=tokenizer.pad_token_id,
    eos_token_id=EOS,
)
llama = LlamaForCausalLM(llama_config).eval()
prompt = TextTokenInput("the cat sat on the mat and the dog", tokenizer)
generation = CheferLLMAttribution(llama, tokenizer).attribute(
    prompt,
    gen_args={"max_new_tokens": 3 if QUICK else 6, "do_sample": False, "eos_token_id": None},
    include_generated=True,
    batch_size=4,
)
print("generated:", generation.output_tokens)
# Captum's `seq_attr_dict` is keyed by token text, so a repeated token ("the") keeps only one
# value; list the tokens in order instead (the prompt, then the generated tokens that
# `include_generated=True` adds).
print("sequence relevance, tokens in order:")
for position, (token, value) in enumerate(
    zip(generation.input_tokens, generation.seq_attr.tolist(), strict=True)
):
    print(f"  {position:2d} {token:>10s} {value:+.4f}")
figure = generation.plot_token_attr()[0]
from_zero(figure, "Chefer relevance (never negative)")
label_figure(
    figure,
    "Llama: which prompt tokens (and earlier generated ones) produced each generated token",
    "Rows: the generated tokens; columns: the prompt, then the generated prefix. Darker = "
    "more relevant; a blank cell is a token generated later.",
    warning=UNTRAINED,
)
save(figure, "03_llama_token_attr.png")
figure = generation.plot_seq_attr()[0]
label_figure(
    figure,
    "Llama: relevance of each token for the whole continuation",
    "Bar height: Chefer relevance summed over the generated tokens (taller = more relevant).",
    warning=UNTRAINED,
)
save(figure, "03_llama_seq_attr.png")

# %% [markdown]
# *Real checkpoints* (not run here): any Hugging Face causal LM or seq2seq model works the
# same way, e.g.
#
# ```python
# from transformers import AutoModelForCausalLM, AutoTokenizer
# tokenizer = AutoTokenizer.from_pretrained("meta-llama/Llama-3.2-1B")
# model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B").eval()
# result = CheferLLMAttribution(model, tokenizer).attribute(
#     TextTokenInput("The capital of France is", tokenizer), target=" Paris")
# result.plot_token_attr(show=True)
# ```
#
# ## What else is there
#
# - `CheferEncoderDecoder(forward_func, model)` explains any output of BART, T5 (whose
#   relative position bias is captured with the attention) or Marian directly, with the
#   source relevance and the decoder-prefix relevance as a tuple.
# - `CheferSingleStream` (ViLT, VisualBERT) splits the relevance over the joint sequence back
#   onto the text ids and the image (ViLT's randomly ordered patches are put back in place).
# - `CheferCoAttention` (LXMERT) applies the full eq. 6-11 with two streams.
# - A `StreamMap` of module-name rules adapts any of them to another model family.
