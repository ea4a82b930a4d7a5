"""AUTOMATIC1111's prompt syntax, read as text: attention weights, BREAK, `<lora:...>` tags.

    (word)        weight x 1.1          [word]   weight / 1.1
    (word:1.2)    weight x 1.2          \\( \\) \\[ \\]   literal brackets, \\\\ a backslash
    ((a) [b])     brackets nest; their factors multiply
    a BREAK b     `b` starts a new 75-token chunk
    <lora:name:w> <lora:name:te:unet> <lora:name:te=0.5:unet=1> <lyco:...>   adapter tags
    <lora:name:w@0.5-1> <lora:name:0.2~1>   weights over the steps (sdlora.mix.schedules)

`parse_prompt_attention` turns text into BREAK-separated sections of (text, weight) fragments;
`sdlora.render.prompt_embeds` turns those into embeddings. `check_prompt_syntax` refuses, before
any model loads, what A1111 would draw differently from sdlora, or not at all.

Why our own parser rather than compel, the weighting library that diffusers documents: compel
reads its own syntax (`word++`, `(words)1.2`, `.and()`), not `(word:1.2)`, and it weights
differently: it scales each token's distance from the empty prompt's embedding and turns
weights below 1 into a blend with a prompt where the words are masked out, where A1111
multiplies the token embeddings and restores their mean. Translating the syntax would still draw
other pictures than A1111 for the same prompt. So this module follows A1111's own
`parse_prompt_attention` (modules/prompt_parser.py): the same tokens, the same bracket stacks, the
same tolerance of unbalanced brackets (an unclosed `(` weights the rest of the prompt, a stray `)`
is text). One deliberate difference: BREAK inside brackets still starts a new chunk (A1111 then
encodes the word "BREAK" at a negative weight, which no one means).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from sdlora.errors import SdloraError
from sdlora.mix.schedules import WeightSchedule, parse_weight_text
from sdlora.numbers import finite_number, is_number

ROUND_FACTOR = 1.1  # (word)
SQUARE_FACTOR = 1 / 1.1  # [word]

# One token of the attention syntax, in A1111's order of preference.
_ATTENTION_TOKEN = re.compile(
    r"""
      (?P<escaped>\\[()\[\]\\])                            # \( \) \[ \] \\
    | (?P<backslash>\\)                                    # any other backslash: dropped
    | (?P<weight_close>:\s*(?P<weight>[+-]?[.\d]+)\s*\))   # ":1.2)" closes a weighted group
    | (?P<open>[(\[])
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

# A1111's extra-network tag: <kind:arguments>; the arguments are split on ":".
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
ADAPTER_TAG_KINDS = ("lora", "lyco")  # A1111 reads LyCORIS files under both names
_AND = re.compile(r"\bAND\b")
# Innermost (...) group whose last colon is followed by something, and innermost [...] group.
_WEIGHTED_GROUP = re.compile(r"\(([^()]*):([^():]*)\)")
_SQUARE_GROUP = re.compile(r"\[([^\[\]]*)\]")
_A1111_NUMBER = re.compile(r"\s*[+-]?[.\d]+\s*")
_SCHEDULE = re.compile(r":\s*[+-]?[.\d]+\s*$")

Fragment = tuple[str, float]  # text and its attention weight


class LoraTag(NamedTuple):
    """What an adapter tag asks of one adapter.

    weight: the adapter's weight. components: None when the tag weights the whole adapter alike,
    else the weight of each component ("unet", "text_encoder", "text_encoder_2", as in
    `sdlora.adapters.core.COMPONENTS`) with `weight` 1.0, ready for
    `Mixer.set_weights({name: weight})` plus `Mixer.set_component_weights(name, components)`.
    schedule: how the UNet's weight changes over the steps (`<lora:name:1@0.5-1>`), or None.
    """

    weight: float
    components: dict[str, float] | None
    schedule: WeightSchedule | None = None


def parse_prompt_attention(text: str) -> list[list[Fragment]]:
    """Text -> BREAK-separated sections, each a list of (text, weight) fragments.

    Adjacent fragments of equal weight are merged, as A1111 does (it tokenizes each fragment on
    its own, so "(un)(necessary)" is one word at 1.1). A prompt without syntax is one section
    holding one fragment of weight 1.0; an empty prompt is [[("", 1.0)]].
    """
    pieces: list[list] = []  # [text, weight], or None where a BREAK splits sections
    round_starts: list[int] = []
    square_starts: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    for token in _ATTENTION_TOKEN.finditer(text):
        if token["escaped"]:
            pieces.append([token["escaped"][1], 1.0])
        elif token["backslash"]:
            continue
        elif token["open"] == "(":
            round_starts.append(len(pieces))
        elif token["open"] == "[":
            square_starts.append(len(pieces))
        elif token["weight_close"] and round_starts:
            multiply_from(round_starts.pop(), _weight(token["weight"], token[0]))
        elif token["close"] == ")" and round_starts:
            multiply_from(round_starts.pop(), ROUND_FACTOR)
        elif token["close"] == "]" and square_starts:
            multiply_from(square_starts.pop(), SQUARE_FACTOR)
        else:  # text, or a bracket that closes nothing
            for index, part in enumerate(_BREAK.split(token[0])):
                if index:
                    pieces.append(None)
                pieces.append([part, 1.0])
    for start in round_starts:  # unclosed brackets weight the rest of the prompt
        multiply_from(start, ROUND_FACTOR)
    for start in square_starts:
        multiply_from(start, SQUARE_FACTOR)

    sections: list[list[Fragment]] = [[]]
    for piece in pieces:
        if piece is None:
            sections.append([])
        elif sections[-1] and sections[-1][-1][1] == piece[1]:
            sections[-1][-1] = (sections[-1][-1][0] + piece[0], piece[1])
        else:
            sections[-1].append((piece[0], piece[1]))
    return [section or [("", 1.0)] for section in sections]


def _weight(number: str, where: str) -> float:
    try:
        return float(number)
    except ValueError:  # "1.2.3" or "." pass A1111's pattern; A1111 fails on them
        raise SdloraError(f"weight {number.strip()!r} in {where!r} is not a number") from None


def strip_extra_network_tags(text: str) -> str:
    """The text without its `<kind:...>` tags, whitespace runs collapsed to one space."""
    return " ".join(EXTRA_NETWORK_TAG.sub(" ", text).split())


def parse_lora_tag(tag: str, kind: str, arguments: str, where: str) -> tuple[str, LoraTag]:
    """`<lora:name[:te[:unet]]>` or named `te=`/`unet=` -> (adapter name, LoraTag).

    Mirrors A1111's extra_networks_lora: the first number weights the text encoder(s), the
    second the UNet; without a second, the UNet takes the text encoder's (kohya's `<lora:name:w>`
    is therefore both). A named value replaces the positional one.
    """
    positional, named = [], {}
    for item in arguments.split(":"):
        key, equals, value = item.partition("=")
        if equals:
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    unknown = sorted(set(named) - {"te", "unet"})
    if not name or len(positional) > 3 or unknown:
        problem = f"setting {unknown[0]!r} is not supported; " if unknown else ""
        raise SdloraError(
            f"{where}: {tag!r}: {problem}expected <{kind}:name>, <{kind}:name:weight>, "
            f"<{kind}:name:te_weight:unet_weight>, <{kind}:name:te=W:unet=W> or a schedule "
            f"<{kind}:name:W@START-END> / <{kind}:name:W~W2>"
        )

    def number(value: str, what: str) -> float:
        result = finite_number(value)
        if result is None:
            raise SdloraError(f"{where}: in {tag!r}, the {what} {value.strip()!r} is not a number")
        return result

    if len(positional) == 2 and not named and ("@" in positional[1] or "~" in positional[1]):
        # one weight that is not a plain number: a schedule, W@S-E or W~W2 (mix.schedules)
        weight, schedule = parse_weight_text(positional[1], f"{where}: in {tag!r}")
        return name, LoraTag(weight, None, schedule)
    text_encoder = number(positional[1], "weight") if len(positional) > 1 else 1.0
    text_encoder = number(named["te"], "te weight") if "te" in named else text_encoder
    unet = number(positional[2], "unet weight") if len(positional) > 2 else text_encoder
    unet = number(named["unet"], "unet weight") if "unet" in named else unet
    if unet == text_encoder:
        return name, LoraTag(unet, None)
    components = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder}
    return name, LoraTag(1.0, components)


def check_prompt_syntax(text: str, where: str) -> None:
    """Refuse what A1111 would draw differently from sdlora, or not at all; one line naming it.

    - a tag other than <lora:...>/<lyco:...> (<hypernet:...> and extension tags), or a malformed
      adapter tag;
    - a weight that is not a plain decimal number, `(word:abc)`, `(word:1,2)`, `(word:1e3)`:
      A1111 reads those as text at weight 1.1, which no one means;
    - prompt editing `[a:b:0.5]` and alternation `[a|b]`, which change the prompt during
      sampling, and `AND` (composable diffusion): A1111 features sdlora does not have.
    """
    for match in EXTRA_NETWORK_TAG.finditer(text):
        kind = match[1]
        if kind in ADAPTER_TAG_KINDS:
            parse_lora_tag(match[0], kind, match[2], where)
        else:
            raise SdloraError(
                f"{where}: tag {match[0]!r} is not supported; sdlora reads <lora:...> and <lyco:...>"
            )
    # blank out escaped characters and tags, keeping positions, so they match nothing below
    plain = EXTRA_NETWORK_TAG.sub(lambda match: " " * len(match[0]), text)
    plain = re.sub(r"\\.", "  ", plain)
    for match in _SQUARE_GROUP.finditer(plain):
        if "|" in match[1]:
            raise SdloraError(f"{where}: alternation {text[match.start():match.end()]!r} is not supported")
        if _SCHEDULE.search(match[1]):
            raise SdloraError(
                f"{where}: prompt editing {text[match.start():match.end()]!r} is not supported; "
                "for a weight write (word:0.8)"
            )
    for match in _WEIGHTED_GROUP.finditer(plain):
        weight = text[match.start(2):match.end(2)]
        if not (_A1111_NUMBER.fullmatch(weight) and is_number(weight)):
            raise SdloraError(
                f"{where}: weight {weight.strip()!r} in {text[match.start():match.end()]!r} is not "
                "a number (A1111 reads only plain decimals like 1.2)"
            )
    if _AND.search(plain):
        raise SdloraError(f"{where}: AND (composable diffusion) is not supported")
