"""Per-component and per-block weight specs, as typed on the command line and in the web UI.

A spec multiplies one adapter's weight in parts of the model (every part not named keeps 1):

    te=0.5,unet=1                 components: text encoder(s), UNet
    down=0,mid=1,up=0.5           UNet blocks; "down.1", "up.2" name one diffusers block,
                                  "down.1.0" one layer of it (the most specific key wins)
    1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
                                  an A1111 "LoRA Block Weight" vector: 17 (SD1 LoRA) or 26
                                  (SD1 LyCORIS) values, 12 or 20 for SDXL; the first (BASE) is
                                  the text encoders' multiplier, then IN.., M00, OUT.. blocks

`parse_block_spec` turns either form into the Mixer's keys: {"text_encoder": w, "unet": w}
for `Mixer.set_component_weights` and {"down.0.1": w, "mid": w, ...} for
`Mixer.set_block_weights`; `format_block_spec` writes them back as one spec, which is what the
PNG's infotext and the web UI's "render command" carry.

LDM block numbering (A1111's IN/OUT) -> diffusers: input block k >= 1 is layer (k-1) % 3 of
down block (k-1) // 3 (layer 2 being the downsampler); IN00 is conv_in; output block k is layer
k % 3 of up block k // 3 (the upsampler rides with layer 2, as in the LDM layout).
"""

from __future__ import annotations

from sdlora.errors import SdloraError
from sdlora.numbers import finite_number

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
UNET_BLOCKS = ("down", "mid", "up")

# A1111 LoRA Block Weight vectors: which LDM blocks follow BASE, by family and length.
_LBW_BLOCKS = {
    ("sd1", 17): ["IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
                  *[f"OUT{i:02d}" for i in range(3, 12)]],
    ("sd1", 26): [*[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]],
    ("sdxl", 12): ["IN04", "IN05", "IN07", "IN08", "M00", *[f"OUT{i:02d}" for i in range(6)]],
    ("sdxl", 20): [*[f"IN{i:02d}" for i in range(9)], "M00", *[f"OUT{i:02d}" for i in range(9)]],
}
_LBW_BLOCKS[("sd2", 17)] = _LBW_BLOCKS[("sd1", 17)]
_LBW_BLOCKS[("sd2", 26)] = _LBW_BLOCKS[("sd1", 26)]


def parse_block_spec(
    spec: str, family: str | None, where: str
) -> tuple[dict[str, float], dict[str, float]]:
    """"te=0.5,down=0" or an LBW vector -> (component weights, block weights); see above.

    `family` is needed only for LBW vectors (None: accept any family's lengths, SD1 first).
    """
    parts = [part.strip() for part in spec.split(",") if part.strip()]
    if not parts:
        raise SdloraError(f"{where}: empty block-weight spec")
    if all("=" not in part for part in parts):
        return _from_vector([_number(part, where) for part in parts], family, where)
    components: dict[str, float] = {}
    blocks: dict[str, float] = {}
    for part in parts:
        key, equals, value = part.partition("=")
        key = key.strip().lower()
        if not equals:
            raise SdloraError(f"{where}: {part!r} is not KEY=WEIGHT (or give only numbers)")
        weight = _number(value, where)
        if key in ("te", "text_encoder"):
            components.update(dict.fromkeys(TEXT_ENCODERS, weight))
        elif key in ("te1", "te2"):
            components[TEXT_ENCODERS[int(key[-1]) - 1]] = weight
        elif key == "unet":
            components["unet"] = weight
        else:
            check_block_key(key, where)
            blocks[key] = weight
    return components, blocks


def check_block_key(key: str, where: str) -> None:
    """down, mid, up, down.N, up.N, down.N.M, up.N.M or conv_in; else a one-line error."""
    kind, _, rest = key.partition(".")
    indices = rest.split(".") if rest else []
    valid = (
        key == "conv_in"
        or (kind == "mid" and not indices)
        or (kind in ("down", "up") and len(indices) <= 2 and all(i.isdigit() for i in indices))
    )
    if not valid:
        raise SdloraError(
            f"{where}: unknown block {key!r}; expected te, unet, down, mid, up, down.N, up.N, "
            "down.N.M, up.N.M or an A1111 block-weight vector"
        )


def format_block_spec(components: dict[str, float], blocks: dict[str, float]) -> str:
    """The spec that `parse_block_spec` reads back as the same weights ("" when all are 1)."""
    parts = []
    te = [components.get(name) for name in TEXT_ENCODERS]
    if te[0] is not None and te[0] == te[1]:
        parts.append(f"te={te[0]:g}")
    else:
        parts += [f"te{i + 1}={w:g}" for i, w in enumerate(te) if w is not None]
    if "unet" in components:
        parts.append(f"unet={components['unet']:g}")
    parts += [f"{key}={weight:g}" for key, weight in blocks.items()]
    return ",".join(parts)


def _from_vector(values: list[float], family: str | None, where: str):
    families = [family] if family else ["sd1", "sdxl"]
    for name in families:
        names = _LBW_BLOCKS.get((name, len(values)))
        if names is not None:
            break
    else:
        lengths = sorted({n for (f, n) in _LBW_BLOCKS if f in families})
        raise SdloraError(
            f"{where}: a block-weight vector for {family or 'this base'} has "
            f"{' or '.join(map(str, lengths))} values, not {len(values)}"
        )
    components = dict.fromkeys(TEXT_ENCODERS, values[0])
    blocks = {_ldm_block_key(block): weight for block, weight in zip(names, values[1:])}
    return components, blocks


def _ldm_block_key(block: str) -> str:
    """A1111's IN04 / M00 / OUT05 -> the Mixer's "down.1.0" / "mid" / "up.1.2"."""
    if block == "M00":
        return "mid"
    number = int(block[-2:])
    if block.startswith("IN"):
        return "conv_in" if number == 0 else f"down.{(number - 1) // 3}.{(number - 1) % 3}"
    return f"up.{number // 3}.{number % 3}"


def _number(text: str, where: str) -> float:
    value = finite_number(text)
    if value is None:
        raise SdloraError(f"{where}: weight {text.strip()!r} is not a finite number")
    return value
