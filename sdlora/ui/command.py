"""The web UI: `python app.py` or `sdlora ui`, a Gradio app with a Generate and a Train tab.

    arguments -> Folders (what browsers may reach) -> Studio (base + mixer) and Trainer
    -> build_app: the base chooser, then the tabs (sdlora.ui.generate_tab, sdlora.ui.train_tab)
    -> launch on 127.0.0.1 unless --host says otherwise, behind a login when --auth,
       --auth-file or SDLORA_AUTH give one

The UI holds no logic of its own: generation is `Studio.generate` (the mixer under a lock),
training is `Trainer.start` (the training loop in a thread).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sdlora.errors import SdloraError

if TYPE_CHECKING:  # the heavy modules load when the UI starts, not with every `sdlora` command
    from sdlora.ui.folders import Folders
    from sdlora.ui.studio import Studio
    from sdlora.ui.training import Trainer

TITLE = "sdlora"
# Generations wait on Studio.lock, not on Gradio's queue, so a slow one does not hold up the
# other events (refresh, training progress, the render command).
CONCURRENCY = 4
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
AUTH_ENV = "SDLORA_AUTH"
Credentials = list[tuple[str, str]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default="demo",
        help="base model: hub id, diffusers folder, .safetensors or 'demo'",
    )
    parser.add_argument(
        "--adapters-dir",
        default="adapters",
        help="adapters offered for mixing; trained adapters are written here",
    )
    parser.add_argument(
        "--outputs-dir",
        default="outputs",
        help="generated images, in date folders (a folder per user with a login)",
    )
    parser.add_argument("--models-dir", help="folder of local base models users may choose")
    parser.add_argument("--embeddings-dir",
                        help="textual-inversion embeddings, used where a prompt names them")
    parser.add_argument(
        "--allow-base",
        action="append",
        default=[],
        metavar="ID",
        help="another base users may choose (a hub id or a path); repeatable",
    )
    parser.add_argument("--data-dir", help="folder of training image folders users may name")
    parser.add_argument("--configs-dir", default="configs", help="preset training configs")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 shares the UI on the network)",
    )
    parser.add_argument("--port", type=_port, default=7860, help="TCP port (default: %(default)s)")
    parser.add_argument(
        "--auth",
        metavar="USER:PASSWORD",
        help="require this login; every local user can read it in `ps`, so prefer "
        f"--auth-file or the {AUTH_ENV}=user:password environment variable",
    )
    parser.add_argument(
        "--auth-file",
        metavar="FILE",
        help="require a login from FILE: one user:password per line (several users allowed; "
        "blank lines and # comments ignored)",
    )


def _port(text: str) -> int:
    """argparse type: a TCP port number (argparse turns the ValueError into a usage line)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def folders_from_args(args: argparse.Namespace) -> Folders:
    from sdlora.ui.folders import Folders

    adapters = Path(args.adapters_dir)
    try:
        adapters.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SdloraError(f"--adapters-dir {adapters}: {error.strerror or error}") from None
    outputs = _outputs_folder(Path(args.outputs_dir))
    optional = {}
    for key in ("models_dir", "data_dir", "embeddings_dir"):
        value = getattr(args, key)
        if value is not None and not Path(value).is_dir():
            raise SdloraError(f"--{key.replace('_', '-')} {value} is not a folder")
        optional[key.removesuffix("_dir")] = Path(value) if value else None
    return Folders(
        adapters=adapters,
        configs=Path(args.configs_dir),
        outputs=outputs,
        default_base=args.base,
        allowed_bases=tuple(args.allow_base),
        **optional,
    )


def _outputs_folder(folder: Path) -> Path:
    """The outputs folder, created. Gradio hands out files of the working folder and the temp
    folder through its cache (unguessable names) without serving the folder itself, which
    keeps each user's pictures to that user; elsewhere it would need the folder served."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SdloraError(f"--outputs-dir {folder}: {error.strerror or error}") from None
    resolved = folder.resolve()
    roots = (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise SdloraError(
            f"--outputs-dir {folder} must be inside the working folder or {roots[1]}"
        )
    return folder


def parse_auth(text: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """Parse "user:password" (the password may hold colons); errors never show the password."""
    if text is None:
        return None
    user, colon, password = text.partition(":")
    user = user.strip()  # Gradio strips the name typed at the login, so a stored one must match
    if not colon or not user or not password:
        raise SdloraError(f"{source} must look like user:password")
    return user, password


def read_auth_file(path: Path) -> Credentials:
    """The logins of an --auth-file; a bad line is named by its number, never by its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SdloraError(f"--auth-file {path} is not UTF-8 text") from None
    except OSError as error:
        raise SdloraError(f"--auth-file {path}: {error.strerror or error}") from None
    logins = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            logins.append(parse_auth(line, f"--auth-file {path} line {number}"))
    if not logins:
        raise SdloraError(f"--auth-file {path} has no user:password line")
    return logins


def credentials(args: argparse.Namespace, environ=os.environ) -> Credentials:
    """Every login allowed: --auth, the lines of --auth-file and $SDLORA_AUTH, together."""
    logins = [parse_auth(args.auth)] if args.auth is not None else []
    if args.auth_file is not None:
        logins += read_auth_file(Path(args.auth_file))
    if environ.get(AUTH_ENV):
        logins.append(parse_auth(environ[AUTH_ENV], AUTH_ENV))
    users = [user for user, _ in logins]
    repeated = sorted({user for user in users if users.count(user) > 1})
    if repeated:  # Gradio would keep one of the passwords and silently drop the other
        raise SdloraError(f"user {repeated[0]!r} is given more than one password")
    return logins


def build_app(folders: Folders, studio: Studio, trainer: Trainer):
    """The Gradio Blocks over one studio and one trainer (shared by every browser)."""
    import gradio as gr

    from sdlora.ui.generate_tab import generate_tab
    from sdlora.ui.history_tab import history_tab
    from sdlora.ui.train_tab import train_tab

    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"# {TITLE}\nMix LoRA adapters with a slider each, or train a new one.")
        # Only listed bases: a typed value would let any user make the server fetch and run
        # any repository.
        base = gr.Dropdown(
            folders.base_choices(),
            value=folders.default_base,
            allow_custom_value=False,
            label="Base model",
            elem_id="base",
            info="the operator offers these (--base, --allow-base, --models-dir)",
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                generate = generate_tab(app, folders, studio, base)
            with gr.Tab("History", id="history") as history:
                show_history, history_outputs = history_tab(studio, generate, tabs)
            history.select(show_history, None, history_outputs)
            with gr.Tab("Train", id="train"):
                train_tab(folders, trainer, base, generate.picker)
        picker = generate.picker
        app.load(picker.refresh, [base, *picker.inputs], picker.outputs)
    app.queue(default_concurrency_limit=CONCURRENCY)
    return app


def launch(
    app,
    host: str,
    port: int,
    auth: tuple[str, str] | Credentials | None = None,
    block: bool = True,
):
    """Serve `app`; block=False returns at once (tests). No folder is served as such: images
    reach browsers through Gradio's cache, only as the answers to their own requests."""
    from sdlora.ui.generate_tab import ENTER_LEAVES_WEIGHT_BOXES
    from sdlora.ui.training import MAX_UPLOAD_BYTES

    return app.launch(
        head=ENTER_LEAVES_WEIGHT_BOXES,
        server_name=host,
        server_port=port,
        auth=auth or None,  # an empty list would be a login nobody passes
        max_file_size=MAX_UPLOAD_BYTES,
        prevent_thread_lock=not block,
        quiet=not block,
        footer_links=[],
    )


def ui_command(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401 - the [ui] extra; checked first for a one-line answer
    except ModuleNotFoundError:
        raise SdloraError('the web UI needs Gradio: pip install -e ".[ui]"') from None
    from sdlora.ui.studio import Studio
    from sdlora.ui.training import Trainer

    auth = credentials(args)
    if args.host not in LOCAL_HOSTS and not auth:
        print(
            f"sdlora ui: warning: listening on {args.host} without a login: anyone who can "
            "reach this machine can generate and train",
            file=sys.stderr,
        )
    folders = folders_from_args(args)
    studio = Studio(folders)
    launch(build_app(folders, studio, Trainer(folders)), args.host, args.port, auth)
