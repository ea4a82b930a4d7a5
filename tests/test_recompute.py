"""Recomputed feed-forwards: the same gradients, fewer activations kept for backward."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from sdlora.train.lora import UNET_TARGETS, add_lora, lora_parameters
from sdlora.train.recompute import recompute_feed_forwards


def lora_unet(tiny_sd1, targets):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1, subfolder="unet").requires_grad_(False)
    add_lora(unet, UNET_TARGETS[targets], 4, 4, 0.1)
    return unet


def step(unet) -> tuple[dict[str, torch.Tensor], int]:
    """LoRA gradients of one forward and backward, and the bytes saved for backward."""
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    frozen = {p.untyped_storage().data_ptr() for p in unet.parameters() if not p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    torch.manual_seed(2)  # LoRA dropout
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        prediction = unet(latents, torch.tensor([10, 500]), text).sample
    prediction.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in lora_parameters(unet).items()}
    return grads, sum(size for pointer, size in saved.items() if pointer not in frozen)


def test_recomputed_feed_forwards_give_the_same_gradients_and_keep_less(tiny_sd1):
    # "transformer" puts LoRA (with dropout) inside the feed-forwards: the recompute replays it.
    plain_grads, plain_saved = step(lora_unet(tiny_sd1, "transformer"))
    unet = lora_unet(tiny_sd1, "transformer")
    blocks = sum(isinstance(module, BasicTransformerBlock) for module in unet.modules())
    assert recompute_feed_forwards(unet) == blocks > 0
    grads, saved = step(unet)
    assert grads.keys() == plain_grads.keys()
    assert all(torch.equal(grads[name], plain_grads[name]) for name in grads)
    assert saved < 0.85 * plain_saved, (saved, plain_saved)


def test_training_with_recomputed_feed_forwards_writes_the_same_adapter(tiny_sd1, tmp_path):
    from test_train import adapter_tensors, tiny_config

    from sdlora.train.loop import train

    adapters = [adapter_tensors(train(tiny_config(
        tiny_sd1, tmp_path / str(recompute), lora={"targets": "transformer", "dropout": 0.1},
        train={"recompute_feed_forward": recompute})))[0] for recompute in (False, True)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])
