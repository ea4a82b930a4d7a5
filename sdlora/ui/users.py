"""Who a request comes from, and how a user's mistakes reach the browser.

With a login (Gradio auth), `request.username` names the user and every folder the UI writes
is that user's own (sdlora.ui.folders); without one there is a single user, None.
"""

from __future__ import annotations

import gradio as gr

from sdlora.errors import SdloraError


def username(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) or None


def user_errors(function, *args, **kwargs):
    """Call `function`; a mistake the user can fix is a one-line toast, not a traceback."""
    try:
        return function(*args, **kwargs)
    except SdloraError as error:
        raise gr.Error(str(error)) from None
