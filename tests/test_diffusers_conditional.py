"""Text-conditioned diffusers models in the diffusers backend (keyface_core/backends/diffusers_text.py): seeded
tiny SD1.5 (eps, v), SDXL (two CLIPs, pooled embeds, time_ids) and SD3 (flow transformer) pipelines built from
configs, exact restore with a prompt and cfg, the conditioning fingerprint, ComfyUI's flow schedule, loading from
a repo id in a Hugging Face cache and from a single original-layout checkpoint file, and the CLI on real photos."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers backend's tests need diffusers (requirements-dev.txt)")
pytest.importorskip("transformers", reason="text-conditioned models need transformers (requirements-dev.txt)")

from conftest import keyface_cli, photo_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from keyface_core import protocol  # noqa: E402
from keyface_core.backends import diffusers as backend  # noqa: E402
from keyface_core.backends import diffusers_text  # noqa: E402
from keyface_core.keys import SecretKey, generate_key  # noqa: E402
from keyface_dev.tiny_diffusers import save_tiny_sd, save_tiny_sd15_single_file  # noqa: E402

LAYOUTS = {"sd15-eps": ("sd15", "epsilon"), "sd15-v": ("sd15", "v_prediction"), "sdxl": ("sdxl", "epsilon"),
           "sd3-flow": ("sd3", "epsilon"), "sd3-t5": ("sd3", "t5"), "flux": ("flux", "epsilon")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-sd")
    return {name: save_tiny_sd(root / name, layout=layout, prediction_type="epsilon" if kind == "t5" else kind,
                               t5=kind == "t5")
            for name, (layout, kind) in LAYOUTS.items()}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def loaded(request, folders):
    return request.param, backend.load(str(folders[request.param]))


def _faces(model, count=2, seed=1):
    torch.manual_seed(seed)
    clean = model.encode(torch.rand(count, 3, 64, 64)).to(torch.float64)
    mask = torch.zeros(count, 1, 8, 8)
    mask[:, :, 2:7, 2:6] = 1.0
    return clean, protocol.FaceBatch(protocol.new_nonces(count), tuple(range(count)), mask,
                                     protocol.public_background(clean, mask))


def test_layouts_load_as_their_family(loaded):
    name, model = loaded
    expected = {"sd15-eps": ("sd", "eps", 4), "sd15-v": ("sd", "v", 4), "sdxl": ("sdxl", "eps", 4),
                "sd3-flow": ("sd3", "flow", 16), "sd3-t5": ("sd3", "flow", 16), "flux": ("flux", "flow", 16)}[name]
    assert (model.family, model.kind, model.latent_channels) == expected
    assert (model.t5 is not None) == (name in ("sd3-t5", "flux"))
    assert model.downscale == 8 and model.model_id.startswith("dfu-")
    assert model.encode(torch.rand(1, 3, 64, 64)).shape == (1, expected[2], 8, 8)
    sigmas = model.sigmas(4, "normal")
    if model.kind == "flow":
        assert model.add_noise is protocol.sampling.flow_add_noise and float(sigmas[0]) == 1.0
    else:
        assert model.add_noise is protocol.sampling.eps_add_noise and float(sigmas[0]) > 10


@pytest.mark.parametrize("cfg", [1.0, 3.0], ids=["cfg1", "cfg3"])
def test_exact_restore_with_a_prompt(loaded, cfg):
    """invert -> lock -> render -> unlock -> retrace with a prompt (and cfg 3: two calls per step) gives the clean
    latent back: bit for bit in float32, within 1e-12 in float64; a wrong key gives another face."""
    _, model = loaded
    cond_id = model.set_conditioning("a smiling face", "", cfg)
    clean, batch = _faces(model)
    key, other = (SecretKey(generate_key(), kind="key", source=f"test key {i}") for i in range(2))
    sigmas = model.sigmas(3, "karras")
    noise = protocol.invert(model.denoise, clean, sigmas, batch, method="exact", add_noise=model.add_noise)
    keyed = protocol.lock(noise, clean, batch, key)
    drawn = protocol.render(model.denoise, keyed, sigmas, sampler="dpmpp_2m", add_noise=model.add_noise)
    assert float((drawn - clean).abs().max()) > 1e-3
    # restore in a fresh conditioning state, as another process would
    assert model.set_conditioning("a smiling face", "", cfg) == cond_id
    restored = protocol.retrace(model.denoise, protocol.unlock(keyed, key), sigmas, batch, add_noise=model.add_noise)
    assert float((restored - clean).abs().max()) <= 1e-12
    assert torch.equal(restored.to(torch.float32), clean.to(torch.float32))
    wrong = protocol.retrace(model.denoise, protocol.unlock(keyed, other, allow_wrong_key=True), sigmas, batch,
                             add_noise=model.add_noise)
    assert float((wrong - clean).abs().max()) > 1e-3


def test_conditioning_fingerprint_covers_prompt_negative_and_cfg_but_not_the_text(loaded):
    _, model = loaded
    base = model.set_conditioning("a smiling face", "", 3.0)
    assert base.startswith(diffusers_text.COND_PREFIX) and "smil" not in base
    assert model.set_conditioning("a smiling face", "", 3.0) == base
    others = {model.set_conditioning("a face", "", 3.0), model.set_conditioning("a smiling face", "photo", 3.0),
              model.set_conditioning("a smiling face", "", 4.0), model.set_conditioning("a smiling face", "", 1.0)}
    assert base not in others and len(others) == 4
    # at cfg 1 the negative branch never runs, so it cannot change the result
    assert model.set_conditioning("a face", "photo", 1.0) == model.set_conditioning("a face", "", 1.0)
    x = torch.randn(1, model.latent_channels, 8, 8, dtype=torch.float64)
    sigma = model.sigmas(4, "normal")[1]
    model.set_conditioning("a face", "", 1.0)
    plain = model.denoise(x, sigma)
    model.set_conditioning("a smiling face", "", 1.0)
    assert not torch.equal(plain, model.denoise(x, sigma))      # the prompt reaches the denoiser
    with pytest.raises(protocol.InputMismatchError, match="cfg"):
        model.set_conditioning("a face", "", 0.0)


@pytest.mark.parametrize("name", ["sd15-eps", "sdxl", "sd3-t5", "flux"])
def test_prompts_are_encoded_as_the_diffusers_pipelines_encode_them(folders, name):
    """The same embeddings, bit for bit, as StableDiffusion(XL|3)Pipeline / FluxPipeline.encode_prompt (no grad,
    as in their __call__)."""
    model = backend.load(str(folders[name]))
    model.set_conditioning("a smiling face", "", 1.0)
    ours, _, _ = model._cond
    pipeline_class = {"sd15-eps": diffusers.StableDiffusionPipeline, "sdxl": diffusers.StableDiffusionXLPipeline,
                      "sd3-t5": diffusers.StableDiffusion3Pipeline, "flux": diffusers.FluxPipeline}[name]
    extra = {"safety_checker": None} if name == "sd15-eps" else {}
    pipe = pipeline_class.from_pretrained(folders[name], **extra)
    with torch.no_grad():
        if name == "sd15-eps":
            context, _ = pipe.encode_prompt("a smiling face", "cpu", 1, False)
            pooled = None
        elif name == "sdxl":
            context, _, pooled, _ = pipe.encode_prompt("a smiling face", device="cpu", do_classifier_free_guidance=False)
        elif name == "flux":
            context, pooled, _ = pipe.encode_prompt("a smiling face", "a smiling face")
        else:
            context, _, pooled, _ = pipe.encode_prompt("a smiling face", "a smiling face", "a smiling face",
                                                       do_classifier_free_guidance=False)
    assert torch.equal(context, ours.context)
    assert pooled is None and ours.pooled is None or torch.equal(pooled, ours.pooled)


def test_sdxl_empty_negative_is_zeros_and_time_ids_follow_the_crop(folders):
    model = backend.load(str(folders["sdxl"]))
    model.set_conditioning("a face", "", 3.0)
    _, uncond, _ = model._cond
    assert float(uncond.context.abs().max()) == 0.0 and float(uncond.pooled.abs().max()) == 0.0
    sigma = model.sigmas(4, "normal")[1]
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    small = model.denoise(x, sigma)
    big = model.denoise(torch.nn.functional.pad(x, (0, 8, 0, 8)), sigma)[..., :8, :8]
    assert not torch.allclose(small, big)     # another size, other time_ids (and context at the border)


def test_flow_schedule_matches_comfyui(host, folders):
    """SD3's FlowMatch scheduler config (shift 3) gives ComfyUI's ModelSamplingDiscreteFlow sigmas."""
    import comfy.model_sampling
    import comfy.samplers
    model = backend.load(str(folders["sd3-flow"]))
    config = json.loads((folders["sd3-flow"] / "scheduler" / "scheduler_config.json").read_text())

    class Settings:
        sampling_settings = {"shift": config["shift"], "multiplier": 1000}
    sampling = comfy.model_sampling.ModelSamplingDiscreteFlow(Settings())
    assert torch.allclose(sampling.sigmas.to(torch.float64), diffusers_text.flow_table(3.0), rtol=1e-6)
    for scheduler in ("normal", "karras", "exponential", "simple"):
        ours = model.sigmas(10, scheduler)
        theirs = comfy.samplers.calculate_sigmas(sampling, scheduler, 10).to(torch.float32)
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), scheduler


def test_flux_schedule_and_guidance(host, folders):
    """Flux with dynamic shifting takes ComfyUI's Flux default (ModelSamplingFlux, mu = max_shift 1.15), so the
    schedule does not depend on the crop; the embedded guidance (3.5) is part of the conditioning fingerprint."""
    import comfy.model_sampling
    import comfy.samplers
    model = backend.load(str(folders["flux"]))

    class Settings:
        sampling_settings = {"shift": 1.15}
    sampling = comfy.model_sampling.ModelSamplingFlux(Settings())
    for scheduler in ("normal", "karras", "exponential", "simple"):
        theirs = comfy.samplers.calculate_sigmas(sampling, scheduler, 10).to(torch.float32)
        assert torch.allclose(model.sigmas(10, scheduler), theirs, rtol=1e-5, atol=1e-6), scheduler
    assert model.guidance == 3.5
    base = model.set_conditioning("a face", "", 1.0)
    model.guidance = 2.0
    assert model.set_conditioning("a face", "", 1.0) != base
    model.guidance = 3.5
    with pytest.raises(protocol.InputMismatchError, match="even size"):
        model.denoise(torch.zeros(1, 16, 7, 7, dtype=torch.float64), model.sigmas(2, "normal")[0])


def _cache_layout(hub: Path, repo: str, folder: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """`folder` placed in a Hugging Face hub cache the way `hf download` leaves it."""
    owner, name = repo.split("/")
    base = hub / f"models--{owner}--{name}"
    shutil.copytree(folder, base / "snapshots" / revision)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    return base / "snapshots" / revision


def test_repo_id_resolves_through_the_cache_offline(tmp_path, folders, monkeypatch):
    from huggingface_hub import constants
    snapshot = _cache_layout(tmp_path / "hub", "keyface-test/tiny-sd15", folders["sd15-eps"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from_repo = backend.load("keyface-test/tiny-sd15")
    assert from_repo.model_id == backend.load(str(snapshot)).model_id
    assert from_repo.model_id == backend.load(str(folders["sd15-eps"])).model_id   # the id is the weights', not the path's


def test_single_checkpoint_file_gives_the_same_model_bit_for_bit(host, tmp_path, folders, monkeypatch):
    """An original-layout .safetensors of the same weights loads through from_single_file (configs from the folder,
    offline) with the same fingerprint and the same denoiser bits, so files restore across the two forms."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    single = save_tiny_sd15_single_file(folders["sd15-eps"], tmp_path / "tiny-sd15.safetensors")
    folder_model = backend.load(str(folders["sd15-eps"]))
    file_model = backend.load(str(single), config=str(folders["sd15-eps"]))
    assert file_model.model_id == folder_model.model_id
    for model in (folder_model, file_model):
        model.set_conditioning("a face", "", 2.0)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    sigma = folder_model.sigmas(4, "normal")[1]
    assert torch.equal(folder_model.denoise(x, sigma), file_model.denoise(x, sigma))
    pixels = torch.rand(1, 3, 64, 64)
    assert torch.equal(folder_model.encode(pixels), file_model.encode(pixels))
    # the same through the CLI's loader, with the config named by the environment variable
    from keyface import models
    monkeypatch.setenv(models.CONFIG_ENV, str(folders["sd15-eps"]))
    assert models.load_model(str(single), device="cpu").model_id == folder_model.model_id


# ------------------------------------------------------------------------------------------------------------------
# Bad input C80-C85 (rows for the README's table: docs/notes/dfcond.md)
# ------------------------------------------------------------------------------------------------------------------

def _load(spec, **kwargs):
    from keyface import models
    return models.load_model(str(spec), device="cpu", **kwargs)


def test_c80_unsupported_pipeline_names_what_is_supported(tmp_path):
    """C80: a diffusers folder whose denoiser the backend does not run (video, other DiTs, ...)."""
    other = tmp_path / "hunyuan"
    (other / "transformer").mkdir(parents=True)
    (other / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanDiT2DModel"}))
    with pytest.raises(backend.BackendError, match="HunyuanDiT2DModel, which the diffusers backend does not "
                                                   "run. Supported: .*SD3Transformer2DModel.*FluxTransformer2DModel"):
        _load(other)


def test_c81_repo_not_in_the_cache_while_offline(tmp_path, monkeypatch):
    """C81: a repo id that is not in the Hugging Face cache while HF_HUB_OFFLINE is set: no download is tried."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(backend.BackendError, match="is not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        _load("keyface-test/not-cached")


def test_c82_single_file_without_its_configs(host, tmp_path, folders, monkeypatch):
    """C82: a single checkpoint file, offline, with no config folder given and none cached."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.delenv("KEYFACE_MODEL_CONFIG", raising=False)
    single = save_tiny_sd15_single_file(folders["sd15-eps"], tmp_path / "tiny-sd15.safetensors")
    with pytest.raises(backend.BackendError, match="Pass one: --model-config <diffusers folder or cached "
                                                   "repo id>"):
        _load(single)
    with pytest.raises(backend.BackendError, match="does not exist"):
        _load(tmp_path / "missing.safetensors")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a checkpoint")
    with pytest.raises(backend.BackendError, match="cannot read the checkpoint file damaged.safetensors"):
        _load(damaged)
    import safetensors.torch
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.x_embedder.proj.weight": torch.zeros(1)}, str(other))
    flux = tmp_path / "flux-config"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(backend.BackendError, match="single files load for SD1.5, SD2, SDXL base and SD3 only"):
        _load(other, config=str(flux))


def test_c83_unet_that_needs_other_inputs(tmp_path, folders):
    """C83: an inpainting/depth UNet (more input channels than the VAE's latent) or one with extra embeddings."""
    inpaint = shutil.copytree(folders["sd15-eps"], tmp_path / "inpaint")
    config = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**config, "in_channels": 9}))
    with pytest.raises(backend.BackendError, match=r"takes 9 input channels but the VAE makes 4 \(an inpainting"):
        _load(inpaint)
    (inpaint / "unet" / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(backend.BackendError, match="takes extra conditioning"):
        _load(inpaint)


def test_c84_pipeline_folder_missing_a_part(tmp_path, folders):
    """C84: a text-to-image folder without its text encoder, tokenizer or VAE (a partial download)."""
    no_text = shutil.copytree(folders["sd15-eps"], tmp_path / "no-text")
    shutil.rmtree(no_text / "text_encoder")
    with pytest.raises(backend.BackendError, match=r"has no text_encoder/ \(CLIP\)"):
        _load(no_text)
    no_tokenizer = shutil.copytree(folders["sd15-eps"], tmp_path / "no-tokenizer")
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(backend.BackendError, match="has text_encoder/ but no tokenizer/ folder"):
        _load(no_tokenizer)
    no_vae = shutil.copytree(folders["sdxl"], tmp_path / "no-vae")
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(backend.BackendError, match="has no vae/ folder with an AutoencoderKL config"):
        _load(no_vae)


def test_c85_same_weights_in_the_other_host_are_told_apart(host, folders):
    """C85 (issue 12 item 3): the same SD1.5 weights run by ComfyUI's UNet code and by diffusers' differ in the
    last bits. The two fingerprints differ, so the CLI and the nodes refuse the other's files as "a different
    model"; and a restore forced through the other host's denoiser is reported by the verification as not the
    original, with the error measured, never passed off as exact. Within one host the restore is exact."""
    from keyface_dev import comfy_backend, tiny_models
    from keyface_dev.tiny_diffusers import comfy_unet_from_folder
    from keyface_core.backends.diffusers_text import Embedding

    ours = backend.load(str(folders["sd15-eps"]))
    # ComfyUI's model without a CLIP runs on zeros [1, 77, 32]: give diffusers' UNet the same conditioning
    ours._cond = (Embedding(torch.zeros(1, 77, 32)), None, 1.0)
    comfy = comfy_backend.ComfyModel(comfy_unet_from_folder(folders["sd15-eps"]), tiny_models.vae_model(0))
    try:
        assert ours.model_id != comfy.model_id
        torch.manual_seed(3)
        clean = torch.randn(1, 4, 8, 8, dtype=torch.float64)     # SD-like latent scale (std 1)
        for sigma in ours.sigmas(3, "karras")[:-1]:
            x = clean * float(sigma)
            a, b = ours.denoise(x, sigma), comfy.denoise(x, sigma)
            relative = float((a - b).norm() / a.norm())
            # the same network evaluated at the same (nearest training) timestep, with other kernels: float32
            # rounding apart (interpolated timesteps were 2e-3 apart at fractional steps)
            assert 0 < relative < 1e-5, (float(sigma), relative)
        mask = torch.zeros(1, 1, 8, 8)
        mask[:, :, 2:7, 2:6] = 1.0
        batch = protocol.FaceBatch(protocol.new_nonces(1), (0,), mask, protocol.public_background(clean, mask))
        key = SecretKey(generate_key(), kind="key", source="test key")
        for anonymizer, restorer in ((ours, comfy), (comfy, ours)):
            sigmas = anonymizer.sigmas(3, "karras")
            noise = protocol.invert(anonymizer.denoise, clean, sigmas, batch, method="exact",
                                    add_noise=anonymizer.add_noise)
            keyed = protocol.lock(noise, clean, batch, key)
            same = protocol.retrace(anonymizer.denoise, protocol.unlock(keyed, key), sigmas, batch,
                                    add_noise=anonymizer.add_noise)
            assert protocol.verify(same, keyed, key).exact is True
            other = protocol.retrace(restorer.denoise, protocol.unlock(keyed, key), sigmas, batch,
                                     add_noise=restorer.add_noise)
            verdict = protocol.verify(other, keyed, key)
            assert verdict.exact is False and verdict.max_abs_error > 0
            assert "the restorer's numerics differ from the anonymizer's" in verdict.message()
            comfy.close()
    finally:
        comfy.close()


def test_cli_with_a_prompt_restores_real_photos_exactly(tmp_path, folders):
    """`keyface anonymize/restore --model <tiny SD1.5 folder> --prompt --cfg` as a subprocess on two real photos:
    every face verified exact; restore with another prompt is refused."""
    photos = photo_folder(tmp_path / "photos", ("obama.jpg", "biden.jpg"))
    keyface = keyface_cli
    assert keyface("keygen", tmp_path / "k.key").returncode == 0
    common = ["--key", tmp_path / "k.key", "--model", folders["sd15-eps"], "--no-progress"]
    run = keyface("anonymize", photos, "--out", tmp_path / "anon", *common, "--crop-size", 64, "--steps", 3,
                  "--prompt", "a smiling face", "--cfg", 2.5)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    for png in (tmp_path / "anon").glob("*.png"):   # the file's record carries a fingerprint, never the prompt
        with Image.open(png) as image:
            assert "smiling" not in json.dumps(dict(image.text)) and b"smiling" not in png.read_bytes()
    run = keyface("restore", tmp_path / "anon", "--out", tmp_path / "restored", *common, "--prompt", "a smiling face")
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "restored.keyface-report.json").read_text())["images"]
    assert len(rows) == 2 and all(r["verified"] is True and r["max_abs_error"] == 0.0 for r in rows)
    run = keyface("restore", tmp_path / "anon", "--out", tmp_path / "other", *common, "--prompt", "a face")
    assert run.returncode != 0 and "prompt or cfg differs" in (run.stderr + run.stdout)


def test_cli_single_file_with_model_config_restores_with_the_folder(host, tmp_path, folders):
    """`keyface anonymize --model tiny.safetensors --model-config <folder>`: the single file's file restores with
    the folder (same weights, same model id), verified exact; without a config it is refused with what to pass."""
    single = save_tiny_sd15_single_file(folders["sd15-eps"], tmp_path / "tiny-sd15.safetensors")
    photos = photo_folder(tmp_path / "photos", ("obama.jpg",))

    def keyface(*args):   # a single file's configs must come from --model-config here, not the environment
        return keyface_cli(*args, env={"KEYFACE_MODEL_CONFIG": ""})
    assert keyface("keygen", tmp_path / "k.key").returncode == 0
    fast = ["--key", tmp_path / "k.key", "--no-progress", "--crop-size", 64, "--steps", 3]
    run = keyface("anonymize", photos, "--out", tmp_path / "anon", "--model", single,
                  "--model-config", folders["sd15-eps"], *fast)
    assert run.returncode == 0, run.stderr
    run = keyface("restore", tmp_path / "anon", "--out", tmp_path / "restored", "--model", folders["sd15-eps"],
                  "--key", tmp_path / "k.key", "--no-progress")
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "restored.keyface-report.json").read_text())["images"]
    assert rows and all(r["verified"] is True and r["max_abs_error"] == 0.0 for r in rows)
    run = keyface("anonymize", photos, "--out", tmp_path / "noconfig", "--model", single, *fast)
    assert run.returncode == 2 and "KEYFACE_MODEL_CONFIG" in run.stderr, run.stderr
