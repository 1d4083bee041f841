"""Build a tiny random CLIP in the Hugging Face layout, offline, for the tests and the demo of `score.model`.

    python -m model.tiny_clip OUTDIR [--seed N] [--image-size 224] [--patch-size 32]

The files are those of a download of openai/clip-vit-large-patch14-336 (config.json with model_type "clip",
text_config and vision_config, model.safetensors, preprocessor_config.json, and CLIP's tokenizer files:
vocab.json, merges.txt, tokenizer.json, tokenizer_config.json), so `score.model`
loads it with the code that loads the real one. Widths and depths are tiny; the text tower keeps CLIP's 77
positions. The tokenizer is CLIP's byte-level BPE with the 512 single-byte symbols (with and without the
end-of-word mark) and no merges: any text encodes, one token per character, so a caption longer than ~75
characters is cut at 77 tokens as a long caption is by the real one. Scores are random numbers in [-1, 1].
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from model.describe import CLIP_MEAN, CLIP_STD

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TEXT_TOKENS = 77


def clip_vocab() -> dict[str, int]:
    """CLIP's vocabulary order: the byte symbols, the same with "</w>", then (no merges) the two specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_clip(outdir: str | Path, *, seed: int = 0, image_size: int = 224, patch_size: int = 32) -> Path:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    tokenizer.model_max_length = MAX_TEXT_TOKENS
    tokenizer.save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": MAX_TEXT_TOKENS,
                     "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": image_size, "patch_size": patch_size},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "size": {"shortest_edge": image_size},
    }, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Prints the checkpoint's path.")
    p.add_argument("outdir", type=Path, metavar="OUTDIR",
                   help="folder to write the checkpoint into (created; existing files are overwritten)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights; the same seed gives byte-identical files (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224,
                   help="CLIP input size; 336 as clip-vit-large-patch14-336 (default: %(default)s)")
    p.add_argument("--patch-size", type=int, default=32, help="CLIP patch size (default: %(default)s)")
    args = p.parse_args(argv)
    print(build_tiny_clip(args.outdir, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size))


if __name__ == "__main__":
    main()
