"""Tiny models of the real SD1 and SDXL architectures, built in code.

They use the same diffusers and transformers classes as the full models (AutoencoderKL with an
8x downsampling VAE, UNet2DConditionModel, CLIPTextModel with the real CLIP vocabulary), so every
code path that serves SD 1.5 or SDXL serves them unchanged, in milliseconds on a CPU. Tests and
benchmarks build them; nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).parents[1] / "assets" / "clip_tokenizer"

_TEXT_WIDTH = 32


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 tokens), from the vocabulary shipped with sdlora."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), pad_token=pad_token)


def tiny_text_encoder(with_projection: bool = False, hidden_size: int = _TEXT_WIDTH):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="quick_gelu",
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config)


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 16, 32, 32],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
    )


def tiny_unet(family: str):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        norm_num_groups=16,
    )
    if family == "sdxl":
        return UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            cross_attention_dim=_TEXT_WIDTH * 2,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=_TEXT_WIDTH + 6 * 8,
        )
    return UNet2DConditionModel(
        **common,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=_TEXT_WIDTH,
    )


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_pipeline(family: str = "sd1", seed: int = 0, prediction_type: str = "epsilon"):
    """A randomly initialised tiny pipeline of `family` ("sd1" or "sdxl"), reproducible from `seed`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    unet = tiny_unet(family)
    vae = tiny_vae()
    scheduler = tiny_scheduler(prediction_type)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=tiny_text_encoder(),
            text_encoder_2=tiny_text_encoder(with_projection=True),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
        )
    if family != "sd1":
        raise ValueError(f"tiny models exist for sd1 and sdxl, not {family!r}")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(folder: str | Path, family: str = "sd1", **kwargs) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder that `from_pretrained` loads."""
    pipeline = build_tiny_pipeline(family, **kwargs)
    pipeline.save_pretrained(str(folder))
    return Path(folder)
