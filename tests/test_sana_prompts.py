"""SANA prompt styles on the tiny model: "official" == diffusers' SanaPipeline.encode_prompt with
the official DDSPO trainer's complex-human-instruction prefix; "plain" == the raw prompt."""

import inspect

import pytest
import torch

from bench.t2i.backbones import (
    official_complex_human_instruction,
)
from bench.t2i.config import TrainConfig, UsageError, parse_args, resolve
from bench.t2i.tiny import tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["A Red Cat on a mat  ", "two dogs", "  Café, at NIGHT!"]


@pytest.fixture(scope="module")
def bb():
    return tiny_backbone("sana")


@pytest.fixture
def style(bb):
    """Set the backbone's prompt style for one test; restore the default afterwards."""

    def set_style(s):
        bb.prompt_style = s
        return bb

    yield set_style
    bb.prompt_style = "official"


def _pipeline(bb):
    from diffusers import SanaPipeline

    c = bb.components
    return SanaPipeline(
        tokenizer=c["tokenizer"],
        text_encoder=c["text_encoder"],
        vae=None,
        transformer=None,
        scheduler=None,
    )


def _old_plain(bb, prompts):
    """The adapter's encoding before prompt styles existed (right padding to max length)."""
    tok, enc = bb.components["tokenizer"], bb.components["text_encoder"]
    tok.padding_side = "right"
    batch = tok(
        prompts,
        padding="max_length",
        max_length=bb.max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        h = enc(batch.input_ids, attention_mask=batch.attention_mask)[0]
    return h, batch.attention_mask


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unset_style_encodes_as_official(bb, style):
    """A backbone opened as is, and the trainer's with no --sana-prompt-style, encode like
    the official style, not like the plain one."""
    from bench import train_t2i

    fresh = tiny_backbone("sana").encode_prompts(PROMPTS).tensors
    trained = train_t2i.load_model(resolve(TrainConfig(tiny="sana"))).encode_prompts(PROMPTS)
    official = style("official").encode_prompts(PROMPTS).tensors
    plain = style("plain").encode_prompts(PROMPTS).tensors
    assert _same(fresh, official) and _same(trained.tensors, official)
    assert not _same(official, plain)


def test_official_instruction_is_the_pipeline_default_without_trailing_space():
    from diffusers import SanaPipeline

    default = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"]
    chi = official_complex_human_instruction()
    assert len(chi) == len(default.default) == 8
    assert list(chi[:-1]) == default.default[:-1]
    assert chi[-1] == "User Prompt:" and default.default[-1] == "User Prompt: "


def test_official_parity_with_sana_pipeline_encode_prompt(bb, style):
    """Embeddings and mask == SanaPipeline.encode_prompt(prompts, complex_human_instruction=
    official list, max_sequence_length) -- what the official DDSPO SANA trainer calls."""
    ours = style("official").encode_prompts(PROMPTS).tensors
    with torch.no_grad():
        h, m, neg_h, neg_m = _pipeline(bb).encode_prompt(
            PROMPTS,
            do_classifier_free_guidance=True,
            negative_prompt="",
            device=torch.device("cpu"),
            max_sequence_length=bb.max_sequence_length,
            complex_human_instruction=list(official_complex_human_instruction()),
        )
    assert h.shape == (3, bb.max_sequence_length, 32)
    assert torch.equal(ours["encoder_attention_mask"], m)
    torch.testing.assert_close(ours["encoder_hidden_states"], h, rtol=0, atol=0)
    # the empty prompt is the unconditional branch: the pipeline's negative-prompt encoding
    unc = bb.encode_prompts([""]).tensors
    assert torch.equal(unc["encoder_attention_mask"], neg_m[:1])
    torch.testing.assert_close(unc["encoder_hidden_states"], neg_h[:1], rtol=0, atol=0)


def test_official_preprocesses_and_prefixes(bb, style):
    """Lowercase + strip (the pipeline's _text_preprocessing, no caption cleaning) and the
    instruction prefix: equal to plain encoding of the same text, selected as the pipeline
    does (first token + the last max_sequence_length - 1)."""
    official = style("official").encode_prompts(PROMPTS[:1]).tensors
    chi = "\n".join(official_complex_human_instruction())
    tok = bb.components["tokenizer"]
    n_chi = len(tok.encode(chi))
    L = bb.max_sequence_length
    full = tok(
        [chi + PROMPTS[0].lower().strip()],
        padding="max_length",
        max_length=n_chi + L - 2,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        h = bb.components["text_encoder"](full.input_ids, attention_mask=full.attention_mask)[0]
    keep = [0, *range(-L + 1, 0)]
    assert torch.equal(official["encoder_attention_mask"], full.attention_mask[:, keep])
    torch.testing.assert_close(official["encoder_hidden_states"], h[:, keep], rtol=0, atol=0)
    # case and outer whitespace no longer matter
    same = bb.encode_prompts(["a red cat on a mat"]).tensors
    torch.testing.assert_close(same["encoder_hidden_states"], official["encoder_hidden_states"])


def test_plain_is_the_old_behaviour(bb, style):
    prompts = [*PROMPTS, ""]
    ours = style("plain").encode_prompts(prompts).tensors
    h, m = _old_plain(bb, prompts)
    assert torch.equal(ours["encoder_attention_mask"], m)
    torch.testing.assert_close(ours["encoder_hidden_states"], h, rtol=0, atol=0)


def test_styles_differ_and_share_the_unconditional_branch(bb, style):
    plain = style("plain").encode_prompts(["two dogs", ""]).tensors
    official = style("official").encode_prompts(["two dogs", ""]).tensors
    assert not torch.allclose(
        plain["encoder_hidden_states"][0], official["encoder_hidden_states"][0]
    )
    torch.testing.assert_close(
        plain["encoder_hidden_states"][1], official["encoder_hidden_states"][1]
    )


def test_official_rows_do_not_depend_on_the_batch(bb, style):
    style("official")
    batch = bb.encode_prompts(["", PROMPTS[1], "", PROMPTS[0]]).tensors
    alone = bb.encode_prompts([PROMPTS[0]]).tensors
    unc = bb.encode_prompts([""]).tensors
    for k in ("encoder_hidden_states", "encoder_attention_mask"):
        torch.testing.assert_close(batch[k][3:], alone[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batch[k][0:1], unc[k])
        torch.testing.assert_close(batch[k][2:3], unc[k])


def test_bad_style_is_rejected(bb, style):
    style("fancy")
    with pytest.raises(ValueError, match="prompt style"):
        bb.encode_prompts(["a cat"])


def test_config_flag():
    assert parse_args(["--tiny", "--sana-prompt-style", "plain"]).sana_prompt_style == "plain"
    cfg = resolve(TrainConfig(tiny=True, backbone="sana", sana_prompt_style="plain"))
    assert cfg.sana_prompt_style == "plain"
    with pytest.raises(UsageError, match="sana prompt style"):
        resolve(TrainConfig(tiny=True, backbone="sana", sana_prompt_style="fancy"))


@pytest.mark.parametrize("style", ["official", "plain"])
def test_the_trainer_passes_its_prompt_style_to_the_sana_adapter(style):
    from bench import train_t2i
    from bench.t2i.config import TrainConfig, resolve

    cfg = resolve(TrainConfig(tiny=True, backbone="sana", sana_prompt_style=style))
    assert train_t2i.load_model(cfg).prompt_style == style
