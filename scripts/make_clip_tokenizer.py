"""Write CLIP's vocab.json and merges.txt from the BPE file that OpenAI's CLIP and open_clip ship.

The result, in sdlora/assets/clip_tokenizer, is what transformers' CLIPTokenizer reads; it is
committed so that nothing needs a model hub. Usage: python scripts/make_clip_tokenizer.py BPE.txt.gz
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(code) for code in codes]))


def main(bpe_path: str) -> None:
    with gzip.open(bpe_path) as bpe_file:
        lines = bpe_file.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(__file__).resolve().parent.parent / "sdlora" / "assets" / "clip_tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
