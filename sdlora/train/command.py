"""`sdlora train CONFIG.yaml [--set key=value ...] [--resume latest|PATH] [--overwrite]`."""

from __future__ import annotations

from sdlora.train.config import load_config


def train_command(args) -> None:
    from sdlora.train.loop import train

    config = load_config(args.config, overrides=args.set)
    train(config, resume=args.resume, overwrite=args.overwrite)
