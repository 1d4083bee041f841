"""Build a tiny random en→zh translation model, offline, for the demo and the tests of the `mt` mode.

    python -m model.tiny_mt OUTDIR [--seed N]

It has the layout of a real Marian opus-mt checkpoint as `load_translator` reads it (config.json,
generation_config.json, model.safetensors, tokenizer files), so the same loading and decoding code runs
on it. Its translations are nonsense. The tokenizer is a byte-level BPE trained here on a small
English+Chinese corpus (Marian's own tokenizer needs sentencepiece files); byte-level means any text
encodes and every generated id decodes. The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MarianConfig, MarianMTModel, PreTrainedTokenizerFast

CORPUS = [
    "The video shows a man walking along a busy street in the city.",
    "视频中，一名男子沿着城市繁忙的街道行走。",
    "A woman in a red coat is talking to a child in a park.",
    "一位穿红色外套的女子在公园里和一个孩子说话。",
    "A red car drives down the road while the camera follows it.",
    "一辆红色的汽车在路上行驶，镜头跟随着它。",
    "Two dogs are running on the grass and playing with a ball.",
    "两只狗在草地上奔跑，玩着一个球。",
    "The camera slowly zooms in on a cup of coffee on a wooden table.",
    "镜头慢慢推近木桌上的一杯咖啡。",
    "People are sitting at tables outside a cafe in the sunshine.",
    "人们坐在阳光下咖啡馆外的桌子旁。",
    "A chef is cutting vegetables in a kitchen and talking to the camera.",
    "一位厨师在厨房里切菜，并对着镜头说话。",
    "The sun sets behind the mountains and the sky turns orange.",
    "太阳在山后落下，天空变成了橙色。",
]
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2
VOCAB_SIZE = 512
MAX_POSITIONS = 256
# A random model with the usual 0.02 init gives the same output for every input; wide weights make it
# depend on the input, and a bias towards EOS makes it stop after a varying number of tokens, so tests
# see both translations that end and translations that hit max_new_tokens.
INIT_STD = 1.0
EOS_LOGIT_BIAS = 7.0


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE over CORPUS; appends </s> to every source, as Marian does."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def build_model(vocab_size: int, seed: int) -> MarianMTModel:
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,  # Marian starts decoding from <pad>
        forced_eos_token_id=1,
        init_std=INIT_STD,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(config).eval()
    model.final_logits_bias[0, config.eos_token_id] = EOS_LOGIT_BIAS
    model.generation_config.bad_words_ids = [[config.pad_token_id]]  # as in released Marian configs
    return model


def build_tiny_mt(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to `out_dir`; returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build_tiny_mt(args.out_dir, seed=args.seed)
    print(f"tiny en→zh translation model written to {out}")


if __name__ == "__main__":
    main()
