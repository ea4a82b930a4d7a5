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
    train.set_defaults(handler=_train)

    render = commands.add_parser("render", help="render prompts with a weighted mix of adapters")
    render.add_argument("--base", required=True, help="hub id, diffusers folder, .safetensors or 'demo'")
    render.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]")
    render.add_argument("--adapters-dir", help="folder that <lora:name:w> tags are resolved in")
    prompts = render.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl or .csv")
    render.add_argument("--out", required=True, help="output folder")
    render.add_argument("--negative", default="", help="negative prompt")
    render.add_argument("--seed", type=int, default=0)
    render.add_argument("--steps", type=int, default=30)
    render.add_argument("--cfg", type=float, default=7.0)
    render.add_argument("--width", type=int)
    render.add_argument("--height", type=int)
    render.add_argument("--scheduler", default="euler_a")
    render.add_argument("--batch", type=int, default=1, help="images per prompt")
    render.add_argument("--grid", metavar="NAME=w1,w2,...", action="append", default=[],
                        help="render a labelled grid over an adapter's weights")
    render.set_defaults(handler=_render)

    mix = commands.add_parser("mix", help="write one adapter, or a baked base, from a weighted mix")
    mix.add_argument("--base", required=True)
    mix.add_argument("--lora", action="append", required=True, metavar="PATH[:WEIGHT]")
    target = mix.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="write the mix as one adapter (.safetensors)")
    target.add_argument("--bake", metavar="DIR", help="write the base with the mix fused in")
    mix.add_argument("--rank", type=int, help="SVD-reduce the mixed adapter to this rank")
    mix.set_defaults(handler=_mix)

    convert = commands.add_parser("convert", help="convert an adapter between layouts")
    convert.add_argument("input")
    convert.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    convert.add_argument("--out", required=True)
    convert.set_defaults(handler=_convert)

    info = commands.add_parser("info", help="describe an adapter file")
    info.add_argument("adapter")
    info.set_defaults(handler=_info)

    demo = commands.add_parser("demo", help="train two styles on the tiny base and render a grid")
    demo.add_argument("--out", default="out/demo")
    demo.set_defaults(handler=_demo)

    from sdlora.ui.command import add_arguments as add_ui_arguments

    ui = commands.add_parser("ui", help="open the web UI (the same as python app.py)")
    add_ui_arguments(ui)
    ui.set_defaults(handler=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
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
