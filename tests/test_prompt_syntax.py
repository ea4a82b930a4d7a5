"""A1111's prompt syntax as text: attention weights, BREAK, adapter tags, refused features."""

from __future__ import annotations

import pytest

from sdlora.errors import SdloraError
from sdlora.render.prompt_syntax import LoraTag, check_prompt_syntax, parse_prompt_attention
from sdlora.render.prompts import parse_lora_tags, prompt_row


@pytest.mark.parametrize(
    "text, sections",
    [
        ("normal text", [[("normal text", 1.0)]]),
        ("", [[("", 1.0)]]),
        ("an (important) word", [[("an ", 1.0), ("important", 1.1), (" word", 1.0)]]),
        ("(unbalanced", [[("unbalanced", 1.1)]]),  # an unclosed bracket weights the rest
        (r"\(literal\]", [[("(literal]", 1.0)]]),
        ("(unnecessary)(parens)", [[("unnecessaryparens", 1.1)]]),  # equal weights merge
        ("a stray) bracket", [[("a stray) bracket", 1.0)]]),  # closes nothing: text
        ("[less]", [[("less", 1 / 1.1)]]),
        ("(word: 1.25 )", [[("word", 1.25)]]),
        ("(word:1.0)", [[("word", 1.0)]]),
        ("a BREAK b", [[("a", 1.0)], [("b", 1.0)]]),
        ("(a BREAK b)", [[("a", 1.1)], [("b", 1.1)]]),  # A1111 would encode "BREAK" at -1.1
        ("BREAKFAST", [[("BREAKFAST", 1.0)]]),
    ],
)
def test_attention_parses_as_a1111(text, sections):
    assert_sections(parse_prompt_attention(text), sections)


def assert_sections(parsed, expected):
    assert [[text for text, _ in section] for section in parsed] == [
        [text for text, _ in section] for section in expected
    ]
    assert [[weight for _, weight in section] for section in parsed] == [
        pytest.approx([weight for _, weight in section]) for section in expected
    ]


def test_nested_brackets_multiply_as_in_a1111_doctest():
    parsed = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert_sections(parsed, [[
        ("a ", 1.0), ("house", 1.3 * 1.1 * 1.1), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1),
    ]])


@pytest.mark.parametrize(
    "text, message",
    [
        ("a (word:abc) b", r"^p: weight 'abc' in '\(word:abc\)' is not a number"),
        ("(word:1,2)", r"weight '1,2' in '\(word:1,2\)' is not a number"),
        ("(word:1e3)", r"weight '1e3'.*plain decimals"),
        ("(word:1.2.3)", r"weight '1.2.3'"),
        ("(word:)", r"weight '' in '\(word:\)'"),
        ("a [cat:dog:0.5] b", r"prompt editing '\[cat:dog:0.5\]' is not supported"),
        ("[cat:10]", r"prompt editing '\[cat:10\]'"),
        ("[cat|dog]", r"alternation '\[cat\|dog\]' is not supported"),
        ("a cat AND a dog", r"AND \(composable diffusion\) is not supported"),
        ("x <hypernet:anime:1>", r"tag '<hypernet:anime:1>' is not supported"),
        ("<lora:style:heavy>", r"in '<lora:style:heavy>', the weight 'heavy' is not a number"),
        ("<lora:style:1:nan>", r"unet weight 'nan'"),
        ("<lora:style:1:1:8>", r"'<lora:style:1:1:8>': expected <lora:name>"),
        ("<lyco:style:dyn=8>", r"setting 'dyn' is not supported; expected <lyco:name>"),
        ("<lora: :1>", r"expected <lora:name>"),
    ],
)
def test_syntax_a1111_would_draw_otherwise_is_a_one_line_error(text, message):
    with pytest.raises(SdloraError, match=message) as error:
        check_prompt_syntax(text, "p")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text",
    [
        r"\(word:abc\) is literal",
        "(a:1.2) [b] ((c)) (d: 0.5 ) [e [f]] (unclosed",
        "masterpiece, (best quality:1.4), <lora:style:0.8>, <lyco:ink:0.5:1>",
        "and, android, BRANDS",  # AND only as a whole upper-case word
    ],
)
def test_valid_syntax_passes(text):
    check_prompt_syntax(text, "p")


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("<lora:style>", LoraTag(1.0, None)),
        ("<lora:style:0.7>", LoraTag(0.7, None)),  # kohya: both text encoder and UNet
        ("<lora:style:0.7:0.7>", LoraTag(0.7, None)),
        ("<lora:style:-0.5:1>", LoraTag(1.0, {"unet": 1.0, "text_encoder": -0.5, "text_encoder_2": -0.5})),
        ("<lora:style:te=0.5:unet=1>", LoraTag(1.0, {"unet": 1.0, "text_encoder": 0.5, "text_encoder_2": 0.5})),
        ("<lora:style:1:unet=0>", LoraTag(1.0, {"unet": 0.0, "text_encoder": 1.0, "text_encoder_2": 1.0})),
        # A1111: the UNet's default is the text encoder's weight, named or not
        ("<lora:style:te=0.5>", LoraTag(0.5, None)),
        ("<lyco:style:0.5:0.25>", LoraTag(1.0, {"unet": 0.25, "text_encoder": 0.5, "text_encoder_2": 0.5})),
    ],
)
def test_adapter_tags_give_weights_per_component(tag, expected):
    text, tags = parse_lora_tags(f"a {tag} cat", "p")
    assert text == "a cat"
    assert tags == {"style": expected}


def test_prompt_row_keeps_plain_weights_and_adds_component_weights():
    row = prompt_row("a <lora:oil:0.5> <lora:ink:0.2:1> cat", "blurry <lyco:noise:-1>")
    assert (row.prompt, row.negative) == ("a cat", "blurry")
    assert row.loras == {"oil": 0.5, "ink": 1.0, "noise": -1.0}
    assert row.lora_components == {"ink": {"unet": 1.0, "text_encoder": 0.2, "text_encoder_2": 0.2}}


def test_prompt_file_rows_report_syntax_errors_with_their_line(tmp_path):
    from sdlora.render.prompts import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n(a dog:strong)\n")
    with pytest.raises(SdloraError, match=r"prompts.txt:2: weight 'strong'"):
        read_prompts(path)
