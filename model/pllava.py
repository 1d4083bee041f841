"""PLLaVA: CLIP frames -> projector -> 3-D average pooling -> visual tokens spliced into a Llama prompt.

A thin layer over transformers' CLIP and Llama modules (like transformers' `modeling_llava.py`). Attribute
names make our state-dict names those of the released checkpoint once the LoRA is merged:
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`, `language_model.{model,lm_head}.*`.

Shapes: B clips, T frames (<= num_frames), P = 24*24 patches per frame, Dv CLIP width, D LLM width,
N = T'*h'*w' visual tokens per clip (16*12*12 = 2304 for the released pooling shape), L prompt tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM
from transformers.activations import ACT2FN

from model.config import PllavaConfig


class PllavaProjector(nn.Module):
    """linear(Dv -> D) -> act -> linear(D -> D), applied to every patch of every frame."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class VisionTower(nn.Module):
    """CLIP under `vision_model`, its attribute name in transformers 4.37 and hence in the checkpoint
    (transformers 5 flattened CLIPVisionModel, so it no longer has that level itself)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)

    def forward(self, pixel_values: torch.Tensor, **kwargs):
        return self.vision_model(pixel_values, **kwargs)


def repeat_frame_indices(num_real: int, num_frames: int) -> torch.Tensor:
    """Indices that stretch `num_real` frames to `num_frames` by repetition, keeping temporal order.

    Every real frame is used (the reference's repeat_interleave-then-truncate drops the last ones).
    """
    return torch.arange(num_frames) * num_real // num_frames


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding: real tokens count from 0, pads get 1 (their value is irrelevant, they are masked)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


class PllavaModel(nn.Module):
    def __init__(self, config: PllavaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.clip_vision_config(attn_implementation))
        self.multi_modal_projector = PllavaProjector(
            config.vision["hidden_size"], config.hidden_size, config.projector_hidden_act
        )
        self.pooling = nn.AdaptiveAvgPool3d(config.pooling_shape)  # no parameters
        self.language_model = LlamaForCausalLM(config.llama_config(attn_implementation))

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear_1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear_1.weight.device

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def encode_videos(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) CLIP-normalised frames -> (B, N, D) visual tokens, reusable across prompts.

        T < num_frames is padded by repeating frames (after CLIP, which is per-frame, so it costs nothing).
        """
        if pixel_values.ndim != 5:
            raise ValueError(f"pixel_values must be (B, T, 3, H, W), got shape {tuple(pixel_values.shape)}")
        cfg = self.config
        batch, num_real = pixel_values.shape[:2]
        if not 1 <= num_real <= cfg.num_frames:
            raise ValueError(f"expected 1..{cfg.num_frames} frames per clip, got {num_real}")
        h, w = cfg.frame_shape

        frames = pixel_values.flatten(0, 1).to(device=self.device, dtype=self.dtype)  # (B*T, 3, H, W)
        # One CLIP call over all B*T frames.
        hidden = self.vision_tower(frames, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS: (B*T, P, Dv)
        if hidden.shape[1] != h * w:
            raise ValueError(
                f"CLIP gave {hidden.shape[1]} patch tokens per frame, frame_shape {h}x{w} needs {h * w}"
            )
        tokens = self.multi_modal_projector(hidden)  # (B*T, P, D)

        video = tokens.view(batch, num_real, h, w, -1)  # (B, T, h, w, D)
        if num_real < cfg.num_frames:
            video = video[
                :, repeat_frame_indices(num_real, cfg.num_frames).to(video.device)
            ]  # (B, T_full, h, w, D)
        video = video.permute(0, 4, 1, 2, 3)  # (B, D, T_full, h, w)
        pooled = self.pooling(video)  # (B, D, T', h', w')
        return pooled.flatten(2).transpose(1, 2)  # (B, T'*h'*w', D), frame-major like the reference

    def merge_visual_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, video_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replaces each row's single `<image>` token by its N visual tokens.

        input_ids/attention_mask (B, L), left-padded; video_features (B, N, D).
        Returns inputs_embeds (B, L-1+N, D), attention_mask (B, L-1+N), position_ids (B, L-1+N).
        The slot is found by token id; pads stay in front because the slot is after them.
        """
        batch, length = input_ids.shape
        num_visual = video_features.shape[1]
        is_image = input_ids == self.config.image_token_index  # (B, L)
        counts = is_image.sum(-1)
        if video_features.shape[0] != batch or not torch.all(counts == 1):
            raise ValueError(
                f"every prompt needs exactly one <image> token (id {self.config.image_token_index}) and one "
                f"clip; got counts {counts.tolist()} for {video_features.shape[0]} clips"
            )
        if torch.any(attention_mask[is_image] == 0):
            raise ValueError("the <image> token is masked out by the attention mask")
        slot = is_image.long().argmax(-1, keepdim=True)  # (B, 1)

        text = self.embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, L, D); slot row is overwritten
        new_length = length - 1 + num_visual
        pos = torch.arange(new_length, device=input_ids.device).expand(batch, -1)  # (B, L-1+N)
        in_visual = (pos >= slot) & (pos < slot + num_visual)
        # Source index in the text for positions outside the visual span: before the slot as is, after it shifted.
        text_index = torch.where(pos < slot, pos, pos - num_visual + 1).clamp(0, length - 1)
        visual_index = (pos - slot).clamp(0, num_visual - 1)

        dim = text.shape[-1]
        features = video_features.to(device=text.device, dtype=text.dtype)
        embeds = torch.where(
            in_visual.unsqueeze(-1),
            features.gather(1, visual_index.unsqueeze(-1).expand(-1, -1, dim)),
            text.gather(1, text_index.unsqueeze(-1).expand(-1, -1, dim)),
        )  # (B, L-1+N, D)
        mask = torch.where(in_visual, 1, attention_mask.gather(1, text_index)).to(attention_mask.dtype)
        return embeds, mask, position_ids_from_mask(mask)

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        video_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask, position_ids) for the language model; text-only when no features."""
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        if video_features is None:
            return self.embed_tokens(input_ids), attention_mask, position_ids_from_mask(attention_mask)
        return self.merge_visual_tokens(input_ids, attention_mask, video_features)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full no-cache forward. Returns (logits (B, L', V), attention_mask (B, L')).

        Pass either pixel_values (B, T, 3, H, W) or precomputed video_features (B, N, D), or neither for text.
        """
        if pixel_values is not None and video_features is not None:
            raise ValueError("pass pixel_values or video_features, not both")
        if pixel_values is not None:
            video_features = self.encode_videos(pixel_values)
        embeds, mask, position_ids = self.prepare_inputs(input_ids, attention_mask, video_features)
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False
        )
        return out.logits, mask
