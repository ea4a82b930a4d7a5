"""Run bad inputs and faults against the real CLI and count which end cleanly.

    python bench/probe_bad_inputs.py [--jobs 2] [--only CATEGORY]

Each case runs `python -m sdlora ...` in a subprocess (HF_HUB_OFFLINE=1, base `demo`, tiny
files in a temporary folder). A case that should fail is clean when it exits non-zero with one
line on stderr (warnings and argparse's usage line aside) and no traceback; a case whose right
answer is success (a corrupt image is skipped and reported, odd metadata is shown as unreadable)
must exit 0 and meet its own check. Prints a markdown table (category | tried | clean |
defects), then each defect with its exit code and last stderr line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 45  # a case still running then is a hang (e.g. a 1000000-pixel-high render)
# stderr lines that are not the error: Python/library warnings and their source lines,
# argparse's usage line, and library notices.
_NOISE = re.compile(r"warn|^\s|^usage:|^\[transformers\]|^$|\d+%\|", re.IGNORECASE)
KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@dataclass
class Case:
    category: str
    name: str
    args: list[str]
    succeed: bool = False  # the right answer is exit 0 (and `check`)
    check: Callable[[subprocess.CompletedProcess], bool] | None = None
    stdout_closed: bool = False  # stdout is a pipe whose reader has gone (`| head`)


@dataclass
class Outcome:
    case: Case
    clean: bool
    code: int | None
    last_line: str
    seconds: float


def run_case(case: Case, cwd: Path) -> Outcome:
    """Run one case in its own folder `cwd`, so that no case re-uses another's output."""
    cwd.mkdir()
    started = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sdlora", *case.args]
    stdout = subprocess.PIPE
    if case.stdout_closed:
        read_end, stdout = os.pipe()
        os.close(read_end)
    try:
        result = subprocess.run(
            command, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.PIPE,
            text=True, timeout=TIMEOUT_S, errors="replace",
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome(case, False, None, f"timed out after {TIMEOUT_S} s", TIMEOUT_S)
    finally:
        if case.stdout_closed:
            os.close(stdout)
    lines = [line for line in result.stderr.splitlines() if not _NOISE.search(line)]
    last = (lines or result.stderr.strip().splitlines() or [""])[-1][:300]
    if case.succeed:
        clean = result.returncode == 0 or (case.stdout_closed and result.returncode == 1)
        clean = clean and "Traceback" not in result.stderr
        clean = clean and (case.check is None or case.check(result))
    else:
        clean = result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr
    return Outcome(case, clean, result.returncode, last, time.monotonic() - started)


# ---- fixtures: tiny files the cases point at --------------------------------------------


def lora_tensors(rank: int = 2, width: int = 32) -> dict[str, torch.Tensor]:
    return {
        f"{KOHYA}.lora_down.weight": torch.full((rank, width), 0.01),
        f"{KOHYA}.lora_up.weight": torch.full((width, rank), 0.01),
        f"{KOHYA}.alpha": torch.tensor(float(rank)),
    }


def demo_adapter_tensors() -> dict[str, torch.Tensor]:
    """One LoRA layer that fits the demo base (its first attention's to_q)."""
    from diffusers import UNet2DConditionModel

    from sdlora.base.demo_base import demo_base_path

    unet = UNet2DConditionModel.from_pretrained(demo_base_path() / "unet")
    module = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    return lora_tensors(width=module.in_features)


def write_adapter(path: Path, tensors: dict, metadata: dict | None = None) -> str:
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def make_files(work: Path) -> dict[str, str]:
    f: dict[str, str] = {}
    good = demo_adapter_tensors()
    f["good"] = write_adapter(work / "good.safetensors", good, {"sdlora.family": "sd1"})
    bad = {
        "nan": {**good, f"{KOHYA}.lora_up.weight": good[f"{KOHYA}.lora_up.weight"] * float("nan")},
        "inf": {**good, f"{KOHYA}.lora_down.weight": good[f"{KOHYA}.lora_down.weight"] / 0},
        "int32": {k: v.to(torch.int32) for k, v in good.items()},
        "bool": {**good, f"{KOHYA}.lora_up.weight": good[f"{KOHYA}.lora_up.weight"].bool()},
        "alpha2": {**good, f"{KOHYA}.alpha": torch.tensor([1.0, 2.0])},
        "rank0": lora_tensors(rank=0),
        "rank-mismatch": {**good, f"{KOHYA}.lora_up.weight": torch.zeros(32, 3)},
        "one-dim": {**good, f"{KOHYA}.lora_down.weight": torch.zeros(64)},
        "five-dim": {**good, f"{KOHYA}.lora_down.weight": torch.zeros(2, 32, 1, 1, 1)},
        "no-lora-keys": {"conv_in.weight": torch.zeros(4, 4)},
        "only-alpha": {f"{KOHYA}.alpha": torch.tensor(1.0)},
        "missing-up": {k: v for k, v in good.items() if "lora_up" not in k},
    }
    for name, tensors in bad.items():
        f[name] = write_adapter(work / f"{name}.safetensors", tensors)
    peft = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 32),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(32, 2),
    }  # fmt: skip
    for name, meta in {
        "folded-bad-json": {"sdlora.folded_alpha": "{"},
        "folded-zero": {"sdlora.folded_alpha": "0"},
        "folded-list": {"sdlora.folded_alpha": "[1]"},
        "peft-bad": {"lora_adapter_metadata": '{"unet.lora_alpha": "x"}'},
        "peft-regex": {"lora_adapter_metadata": '{"unet.lora_alpha": 1, "unet.alpha_pattern": {"(": 1}}'},
    }.items():  # fmt: skip
        f[name] = write_adapter(work / f"{name}.safetensors", peft, meta)
    for name, meta in {
        "tags-not-int": {"ss_tag_frequency": '{"d": {"a": "many"}}'},
        "words-not-list": {"sdlora.trigger_words": "5"},
        "config-bad": {"sdlora.config": "{"},
        "words-deep": {"sdlora.trigger_words": "[" * 100000},
    }.items():
        f[name] = write_adapter(work / f"{name}.safetensors", good, meta)
    data = Path(f["good"]).read_bytes()
    raw = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "huge-header": (2**62).to_bytes(8, "little") + data[8:],
        "bad-header-json": data[:8] + b"#" + data[9:],
        "text": b"hello world, not an adapter\n",
    }
    for name, content in raw.items():
        (work / f"{name}.safetensors").write_bytes(content)
        f[name] = str(work / f"{name}.safetensors")
    (work / "adapter.ckpt").write_bytes(b"pickle")
    f["ckpt"] = str(work / "adapter.ckpt")
    (work / "a-folder.safetensors").mkdir()
    f["folder"] = str(work / "a-folder.safetensors")
    (work / "plain-file").write_text("x")
    f["under-file"] = str(work / "plain-file" / "out")
    f["missing"] = str(work / "missing.safetensors")
    f["unwritable"] = "/proc/sdlora-probe/out"  # no one, root included, may create this
    return f


def make_training(work: Path) -> dict[str, str]:
    """Image folders and a valid config to vary; returns paths by name."""
    from PIL import Image

    images = work / "images"
    images.mkdir()
    for index in range(2):
        Image.new("RGB", (64, 64), (200, 50 * index, 50)).save(images / f"{index}.png")
    with_corrupt = work / "images-corrupt"
    with_corrupt.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 50)).save(with_corrupt / "good.png")
    (with_corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    empty = work / "no-images"
    empty.mkdir()
    return {"images": str(images), "with-corrupt": str(with_corrupt), "empty": str(empty)}


def config(work: Path, name: str, text: str | bytes) -> str:
    path = work / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def good_config(images: str, out: str, **overrides: dict) -> dict:
    data = {
        "base": "demo",
        "data": {"instance_dir": images, "instance_prompt": "a sks picture", "resolution": 64,
                 "bucket": False},
        "lora": {"rank": 2, "alpha": 2},
        "train": {"steps": 1, "batch_size": 1, "learning_rate": 1e-3, "seed": 0},
        "checkpoint": {"every": 0},
        "output": {"dir": out, "name": "probe", "tensorboard": False},
    }  # fmt: skip
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


# ---- the cases ----------------------------------------------------------------------------


def cases(work: Path) -> list[Case]:
    f = make_files(work)
    t = make_training(work)
    out = "out"  # relative: each case runs in its own folder
    all_cases: list[Case] = []

    def add(category: str, name: str, *args: str, **kwargs) -> None:
        all_cases.append(Case(category, name, list(args), **kwargs))

    def unreadable(result: subprocess.CompletedProcess) -> bool:
        return "(unreadable)" in result.stdout

    # adapter files: info and convert read without a base; a few through render and mix
    for name in ["nan", "inf", "int32", "bool", "alpha2", "rank0", "rank-mismatch", "one-dim",
                 "five-dim", "no-lora-keys", "only-alpha", "missing-up", "folded-bad-json",
                 "folded-zero", "folded-list", "peft-bad", "peft-regex", "truncated", "empty",
                 "huge-header", "bad-header-json", "text", "ckpt", "folder", "missing"]:  # fmt: skip
        add("adapter files", f"info {name}", "info", f[name])
    for name in ["rank0", "nan", "folded-bad-json", "alpha2"]:
        add("adapter files", f"convert {name}", "convert", f[name], "--to", "diffusers",
            "--out", str(work / f"conv-{name}.safetensors"))  # fmt: skip
    for name in ["tags-not-int", "words-not-list", "config-bad", "words-deep"]:
        add("adapter files", f"info {name} (marked)", "info", f[name], succeed=True, check=unreadable)
    add("adapter files", "info | closed pipe", "info", f["good"], succeed=True, stdout_closed=True)
    for name in ["nan", "int32", "rank-mismatch"]:
        add("adapter files", f"render {name}", "render", "--base", "demo", "--lora", f[name],
            "--prompt", "x", "--steps", "1", "--out", out)  # fmt: skip
    add("adapter files", "mix inf", "mix", "--base", "demo", "--lora", f["inf"],
        "--out", str(work / "mixed.safetensors"))  # fmt: skip

    # CLI arguments
    render = ["render", "--base", "demo", "--prompt", "x", "--steps", "1", "--out", out]
    for flags in (["--cfg", "nan"], ["--cfg", "inf"], ["--steps", "-1"], ["--steps", "0"],
                  ["--width", "-64"], ["--width", "7"], ["--height", "1000000"],
                  ["--seed", "-2"], ["--seed", str(2**70)], ["--batch", "0"], ["--batch", "-3"],
                  ["--scheduler", "nope"], ["--lora", f["missing"]], ["--lora", f"{f['good']}:nan"],
                  ["--lora", f"{f['good']}:abc"], ["--lora", f["folder"]], ["--lora", f["ckpt"]],
                  ["--adapters-dir", f["missing"]], ["--grid", "nonsense"],
                  ["--grid", "good=a,b"], ["--steps", "abc"]):  # fmt: skip
        add("CLI arguments", "render " + " ".join(flags).replace(str(work), "…"), *render, *flags)
    add("CLI arguments", "render --seed -1 (random, recorded)", *render, "--seed", "-1",
        succeed=True, check=lambda result: "random seed" in result.stderr)
    add("CLI arguments", "render --base missing folder", "render", "--base", str(work / "nobase"),
        "--prompt", "x", "--out", out)  # fmt: skip
    add("CLI arguments", "render --base a text file", "render", "--base", str(work / "plain-file"),
        "--prompt", "x", "--out", out)  # fmt: skip
    add("CLI arguments", "render --prompts missing", "render", "--base", "demo",
        "--prompts", f["missing"], "--out", out)  # fmt: skip
    add("CLI arguments", "render --prompts folder", "render", "--base", "demo",
        "--prompts", str(work / "a-folder.safetensors"), "--out", out)  # fmt: skip
    mix = ["mix", "--base", "demo"]
    add("CLI arguments", "mix --lora missing", *mix, "--lora", f["missing"], "--out", f"{out}.st")
    add("CLI arguments", "mix --rank 0", *mix, "--lora", f["good"], "--out", f"{out}.st", "--rank", "0")
    add("CLI arguments", "mix --rank -1", *mix, "--lora", f["good"], "--out", f"{out}.st", "--rank", "-1")
    add("CLI arguments", "mix weight inf", *mix, "--lora", f"{f['good']}:inf", "--out", f"{out}.st")
    add("CLI arguments", "mix --out folder", *mix, "--lora", f["good"], "--out", f["folder"])
    add("CLI arguments", "convert --out folder", "convert", f["good"], "--to", "kohya",
        "--out", f["folder"])  # fmt: skip
    add("CLI arguments", "convert --to bad", "convert", f["good"], "--to", "ckpt", "--out", "x")
    add("CLI arguments", "info folder", "info", str(work))
    add("CLI arguments", "train missing config", "train", f["missing"])
    add("CLI arguments", "train config is a folder", "train", str(work))
    add("CLI arguments", "train --resume missing", "train",
        config(work, "ok", json.dumps(good_config(t["images"], out))), "--resume", f["missing"])  # fmt: skip
    add("CLI arguments", "train --set without =", "train",
        config(work, "ok2", json.dumps(good_config(t["images"], out))), "--set", "train.steps")  # fmt: skip
    add("CLI arguments", "ui --auth-file missing", "ui", "--auth-file", f["missing"])
    add("CLI arguments", "ui --port -1", "ui", "--port", "-1", "--auth", "a:b")

    # training configs (each fails before a model would train)
    base = good_config(t["images"], out)
    variants = {
        "bad YAML": "base: demo\ndata: [unclosed\n",
        "empty file": "",
        "top-level list": "- a\n- b\n",
        "unknown key": json.dumps({**base, "trian": {}}),
        "unknown nested key": json.dumps(good_config(t["images"], out, lora={"rnak": 2})),
        "steps not a number": json.dumps(good_config(t["images"], out, train={"steps": "many"})),
        "steps negative": json.dumps(good_config(t["images"], out, train={"steps": -5})),
        "steps float": json.dumps(good_config(t["images"], out, train={"steps": 1.5})),
        "lr .nan": json.dumps(base).replace('"learning_rate": 0.001', '"learning_rate": .nan'),
        "lr .inf (YAML)": json.dumps(base).replace('"learning_rate": 0.001', '"learning_rate": .inf'),
        "lr negative": json.dumps(good_config(t["images"], out, train={"learning_rate": -1})),
        "rank 0": json.dumps(good_config(t["images"], out, lora={"rank": 0})),
        "alpha nan": json.dumps(base).replace('"alpha": 2', '"alpha": .nan'),
        "resolution 0": json.dumps(good_config(t["images"], out, data={"resolution": 0})),
        "resolution string": json.dumps(good_config(t["images"], out, data={"resolution": "big"})),
        "batch 0": json.dumps(good_config(t["images"], out, train={"batch_size": 0})),
        "seed 1e30": json.dumps(good_config(t["images"], out, train={"seed": 1e30})),
        "missing instance_dir": json.dumps(good_config(str(work / "nope"), out)),
        "instance_dir is a file": json.dumps(good_config(str(work / "plain-file"), out)),
        "instance_dir without images": json.dumps(good_config(t["empty"], out)),
        "data not a mapping": json.dumps({**base, "data": 5}),
        "base missing": json.dumps({**base, "base": str(work / "no-base")}),
        "format bad": json.dumps(good_config(t["images"], out, output={"format": "ckpt"})),
        "output.dir under a file": json.dumps(good_config(t["images"], f["under-file"])),
        "output.dir unwritable": json.dumps(good_config(t["images"], f["unwritable"])),
    }
    for index, (name, text) in enumerate(variants.items()):
        add("training configs", name, "train", config(work, f"cfg{index}", text))
    add("training configs", "non-UTF-8 file", "train",
        config(work, "latin1", "base: demo\ndata:\n  instance_prompt: caf\xe9\n".encode("latin-1")))  # fmt: skip
    add("training configs", "--set unknown key", "train", config(work, "ok3", json.dumps(base)),
        "--set", "train.stpes=3")  # fmt: skip
    add("training configs", "--set steps=nan", "train", config(work, "ok4", json.dumps(base)),
        "--set", "train.steps=nan")  # fmt: skip

    def corrupt_reported(result: subprocess.CompletedProcess) -> bool:
        return "broken.png" in result.stdout + result.stderr

    add("training configs", "corrupt image is skipped and reported", "train",
        config(work, "corrupt", json.dumps(good_config(t["with-corrupt"], str(work / "t-out")))),
        succeed=True, check=corrupt_reported)  # fmt: skip

    # render inputs: prompt files
    prompt_files = {
        "row not JSON.jsonl": '{"prompt": "a"}\n{not json}\n',
        "row not an object.jsonl": '["a", "b"]\n',
        "row without prompt.jsonl": '{"seed": 1}\n',
        "seed past 2^64.jsonl": json.dumps({"prompt": "a", "seed": 2**70}) + "\n",
        "seed 1e30.jsonl": '{"prompt": "a", "seed": 1e30}\n',
        "seed string.jsonl": '{"prompt": "a", "seed": "x"}\n',
        "seed negative.jsonl": '{"prompt": "a", "seed": -5}\n',
        "steps nan.jsonl": '{"prompt": "a", "steps": NaN}\n',
        "weight nan tag.txt": "a <lora:good:nan>\n",
        "unknown lora tag.txt": "a <lora:nope:1>\n",
        "unknown key.jsonl": '{"prompt": "a", "stpes": 3}\n',
        "empty.txt": "",
        "csv without prompt column.csv": "seed,steps\n1,2\n",
        "non-UTF-8.txt": b"caf\xe9\n",
    }
    for name, text in prompt_files.items():
        path = work / name.replace(" ", "-")
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        add("render inputs", name, "render", "--base", "demo", "--prompts", str(path),
            "--adapters-dir", str(work), "--steps", "1", "--out", out)  # fmt: skip

    # output paths
    add("output paths", "render --out under a file", *render[:-1], f["under-file"])
    add("output paths", "render --out unwritable", *render[:-1], f["unwritable"])
    add("output paths", "convert --out under a file", "convert", f["good"], "--to", "kohya",
        "--out", f["under-file"] + ".safetensors")  # fmt: skip
    add("output paths", "convert --out unwritable", "convert", f["good"], "--to", "kohya",
        "--out", f["unwritable"] + ".safetensors")  # fmt: skip
    add("output paths", "mix --out under a file", *mix, "--lora", f["good"],
        "--out", f["under-file"] + ".safetensors")  # fmt: skip
    add("output paths", "mix --bake under a file", *mix, "--lora", f["good"], "--bake", f["under-file"])
    add("output paths", "mix --bake unwritable", *mix, "--lora", f["good"], "--bake", f["unwritable"])
    add("output paths", "demo --out under a file", "demo", "--out", f["under-file"])
    add("output paths", "ui --adapters-dir under a file", "ui", "--adapters-dir", f["under-file"])
    return all_cases


def report(outcomes: list[Outcome]) -> str:
    categories = list(dict.fromkeys(outcome.case.category for outcome in outcomes))
    lines = ["| category | tried | clean | defects |", "|---|---|---|---|"]
    for category in categories:
        mine = [outcome for outcome in outcomes if outcome.case.category == category]
        clean = sum(outcome.clean for outcome in mine)
        lines.append(f"| {category} | {len(mine)} | {clean} | {len(mine) - clean} |")
    total_clean = sum(outcome.clean for outcome in outcomes)
    lines.append(f"| **all** | {len(outcomes)} | {total_clean} | {len(outcomes) - total_clean} |")
    defects = [outcome for outcome in outcomes if not outcome.clean]
    if defects:
        lines += ["", "Defects:", ""]
        for outcome in defects:
            lines.append(
                f"- [{outcome.case.category}] {outcome.case.name}: exit {outcome.code}, "
                f"`{outcome.last_line}`"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once")
    parser.add_argument("--only", help="run only this category")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sdlora-probe-") as folder:
        work = Path(folder)
        selected = [case for case in cases(work) if args.only in (None, case.category)]
        with ThreadPoolExecutor(args.jobs) as pool:
            folders = [work / f"case-{index}" for index in range(len(selected))]
            outcomes = list(pool.map(run_case, selected, folders))
    print(report(outcomes))
    slowest = sorted(outcomes, key=lambda outcome: -outcome.seconds)[:5]
    print(f"\n{len(outcomes)} cases in {time.monotonic() - started:.0f} s; slowest: "
          + ", ".join(f"{o.case.name} {o.seconds:.0f} s" for o in slowest))


if __name__ == "__main__":
    main()
