"""The training loop, top to bottom: one loop for every family.

    images -> dataset -> cached latents / text embeddings (none with new words:
    sdlora.train.embeddings) -> noise + timestep -> UNet with LoRA
    -> loss (epsilon or v, min-SNR, prior preservation) -> optimizer step -> checkpoints
    -> {output.dir}/{output.name}.safetensors

Family differences live in `sdlora.base.families` and `sdlora.train.conditioning`; this file only
decides what happens in which order. Every random draw of step s comes from generators seeded
with (seed, s), and the data order is a pure function of (seed, epoch), so a run resumed from
a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
import os
from contextlib import closing
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from sdlora.base.clip_skip import check_clip_skip
from sdlora.base.models import load_base
from sdlora.errors import SdloraError
from sdlora.train import checkpoints
from sdlora.train.cache import LatentCache, TextCache, encode_latents
from sdlora.train.conditioning import encode_text, unet_conditioning
from sdlora.train.config import Config
from sdlora.train.cpu_tuning import tuned_for_cpu
from sdlora.train.data import TrainingData
from sdlora.train.embeddings import TokenTraining
from sdlora.train.lora import (
    TEXT_ATTENTION,
    TEXT_ATTENTION_AND_MLP,
    UNET_TARGETS,
    add_lora,
    export_adapter,
    lora_parameters,
    lora_strength,
    parameter_groups,
)
from sdlora.train.output import OutputWriter
from sdlora.train.preflight import check_before_loading, optimizer_class
from sdlora.train.recompute import recompute_feed_forwards

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def train(config: Config, resume: str | None = None, on_step=None,
          overwrite: bool = False) -> Path:
    """Train the adapter that `config` describes; returns the adapter file's path.

    `on_step(step, loss)`, when given, is called after each optimizer step (a benchmark times
    it, the web UI shows it); raising KeyboardInterrupt from it stops the run like Ctrl-C:
    a checkpoint is saved, then the KeyboardInterrupt propagates.
    A folder holding another run is refused unless `overwrite` (replace it) or `resume`.
    """
    if overwrite and resume:
        raise SdloraError("--overwrite starts a new run and --resume continues one: pass one of them")
    # A process may train several times (the web UI does); each run chooses its own precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              cpu=launched_on_cpus())
    with claim_output(config, accelerator, overwrite, resume is not None) as output:
        return _train(config, accelerator, output, resume, on_step)


def claim_output(config: Config, accelerator: Accelerator, overwrite: bool,
                 resuming: bool) -> OutputWriter:
    """The main process claims output.dir (writable, locked, no other run's files unless
    replacing is allowed); with several processes its verdict is shared, so that all stop
    together instead of the others waiting for it forever."""
    output, refusal = None, None
    try:
        output = OutputWriter(config, enabled=accelerator.is_main_process, overwrite=overwrite,
                              resuming=resuming)
    except SdloraError as error:
        refusal = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        if output is not None:
            output.close()
        raise SdloraError(refusal)
    return output


def _train(config: Config, accelerator: Accelerator, output: OutputWriter, resume: str | None,
           on_step) -> Path:
    main = accelerator.is_main_process
    device = accelerator.device
    weight_dtype = WEIGHT_DTYPES[config.train.mixed_precision]

    # --- everything checkable without the model, then the base and its frozen parts ---------
    resumed = checkpoints.load_for_resume(config, resume) if resume else None
    check_before_loading(config)
    base = load_base(config.base, torch_dtype=weight_dtype)
    pipeline, family = base.pipeline, base.family
    unet, vae = pipeline.unet, pipeline.vae
    text_encoders, tokenizers = base.text_encoders, base.tokenizers
    check_clip_skip(config.train.clip_skip, text_encoders, "train.clip_skip")
    freeze([unet, vae, *text_encoders], device)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    resolution = config.data.resolution or base.native_size
    output.resolution, output.v_prediction = resolution, base.prediction_type == "v_prediction"

    # --- data ----------------------------------------------------------------------------------
    with accelerator.main_process_first():
        data = TrainingData(config, pipeline, resolution, prepare=main)
    if main:
        tqdm.write(f"training data: {data.describe()}; {accelerator.num_processes} process(es)")

    # --- LoRA layers ---------------------------------------------------------------------------
    lora = config.lora
    torch.manual_seed(config.train.seed)  # peft draws the initial A matrices from it
    trained = {"unet": unet}
    add_lora(unet, UNET_TARGETS[lora.targets], lora.rank, lora.alpha, lora.dropout)
    if lora.text_encoder:
        pattern = TEXT_ATTENTION_AND_MLP if lora.text_encoder_mlp else TEXT_ATTENTION
        for name, encoder in zip(family.text_encoders, text_encoders):
            add_lora(encoder, pattern, lora.rank, lora.alpha, lora.dropout)
            trained[name] = encoder
    for model in trained.values():
        for parameter in lora_parameters(model).values():
            parameter.data = parameter.data.float()  # trainable weights stay fp32
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name, model in trained.items():
            if name != "unet":
                model.gradient_checkpointing_enable({"use_reentrant": False})
    elif config.train.recompute_feed_forward:
        recompute_feed_forwards(unet)

    # new prompt words: the text encoders then run every step (no text cache)
    new_words = TokenTraining(config.embeddings, family.text_encoders, tokenizers, text_encoders,
                              config.train.seed) if config.embeddings.tokens else None

    # --- caches: the VAE encoder and a frozen text encoder leave the step ----------------------
    def embed(captions: list[str]):
        if new_words is not None:
            captions = new_words.expand(captions)
        return encode_text(captions, tokenizers, text_encoders, device, config.train.clip_skip)

    latents = None
    if config.data.cache_latents != "none":
        latents = LatentCache(vae, data.dataset, config.data.cache_latents,
                              output.dir / "cache" / "latents", show_progress=main)
    text_cache = None if lora.text_encoder or new_words else TextCache(embed)
    validator = output.validator(pipeline, text_cache.batch if text_cache else embed,
                                 resolution) if main else None
    if latents is not None and validator is None:
        vae.to("meta")  # nothing decodes or encodes any more: give its memory back
    elif latents is not None:
        vae.encoder = None
    if text_cache is not None and not config.data.shuffle_tags:
        # Captions are a fixed set (dropout only adds ""): encode them all, free the encoders.
        text_cache.batch([sample.caption for sample in data.dataset.samples] + [""])
        for name in family.text_encoders:
            setattr(pipeline, name, None)  # validation passes embeddings, never text
        text_encoders.clear()

    # --- optimizer, schedule, resume -----------------------------------------------------------
    groups = parameter_groups(trained, config.train.learning_rate, lora.text_encoder_lr,
                              lora.loraplus_ratio)
    optimizer = make_optimizer(config, groups + ([new_words.param_group()] if new_words else []))
    from diffusers.optimization import get_scheduler

    lr_schedule = get_scheduler(config.train.lr_scheduler, optimizer,
                                num_warmup_steps=config.train.lr_warmup_steps,
                                num_training_steps=config.train.steps)
    start_step = 0
    if resumed:
        start_step = load_training_state(*resumed, trained, optimizer, lr_schedule)
        if new_words is not None:
            new_words.load(resumed[1]["embeddings"])
    prepared = accelerator.prepare(*trained.values(), optimizer)
    models = dict(zip(trained, prepared[:-1]))
    optimizer = prepared[-1]

    def training_state() -> dict:
        return {"lora": {name: {k: v.detach().cpu() for k, v in lora_parameters(
                    accelerator.unwrap_model(model)).items()} for name, model in models.items()},
                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                **({"embeddings": new_words.state()} if new_words else {})}

    def current_adapter():
        unwrapped = {name: accelerator.unwrap_model(m) for name, m in models.items()}
        adapter = export_adapter(unwrapped, config.output.name, family.name)
        adapter.embeddings = new_words.export() if new_words else {}
        return adapter

    # --- the loss of one micro-batch -----------------------------------------------------------
    def batch_latents(indices: list[int], paired: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents of the images and, for paired images, of their originals."""
        if latents is not None:
            originals = latents.before_batch(indices).to(device) if paired else None
            return latents.batch(indices).to(device), originals
        items = [data.dataset.image(i) for i in indices]  # each file read once
        with torch.no_grad():
            clean = encode_latents(vae, torch.stack([item["pixel_values"] for item in items]))
            originals = encode_latents(vae, torch.stack([item["before_pixel_values"]
                                                         for item in items])) if paired else None
        return clean, originals

    def denoising_target(clean: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        if base.prediction_type == "v_prediction":
            return noise_scheduler.get_velocity(clean, noise, timesteps)
        return noise

    def conditioning_of(captions: list[str], placements) -> dict:
        text = text_cache.batch(captions) if text_cache else embed(captions)
        text = text.to(device, weight_dtype if text_cache else None)
        return unet_conditioning(text, [p.original_size for p in placements],
                                 [p.crop_top_left for p in placements],
                                 [p.target_size for p in placements])

    def micro_batch_loss(indices: list[int], epoch: int, generator,
                         strength: float) -> torch.Tensor:
        samples = [data.dataset.samples[i] for i in indices]
        paired = samples[0].before is not None  # instance images of a paired run, not class ones
        clean, original = batch_latents(indices, paired)
        if paired:  # at strength s: the picture s of the way styled
            clean = original + strength * (clean - original)

        noise = torch.randn(clean.shape, generator=generator)
        if config.train.noise_offset:
            noise += config.train.noise_offset * torch.randn(
                (clean.shape[0], clean.shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (clean.shape[0],), generator=generator)
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = denoising_target(clean, noise, timesteps)
        captions = [data.dataset.caption(i, epoch) for i in indices]
        placements = [sample.placement for sample in samples]
        with accelerator.autocast():
            prediction = models["unet"](noisy.to(weight_dtype), timesteps,
                                        **conditioning_of(captions, placements)).sample
        if paired and config.train.paired_target == "change":
            # The base's error on the original stays in the target: only the style is learnt.
            with torch.no_grad(), lora_strength(models.values(), 0.0), accelerator.autocast():
                noisy_original = noise_scheduler.add_noise(original, noise, timesteps)
                base_prediction = models["unet"](noisy_original.to(weight_dtype), timesteps,
                                                 **conditioning_of(captions, placements)).sample
            target = base_prediction.float() + (target - denoising_target(original, noise, timesteps))
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if config.train.min_snr_gamma:
            loss = loss * min_snr_weights(noise_scheduler, timesteps, config.train.min_snr_gamma,
                                          base.prediction_type)
        return loss.mean()

    # --- the loop ------------------------------------------------------------------------------
    accumulation = config.train.gradient_accumulation

    def accumulate_gradients(step: int) -> torch.Tensor:
        """Forward and backward over the micro-batches of one optimizer step; the last loss."""
        if new_words is not None:
            new_words.set_phase(step, [p for g in groups for p in g["params"]])
        for micro in range(accumulation):
            global_index = (step * accumulation + micro) * accelerator.num_processes \
                + accelerator.process_index
            generator = torch.Generator().manual_seed(config.train.seed * 1_000_003 + global_index)
            torch.manual_seed(config.train.seed + global_index)  # LoRA dropout
            syncing = micro == accumulation - 1
            # Paired data: at a random strength s the adapter, scaled by s, learns pictures s of
            # the way from the originals to the styled images, so its weight scales the style.
            # The strength holds through backward, which recomputes parts of the forward.
            strength = torch.rand((), generator=generator).item() if data.dataset.paired else 1.0
            with contextlib.ExitStack() as stack:
                if not syncing:
                    for model in models.values():
                        stack.enter_context(accelerator.no_sync(model))
                stack.enter_context(lora_strength(models.values(), strength))
                epoch, indices = data.batch("instance", global_index)
                loss = micro_batch_loss(indices, epoch, generator, strength)
                if "class" in data.kinds:
                    epoch, indices = data.batch("class", global_index)
                    loss = loss + config.data.prior_loss_weight * micro_batch_loss(
                        indices, epoch, generator, strength)
                if not torch.isfinite(loss):
                    raise SdloraError(non_finite_message(loss, step, output))
                accelerator.backward(loss / accumulation)
        return loss

    params = [p for group in optimizer.param_groups for p in group["params"]]
    output.start(resumed[1]["run"]["id"] if resumed else checkpoints.new_run_id())
    progress = tqdm(total=config.train.steps, initial=start_step, desc=f"training {config.output.name}",
                    disable=not main, dynamic_ncols=True)
    step = start_step
    for model in models.values():
        model.train()
    with tuned_for_cpu(device), closing(progress):  # closed before any error is printed
        try:
            while step < config.train.steps:
                loss = accumulate_gradients(step)
                if config.train.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.train.max_grad_norm)
                optimizer.step()
                lr_schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
                if on_step is not None:
                    on_step(step, loss_value)

                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_schedule.get_last_lr()[0]:.2e}")
                output.log_scalars(step, loss=loss_value, lr=lr_schedule.get_last_lr()[0])
                if validator and config.validation.every and step % config.validation.every == 0:
                    output.validation_grid(validator, step, models,
                                           partial(lora_strength, models.values()),
                                           (0.5, 1.0) if data.dataset.paired else (1.0,))
                if config.checkpoint.every and step % config.checkpoint.every == 0 \
                        and step < config.train.steps:
                    accelerator.wait_for_everyone()
                    output.checkpoint(step, training_state, current_adapter)
        except KeyboardInterrupt:
            progress.close()
            output.checkpoint(step, training_state, current_adapter)
            output.say(f"interrupted at step {step}; checkpoint saved, continue with --resume latest")
            raise
    accelerator.wait_for_everyone()
    path = output.final_adapter(current_adapter(), data, step)
    accelerator.end_training()
    return path


def freeze(modules: list[torch.nn.Module], device: torch.device) -> None:
    """No gradients for the base's own weights. A function, not a loop in `train`, so that no
    loop variable keeps a text encoder alive after the text cache has let it go."""
    for module in modules:
        module.requires_grad_(False).to(device)


def launched_on_cpus() -> bool:
    """Several processes and no GPU: accelerate must be told, or each process trains alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_optimizer(config: Config, groups: list[dict]) -> torch.optim.Optimizer:
    return optimizer_class(config)(groups, lr=config.train.learning_rate,
                                   weight_decay=config.train.weight_decay)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def load_training_state(path: Path, state: dict, trained: dict, optimizer, lr_schedule) -> int:
    for name, model in trained.items():
        saved = state["lora"].get(name)
        if saved is None:
            raise SdloraError(f"checkpoint {path} has no LoRA weights for {name}; "
                              "it was made with another lora config")
        current = lora_parameters(model)
        if set(saved) != set(current):
            raise SdloraError(f"checkpoint {path} does not match lora.targets/rank of this config")
        with torch.no_grad():
            for key, parameter in current.items():
                parameter.copy_(saved[key])
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    return int(state["step"])


def non_finite_message(loss: torch.Tensor, step: int, output: OutputWriter) -> str:
    kept = checkpoints.last_good_description(output.dir, output.dtype)
    value = "nan" if math.isnan(loss.item()) else "inf"
    return (f"loss became {value} at step {step + 1}; training stopped and {kept}. "
            "Lower train.learning_rate or use train.mixed_precision: bf16 instead of fp16")
