"""bench/sample.py end to end on a tiny SD: base vs. full-weight and LoRA checkpoints."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from bench.sample import load_checkpoint, main, parse_checkpoint, to_uint8
from bench.t2i.backbones import prompt_generator
from bench.t2i.tiny import tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A full-weights checkpoint (``unet/`` folder) and a diffusers-format LoRA, both of
    tiny_backbone("sd", seed=0) with changed weights."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("ckpts")
    bb = tiny_backbone("sd")
    full = copy.deepcopy(bb.denoiser)
    with torch.no_grad():
        for p in full.parameters():
            p.add_(0.02 * torch.randn_like(p))
    full.save_pretrained(root / "full" / "unet")
    lora = copy.deepcopy(bb.denoiser)
    lora.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(lora))
    StableDiffusionPipeline.save_lora_weights(root / "ckpt" / "lora", unet_lora_layers=layers)
    return {"full": root / "full", "lora": root / "ckpt", "nets": {"full": full, "lora": lora}}


def test_load_checkpoint_kinds(checkpoints):
    bb = tiny_backbone("sd")
    cond = bb.encode_prompts(["a cat", ""])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([5, 700])
    for kind in ("full", "lora"):
        net = load_checkpoint(bb, checkpoints[kind])
        want = bb.forward(checkpoints["nets"][kind], x, t, cond)
        torch.testing.assert_close(bb.forward(net, x, t, cond), want)
    with pytest.raises(ValueError, match="neither unet weights"):
        load_checkpoint(bb, checkpoints["full"].parent)
    with pytest.raises(ValueError, match="not found"):
        load_checkpoint(bb, checkpoints["full"] / "nope")


def test_parse_checkpoint():
    assert parse_checkpoint("ft=/a/b")[0] == "ft"
    for bad in ("ft", "=x", "base=/a", "a b=/x"):
        with pytest.raises(ValueError):
            parse_checkpoint(bad)


def test_sample_cli_end_to_end(checkpoints, tmp_path, capsys):
    out = tmp_path / "samples"
    argv = [
        "--tiny",
        "sd",
        "--out",
        str(out),
        "--steps",
        "2",
        "--max-prompts",
        "2",
        "--no-progress",
    ]
    argv += [
        "--checkpoint",
        f"ft={checkpoints['full']}",
        "--checkpoint",
        f"lora={checkpoints['lora']}",
    ]
    assert main(argv) == 0
    assert "wrote 2 x 3 images" in capsys.readouterr().out
    imgs = {
        m: [np.asarray(Image.open(out / m / f"{i:05d}.png")) for i in range(2)]
        for m in ("base", "ft", "lora")
    }
    assert imgs["base"][0].shape == (32, 32, 3)
    assert not np.array_equal(imgs["base"][0], imgs["ft"][0])
    assert not np.array_equal(imgs["base"][0], imgs["lora"][0])
    # base images are exactly the backbone's own samples from the per-prompt seeds
    bb = tiny_backbone("sd")
    prompts = (out / "prompts.txt").read_text().splitlines()
    lat = bb.generate(prompts, [prompt_generator(0, i) for i in range(2)], steps=2)
    want = to_uint8(bb.decode_latents(lat)).numpy()
    assert np.abs(want.astype(int) - np.stack(imgs["base"]).astype(int)).max() <= 1
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 160 and grid.height > 2 * 160


def test_sample_cli_bad_checkpoint(tmp_path, capsys):
    argv = [
        "--tiny",
        "sd",
        "--out",
        str(tmp_path / "o"),
        "--checkpoint",
        f"x={tmp_path / 'missing'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "checkpoint not found" in err and err.count("\n") == 1
