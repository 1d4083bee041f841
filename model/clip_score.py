"""Caption <-> clip similarity with a CLIP checkpoint in the Hugging Face layout (`score.model`).

    score = cos(text_embedding(caption_en), normalize(mean_i normalize(image_embedding(frame_i))))

over a few evenly spaced frames of the ones already decoded for captioning (no second decode). It is the
plain CLIP cosine (not CLIPScore's 2.5 * max(cos, 0)), so it lies in [-1, 1]; for CLIP ViT-L/14 a caption
that matches its clip typically scores around 0.25-0.35 and an unrelated one below 0.15.

CLIP's text tower takes 77 tokens (start and end included); longer captions are cut there, so the score
judges the caption's first ~60 words. The image side uses the checkpoint's own preprocessing numbers
(`preprocessor_config.json`: crop size, mean, std) applied in torch: the frames arrive square (the
captioner's centre crop), so CLIP's resize + centre crop is one resize here. transformers' image processors
are not used: their fast variants need torchvision, and the slow ones go through PIL per image.

Weights load from safetensors; pickle `.bin` weights only with `allow_pickle` (then transformers reads them
with `torch.load(weights_only=True)`). Never `trust_remote_code`. No pipeline, no Ray.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from model.describe import ScoreModelInfo, describe_score_model, evenly_spaced

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ClipScorer:
    """A loaded CLIP that embeds frames (batched, when a clip batch is encoded) and captions."""

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str = "float32", frames: int = 4,
                 allow_pickle: bool = False):
        from transformers import AutoTokenizer, CLIPModel

        self.info: ScoreModelInfo = describe_score_model(path, allow_pickle=allow_pickle)
        d = Path(path)
        self.device = torch.device(device)
        self.frames = frames
        self.tokenizer = AutoTokenizer.from_pretrained(d, local_files_only=True, trust_remote_code=False)
        self.model = CLIPModel.from_pretrained(
            d, local_files_only=True, trust_remote_code=False, dtype=DTYPES[dtype],
            use_safetensors=bool(any(d.glob("*.safetensors"))),
        ).to(self.device).eval()
        self.size = self.info.image_size
        self.mean = torch.tensor(self.info.image_mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.info.image_std, device=self.device).view(1, 3, 1, 1)
        self.max_tokens = self.info.max_text_tokens

    @property
    def name(self) -> str:
        return self.info.name

    @torch.inference_mode()
    def embed_clips(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, S, S, 3) uint8 frames -> (B, D) float32 unit vectors: the mean of the unit image embeddings
        of `self.frames` evenly spaced frames of each clip, normalised again."""
        b, t = frames.shape[:2]
        picked = frames[:, evenly_spaced(t, self.frames)].to(self.device)  # (B, k, S, S, 3)
        k = picked.shape[1]
        x = picked.reshape(b * k, *picked.shape[2:]).permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.size, self.size):
            # bicubic as CLIP's own preprocessing; antialias so a downscale does not alias
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        emb = F.normalize(self.model.get_image_features(pixel_values=x).pooler_output.float(), dim=-1)
        return F.normalize(emb.view(b, k, -1).mean(dim=1), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit text embeddings (N, D), float32; each text cut at CLIP's 77 tokens."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return F.normalize(self.model.get_text_features(**enc).pooler_output.float(), dim=-1)

    def score(self, texts: list[str], image_embeddings: torch.Tensor) -> list[float]:
        """Cosine of each text with its clip's image embedding (rows of `embed_clips`)."""
        text = self.embed_texts(texts)
        return (text * image_embeddings.to(text.device).float()).sum(dim=-1).tolist()
