"""Speed of the fused mixer against diffusers/peft adapters, on an SD1.5-sized UNet and CLIP.

    python bench/mix_speed.py [--quick] [--slider-only] [--wall]

Random weights built from the SD1.5 configs written below (nothing downloaded), rank-16
adapters on attention (UNet to_q/k/v/out.0, text q/k/v/out_proj). Measures:
1. one UNet step (batch 2, as with classifier-free guidance, 256 px = 32x32 latents) with 0,
   1, 3, 8 adapters: sdlora's fused mix vs diffusers `set_adapters` (unfused peft layers),
   as ratios to the base step;
2. one slider change in a 3-adapter mix: sdlora `set_weights` (pure: the weights are bit for
   bit what a fresh Mixer fuses for the mix, whatever came before) vs diffusers `unfuse_lora` +
   `set_adapters` + `fuse_lora` (not pure: unfusing subtracts, so the bits depend on the
   history), on the UNet alone and on UNet + text encoder.
Goals: fused <= 1.01x base at any adapter count; slider change on UNet + text encoder <= 100 ms.
Results and notes: bench/RESULTS-mix.md.

Timing: by default one thread and process CPU time, because on a small shared machine wall time
measures the neighbours (two OpenMP threads on two busy cores slow down tenfold). `--wall`
times wall-clock with torch's default threads, for a machine of one's own.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sdlora.adapters.core import Adapter, LoraLayer
from sdlora.mix.mixer import Mixer

RANK = 16
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def sd15_pipeline():
    """A StableDiffusionPipeline whose UNet and text encoder have SD1.5's shapes (random)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.base.tiny import clip_tokenizer, tiny_scheduler, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="quick_gelu",
        )
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def random_lora(pipeline, name: str, seed: int, text_encoder: bool) -> tuple[Adapter, dict]:
    """The same random adapter as an sdlora `Adapter` and as a peft-layout state dict."""
    generator = torch.Generator().manual_seed(seed)
    targets = {"unet": UNET_TARGETS, **({"text_encoder": TEXT_TARGETS} if text_encoder else {})}
    layers, state_dict = {}, {}
    for component, suffixes in targets.items():
        for module_name, module in getattr(pipeline, component).named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(suffixes):
                down = torch.randn(RANK, module.in_features, generator=generator) * 0.01
                up = torch.randn(module.out_features, RANK, generator=generator) * 0.01
                layers[f"{component}.{module_name}"] = LoraLayer(down=down, up=up, alpha=RANK)
                state_dict[f"{component}.{module_name}.lora_A.weight"] = down
                state_dict[f"{component}.{module_name}.lora_B.weight"] = up
    return Adapter(name=name, layers=layers, family="sd1"), state_dict


CLOCK = time.process_time  # main() switches to time.perf_counter with --wall


def seconds(function) -> float:
    start = CLOCK()
    function()
    return CLOCK() - start


def unet_step(unet, latent: int):
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, latent, latent, generator=generator),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(2, 77, 768, generator=generator),
    )

    def step():
        with torch.inference_mode():
            unet(**inputs)

    return step


def bench_steps(ours, theirs, mixer, adapters, counts, latent, runs) -> dict:
    """Median UNet step seconds per configuration: "base", ("sdlora", n), ("diffusers", n).

    Configurations take turns within each round, so a machine that slows down midway slows
    every configuration alike.
    """
    names = [adapter.name for adapter, _ in adapters]

    def ours_with(count):
        return lambda: mixer.set_weights(
            {n: (1.0 / count if i < count else 0.0) for i, n in enumerate(names)}
        )

    def theirs_with(count):
        return lambda: theirs.set_adapters(names[:count], [1.0 / count] * count)

    configurations = {"base": (lambda: mixer.set_weights(dict.fromkeys(names, 0.0)), ours)}
    for count in counts:
        configurations[("sdlora", count)] = (ours_with(count), ours)
        configurations[("diffusers", count)] = (theirs_with(count), theirs)
    samples = {key: [] for key in configurations}
    for pipeline in (ours, theirs):
        unet_step(pipeline.unet, latent)()  # warm-up: allocations, kernels picked
    for _ in range(runs):
        for key, (prepare, pipeline) in configurations.items():
            prepare()
            samples[key].append(seconds(unet_step(pipeline.unet, latent)))
    return {key: statistics.median(values) for key, values in samples.items()}


def bench_slider(ours, theirs, mixer, adapters, components, runs) -> tuple[float, float]:
    """Seconds for one weight change in a 3-adapter mix: sdlora (pure), then diffusers
    unfuse + set_adapters + fuse."""
    names = [adapter.name for adapter, _ in adapters]
    text = 1.0 if "text_encoder" in components else 0.0
    for name in names:
        mixer.set_component_weights(name, {"unet": 1.0, "text_encoder": text})
    mixer.set_weights(dict.fromkeys(names, 0.5))
    values = [0.2, 0.8] * (runs + 1)
    ours_times = [seconds(lambda v=v: mixer.set_weights({names[0]: v})) for v in values]
    mixer.set_weights(dict.fromkeys(names, 0.0))

    theirs.set_adapters(names, [0.5] * len(names))
    theirs.fuse_lora(components=components, adapter_names=names)

    def change(value):
        theirs.unfuse_lora(components=components)
        theirs.set_adapters(names, [value, 0.5, 0.5])
        theirs.fuse_lora(components=components, adapter_names=names)

    theirs_times = [seconds(lambda v=v: change(v)) for v in values[: runs + 1]]
    theirs.unfuse_lora(components=components)
    return statistics.median(ours_times[1:]), statistics.median(theirs_times[1:])


def print_step_table(steps: dict, counts) -> None:
    base = steps["base"]
    print("| adapters | sdlora fused | ratio to base | diffusers set_adapters | ratio to base |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| 0 | {base * 1000:.0f} ms | 1.000x | {base * 1000:.0f} ms | 1.000x |")
    for count in counts:
        fused, unfused = steps[("sdlora", count)], steps[("diffusers", count)]
        print(
            f"| {count} | {fused * 1000:.0f} ms | {fused / base:.3f}x "
            f"| {unfused * 1000:.0f} ms | {unfused / base:.3f}x |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 px, 0/1/3 adapters, fewer runs")
    parser.add_argument("--wall", action="store_true", help="wall-clock time, default threads")
    parser.add_argument("--slider-only", action="store_true", help="skip the UNet step table")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter
    else:
        torch.set_num_threads(1)
    latent, counts, runs = (16, (1, 3), 2) if args.quick else (32, (1, 3, 8), 3)

    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")

    # Two identical pipelines: sdlora fuses into one, diffusers wraps the other in peft layers.
    ours, theirs = sd15_pipeline(), sd15_pipeline()
    adapters = [random_lora(ours, f"style{i}", i, text_encoder=True) for i in range(max(counts))]
    mixer = Mixer(ours)
    for adapter, state_dict in adapters:
        mixer.add(adapter)
        theirs.load_lora_weights(dict(state_dict), adapter_name=adapter.name)

    print(
        f"SD1.5-sized UNet + CLIP text encoder, random weights; UNet step at {latent * 8} px "
        f"(latent {latent}x{latent}, batch 2); rank {RANK} on attention; "
        f"{torch.get_num_threads()} thread(s); {'wall' if args.wall else 'CPU'} time, "
        f"median of {runs}\n"
    )
    if not args.slider_only:
        print_step_table(bench_steps(ours, theirs, mixer, adapters, counts, latent, runs), counts)

    print(
        "| slider change, 3 adapters | sdlora set_weights (pure) "
        "| diffusers unfuse+set+fuse (not pure) | speed-up |"
    )
    print("|---|---:|---:|---:|")
    for label, components in (
        ("UNet", ["unet"]),
        ("UNet + text encoder", ["unet", "text_encoder"]),
    ):
        ours_seconds, theirs_seconds = bench_slider(
            ours, theirs, mixer, adapters[:3], components, 5
        )
        print(
            f"| {label} | {ours_seconds * 1000:.1f} ms | {theirs_seconds * 1000:.1f} ms "
            f"| {theirs_seconds / ours_seconds:.1f}x |"
        )


if __name__ == "__main__":
    main()
