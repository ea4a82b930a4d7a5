"""The `sdlora` command. Each subcommand parses its arguments here and calls one function.

Every failure the user can fix arrives as `SdloraError` and is printed as one line on stderr
with exit status 2; nothing the user typed wrong ends in a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from sdlora.errors import SdloraError
from sdlora.files import is_disk_full
from sdlora.render.defaults import DEFAULT_CFG, DEFAULT_SCHEDULER, DEFAULT_STEPS
from sdlora.render.schedulers import SAMPLERS
from sdlora.threads import prepare_environment, use_threads


def _train(args: argparse.Namespace) -> None:
    from sdlora.train.command import train_command

    train_command(args)


def _render(args: argparse.Namespace) -> None:
    from sdlora.render.command import render_command

    render_command(args)


def _mix(args: argparse.Namespace) -> None:
    from sdlora.mix.command import mix_command

    mix_command(args)


def _convert(args: argparse.Namespace) -> None:
    from sdlora.adapters.command import convert_command

    convert_command(args)


def _info(args: argparse.Namespace) -> None:
    from sdlora.adapters.command import info_command

    info_command(args)


def _demo(args: argparse.Namespace) -> None:
    from sdlora.demo import demo_command

    demo_command(args)


def _ui(args: argparse.Namespace) -> None:
    from sdlora.ui.command import ui_command

    ui_command(args)


class _Once(argparse.Action):
    """An option that may be given once: a second --prompt would silently win otherwise."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) not in (None, self.default):
            parser.error(f"{option_string} given twice; use --prompts FILE for several prompts")
        setattr(namespace, self.dest, values)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for torch (default: the cores not busy at start)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlora", description="Train and mix Stable Diffusion LoRA adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter from a YAML config")
    train.add_argument("config", help="training config (YAML)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=200")
    train.add_argument("--resume", metavar="latest|PATH",
                       help="continue from the latest checkpoint in output.dir, or from PATH")
    add_threads_argument(train)
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run (adapter, checkpoints) already in output.dir")
    train.set_defaults(handler=_train)

    render = commands.add_parser("render", help="render prompts with a weighted mix of adapters")
    render.add_argument("--base", required=True, help="hub id, diffusers folder, .safetensors or 'demo'")
    render.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="an adapter file and its weight (default 1; negative allowed); "
                        "repeat for a mix")
    render.add_argument("--adapters-dir", help="folder that <lora:name:w> tags are resolved in")
    render.add_argument("--embeddings-dir", metavar="DIR",
                        help="textual-inversion embeddings (.safetensors); a file's name in the "
                             "prompt or negative prompt calls it, as in A1111")
    render.add_argument("--block-weights", action="append", default=[], metavar="NAME=SPEC",
                        help="per-component and per-block multipliers of adapter NAME: "
                        "te=0.5,unet=1,down=0,mid=1,up.1=0.5 or an A1111 LoRA Block Weight "
                        "vector (17/26 values for SD1, 12/20 for SDXL)")
    render.add_argument("--mix-mode", default="add", metavar="add|orthogonal",
                        help="how the adapters' updates combine: add (the sum, as A1111) or "
                        "orthogonal (what two adapters share counts once); sdlora.mix.modes")
    prompts = render.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action=_Once, help="one prompt (A1111 syntax, <lora:> tags)")
    prompts.add_argument("--prompts", action=_Once,
                         help="prompt file: .txt (one per line), .jsonl or .csv")
    render.add_argument("--out", required=True, help="output folder")
    render.add_argument("--negative", default="", action=_Once, help="negative prompt")
    render.add_argument("--seed", type=int, default=0,
                        help="seed of the first image, the next ones count up; -1: a random "
                        "seed, printed and recorded (default: %(default)s)")
    render.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="denoising steps (default: %(default)s)")
    render.add_argument("--cfg", type=float, default=DEFAULT_CFG,
                        help="classifier-free guidance scale (default: %(default)s)")
    render.add_argument("--width", type=int, help="default: the base's own resolution")
    render.add_argument("--height", type=int, help="default: the base's own resolution")
    render.add_argument("--scheduler", default=DEFAULT_SCHEDULER, metavar="NAME",
                        help=f"sampler, one of {', '.join(SAMPLERS)} (default: %(default)s)")
    render.add_argument("--clip-skip", type=int, default=1, metavar="N",
                        help="A1111's clip skip: 1 uses the text encoder's last layer, 2 the "
                        "one before (default: %(default)s)")
    render.add_argument("--init-image", metavar="PATH|DIR",
                        help="img2img: a picture, or a folder of them, to repaint in the mix's "
                        "style; each output is named after its input")
    render.add_argument("--strength", type=float, metavar="S",
                        help="img2img denoising strength, 0 keeps the picture, 1 repaints it "
                        "(default 0.75)")
    render.add_argument("--mask", metavar="PATH|DIR",
                        help="inpainting: white is repainted; a folder pairs masks with the "
                        "init images by file name")
    render.add_argument("--hires-scale", type=float, metavar="F",
                        help="hires fix: upscale the picture F times, then repaint it")
    render.add_argument("--hires-strength", type=float, metavar="S",
                        help="hires fix denoising strength (default 0.7)")
    render.add_argument("--batch", type=int, default=1, help="images per prompt")
    render.add_argument("--grid", metavar="NAME=w1,w2,...", action="append", default=[],
                        help="render a labelled grid over an adapter's weights")
    add_threads_argument(render)
    render.set_defaults(handler=_render)

    mix = commands.add_parser("mix", help="write one adapter, or a baked base, from a weighted mix")
    mix.add_argument("--base", required=True, metavar="MODEL",
                     help="the base the adapters were trained for: hub id, diffusers folder or "
                          "single-file checkpoint")
    mix.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]")
    target = mix.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="write the mix as one adapter (.safetensors)")
    mix.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    target.add_argument("--bake", metavar="DIR", help="write the base with the mix fused in")
    mix.add_argument("--rank", type=int, help="SVD-reduce the mixed adapter to this rank")
    mix.add_argument("--mix-mode", default="add", metavar="add|orthogonal",
                     help="how the adapters' updates combine (see render --mix-mode)")
    mix.add_argument("--save-precision", choices=("fp32", "fp16", "bf16"),
                     help="tensor precision of the --out adapter (default fp32: the concatenated "
                          "mix is exact; fp16/bf16 halve the file and round each factor)")
    mix.set_defaults(handler=_mix)

    convert = commands.add_parser("convert", help="convert an adapter between layouts, or write "
                                                  "its embeddings as embedding files")
    convert.add_argument("input")
    convert.add_argument("--to", required=True,
                         choices=["kohya", "diffusers", "embedding", "diffusers-embedding"],
                         help="embedding: A1111's OUT/<name>.safetensors; diffusers-embedding: "
                              "OUT/<name>/learned_embeds.safetensors (--out is then a folder)")
    convert.add_argument("--out", required=True, help="the converted file (.safetensors)")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.set_defaults(handler=_convert)

    info = commands.add_parser("info", help="describe an adapter or embedding file")
    info.add_argument("adapter")
    info.set_defaults(handler=_info)

    demo = commands.add_parser("demo", help="train two styles on the tiny base and render a grid")
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(handler=_demo)

    from sdlora.ui.command import add_arguments as add_ui_arguments

    ui = commands.add_parser("ui", help="open the web UI (the same as python app.py)")
    add_ui_arguments(ui)
    add_threads_argument(ui)
    ui.set_defaults(handler=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prepare_environment()
    warnings.filterwarnings("ignore", category=FutureWarning)
    # torchvision, when installed, warns about its image extension on every import
    warnings.filterwarnings("ignore", module="torchvision")
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None and args.threads < 1:
            raise SdloraError("--threads must be at least 1")
        if hasattr(args, "threads"):
            use_threads(args.threads)
        args.handler(args)
        sys.stdout.flush()  # a closed pipe (`sdlora info X | head`) shows up here, not at exit
    except BrokenPipeError:
        # As the Python docs recommend: the reader has gone, so point stdout at devnull (the
        # interpreter's final flush would fail again) and stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SdloraError as error:
        print(f"sdlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if not is_disk_full(error):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"sdlora {args.command}: error: disk full{where}; free space and run again "
              "(files written before are kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdlora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
