"""Stable Diffusion from a diffusers pipeline directory (genlab issue 13's acceptance test): a tiny SD directory
with random weights and a tokenizer made here; diffusers' StableDiffusionPipeline with a DDIMScheduler and
genlab's model with genlab's DDIM, from the same latents with the same guidance, give the same images."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from genlab.adapters.latent_text_to_image import LatentTextToImage  # noqa: E402
from genlab.core.errors import GenlabError  # noqa: E402
from genlab.diffusion import DDIM, DPMSolverPP  # noqa: E402
from genlab.interop.diffusers import from_diffusers  # noqa: E402
from genlab.interop.stable_diffusion import scheduler_process  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The configuration file of this scheduler:FutureWarning")  # outdated_v

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
         "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)  # Stable Diffusion 1.x's DDIM configuration
SCHEDULERS = {
    "sd": SD_SCHEDULER,
    # outdated: the pipeline takes steps_offset as 1 and clip_sample as False; v prediction, ends at the data
    "outdated_v": {**SD_SCHEDULER, "steps_offset": 0, "clip_sample": True, "set_alpha_to_one": True,
                   "prediction_type": "v_prediction"},
    "trailing": {**SD_SCHEDULER, "timestep_spacing": "trailing", "steps_offset": 0},
}


def _tiny_sd(root, scheduler: dict) -> None:
    """A StableDiffusionPipeline directory with random weights: UNet on 4 x 16 x 16 latents, a VAE with f = 2
    (32 x 32 images), a 3-layer CLIP text encoder of width 32 with 12 positions."""
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (root / "raw" / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "raw" / "vocab.json"), str(root / "raw" / "merges.txt"),
                                           model_max_length=12)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=12, bos_token_id=21, eos_token_id=22, pad_token_id=22))
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                  latent_channels=4, sample_size=32,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**scheduler), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    path = root / "scheduler" / "scheduler_config.json"  # as given: the pipeline rewrote outdated values
    path.write_text(json.dumps({**json.loads(path.read_text()), **scheduler}))


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """name -> a tiny SD directory with that scheduler configuration (made when first asked for)."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = tmp_path_factory.mktemp(name)
            _tiny_sd(made[name], SCHEDULERS[name])
        return made[name]

    return get


PROMPTS = ["lower newer", "wider"]
NEGATIVE = ["low", ""]


@pytest.mark.parametrize("name, guidance_scale, negative", [
    ("sd", 7.5, NEGATIVE), ("sd", 3.0, None), ("sd", 1.0, None), ("outdated_v", 7.5, NEGATIVE), ("trailing", 5.0, None),
])
def test_images_equal_diffusers_pipeline(sd_dirs, name: str, guidance_scale: float, negative) -> None:
    sd_dir = sd_dirs(name)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    model = from_diffusers(sd_dir)
    assert isinstance(model, LatentTextToImage) and model.size == (32, 32)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=10, guidance_scale=guidance_scale,
                      latents=latents.clone(), output_type="pt").images
    ours = model.sample(PROMPTS, negative, steps=10, guidance_scale=guidance_scale, sampler=DDIM(10), latents=latents)
    assert ours.shape == (2, 3, 32, 32) and float(ours.min()) >= -1 and float(ours.max()) <= 1
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=1e-5)  # measured: 1e-6
    # the grid is diffusers' DDIM grid: its timesteps, then the final alpha (1 at the data, else alphas_cumprod[0])
    pipe.scheduler.set_timesteps(10)
    times = model.timesteps(10)
    assert torch.equal(times[:-1], (pipe.scheduler.timesteps.double() + 1) / 1000)
    assert float(times[-1]) == (0.0 if pipe.scheduler.config.set_alpha_to_one else 1e-3)


def test_other_samplers_drive_it_and_draw_from_the_generator(sd_dirs) -> None:
    model = from_diffusers(sd_dirs("sd"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model(["wider"], steps=4, sampler=DPMSolverPP(4), generator=g(), guidance_scale=2.0)
    b = model.sample(["wider"], steps=4, sampler=DPMSolverPP(4), generator=g(), guidance_scale=2.0)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and bool(a.isfinite().all())
    own = model.sample(["wider"], steps=4, sampler=DPMSolverPP(4), generator=g(), guidance_scale=2.0,
                       times=DPMSolverPP(4).timesteps(model.process))  # the sampler's own grid
    assert not torch.equal(own, a)
    assert model.sample(["wider"], steps=2, size=(16, 8), generator=g()).shape == (1, 3, 16, 8)


def test_what_genlab_does_not_reproduce_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="clip_sample=True"):
        scheduler_process({**SD_SCHEDULER, "clip_sample": True})
    with pytest.raises(ValueError, match="timestep_spacing='linspace'"):
        scheduler_process({**SD_SCHEDULER, "timestep_spacing": "linspace"})
    with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
        scheduler_process({**SD_SCHEDULER, "beta_schedule": "squaredcos_cap_v2"})
    process, prediction, grid, t_end = scheduler_process({"trained_betas": [0.1] * 20, "beta_schedule": "custom"})
    assert process.T == 20 and prediction == "eps" and t_end == 0.0
    torch.testing.assert_close(process.alphas_cumprod, 0.9 ** torch.arange(1, 21, dtype=torch.float64))
    from genlab.interop.stable_diffusion import stable_diffusion_from_diffusers

    with pytest.raises(GenlabError, match="model_index.json"):
        stable_diffusion_from_diffusers(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": [], "vae": []}))
    with pytest.raises(GenlabError, match="DiTPipeline names no unet, text_encoder, tokenizer, scheduler"):
        from_diffusers(tmp_path)


def test_the_state_dict_holds_each_weight_once_and_mixed_precision_decodes_in_float32(sd_dirs) -> None:
    model = from_diffusers(sd_dirs("sd"))
    assert not any(k.startswith("denoiser.") for k in model.state_dict())
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    full = model.sample(["wider"], steps=3, latents=latents)
    model.to(torch.float64)
    model.autoencoder.float()
    mixed = model.sample(["wider"], steps=3, latents=latents.double())
    assert mixed.dtype == torch.float32 and next(model.backbone.parameters()).dtype == torch.float64
    torch.testing.assert_close(mixed, full, rtol=0, atol=1e-4)


def test_bad_arguments_name_what_is_wrong(sd_dirs) -> None:
    model = from_diffusers(sd_dirs("sd"))
    parts = (model.backbone, model.autoencoder, model.text_encoder, model.process)
    with pytest.raises(ValueError, match="t_end must be in"):
        LatentTextToImage(*parts, t_end=1.5)
    with pytest.raises(ValueError, match="multiples of the autoencoder's 2"):
        LatentTextToImage(*parts, size=(31, 32))
    with pytest.raises(ValueError, match="unknown prediction type 'epsilon'"):
        LatentTextToImage(*parts, prediction="epsilon")
    with pytest.raises(ValueError, match="2 prompts but 1 negative prompts"):
        model.sample(PROMPTS, ["low"], steps=2)
    with pytest.raises(ValueError, match="latents hold 1 samples for 2 prompts"):
        model.sample(PROMPTS, steps=2, latents=torch.zeros(1, 4, 16, 16))
