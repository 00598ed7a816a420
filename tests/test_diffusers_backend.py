"""The diffusers backend (keyface_core/backends/diffusers.py) on seeded tiny diffusers pipelines built from
configs: the authors' family (UNet2DModel + VQModel / AutoencoderKL, eps and v), exact restore through the
protocol and through the `keyface` command line on real face photos, schedule parity with ComfyUI, clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers backend's tests need diffusers (requirements-dev.txt)")

from conftest import keyface_cli, photo_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from keyface_core import protocol  # noqa: E402
from keyface_core.backends import diffusers as backend  # noqa: E402
from keyface_core.keys import SecretKey, generate_key  # noqa: E402
from keyface_dev.tiny_diffusers import save_tiny_ldm  # noqa: E402


@pytest.fixture(scope="module", params=[("epsilon", "VQModel"), ("v_prediction", "VQModel"),
                                        ("epsilon", "AutoencoderKL")], ids=["eps-vq", "v-vq", "eps-kl"])
def ldm(request, tmp_path_factory):
    prediction, autoencoder = request.param
    folder = save_tiny_ldm(tmp_path_factory.mktemp("ldm") / "tiny-ldm", prediction_type=prediction,
                           autoencoder=autoencoder)
    return folder, backend.load(str(folder))


def test_loads_prediction_and_latent_format(ldm):
    folder, model = ldm
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert model.kind == {"epsilon": "eps", "v_prediction": "v"}[config["prediction_type"]]
    assert model.latent_channels == 3 and model.downscale == 4
    assert model.model_id.startswith("dfu-") and model.model_id == backend.load(str(folder)).model_id
    latent = model.encode(torch.rand(1, 3, 64, 64))
    assert latent.shape == (1, 3, 16, 16)
    assert model.decode(latent).shape == (1, 3, 64, 64)


def test_exact_restore_through_the_protocol(ldm):
    """invert -> lock -> render -> unlock -> retrace gives back the clean latent bit for bit (error 0)."""
    _, model = ldm
    torch.manual_seed(1)
    clean = model.encode(torch.rand(2, 3, 64, 64)).to(torch.float64)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 3:13, 4:12] = 1.0
    batch = protocol.FaceBatch(protocol.new_nonces(2), (0, 1), mask, protocol.public_background(clean, mask))
    key, other = (SecretKey(generate_key(), kind="key", source=f"test key {i}") for i in range(2))
    sigmas = model.sigmas(6, "normal")
    noise = protocol.invert(model.denoise, clean, sigmas, batch, method="exact", add_noise=model.add_noise)
    keyed = protocol.lock(noise, clean, batch, key)
    drawn = protocol.render(model.denoise, keyed, sigmas, sampler="dpmpp_2m", add_noise=model.add_noise)
    assert float((drawn - clean).abs().max()) > 1e-3            # a different face was drawn
    restored = protocol.retrace(model.denoise, protocol.unlock(keyed, key), sigmas, batch, add_noise=model.add_noise)
    # float64 algebra leaves ~1e-14; in float32 (the latent users see) the restore is bit for bit
    assert float((restored - clean).abs().max()) <= 1e-8
    assert torch.equal(restored.to(torch.float32), clean.to(torch.float32))
    wrong = protocol.retrace(model.denoise, protocol.unlock(keyed, other, allow_wrong_key=True), sigmas, batch,
                             add_noise=model.add_noise)
    assert float((wrong - clean).abs().max()) > 1e-3


def test_schedule_matches_comfyui(host, ldm):
    """The same training betas give ComfyUI's sigmas (comfy.samplers.calculate_sigmas on its discrete sampling)."""
    import comfy.model_sampling
    import comfy.samplers
    folder, model = ldm
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())

    class Settings:   # what ComfyUI reads from a model config
        sampling_settings = {"beta_schedule": "sqrt_linear" if config["beta_schedule"] == "linear" else "linear",
                             "linear_start": config["beta_start"], "linear_end": config["beta_end"]}
    sampling = comfy.model_sampling.ModelSamplingDiscrete(Settings())
    assert torch.allclose(sampling.sigmas.to(torch.float64), backend.training_sigmas(config), rtol=1e-5)
    for scheduler in ("normal", "karras", "exponential", "simple"):
        ours = model.sigmas(10, scheduler)
        theirs = comfy.samplers.calculate_sigmas(sampling, scheduler, 10).to(torch.float32)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6), scheduler


def test_unsupported_models_say_what_to_do(tmp_path):
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(backend.BackendError, match="cannot read the checkpoint file model.safetensors"):
        backend.load(str(single))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(backend.BackendError, match="no vae/ folder with an AutoencoderKL"):
        backend.load(str(tmp_path / "sd"))
    (tmp_path / "sd" / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNetSpatioTemporalModel"}))
    with pytest.raises(backend.BackendError, match="does not run. Supported: UNet2DModel"):
        backend.load(str(tmp_path / "sd"))
    with pytest.raises(backend.BackendError, match="Hugging Face cache"):
        backend.load("nobody/not-a-cached-repo")


def test_cli_anonymizes_and_restores_real_photos_exactly(tmp_path):
    """`keyface anonymize/restore --model <diffusers folder>` as a subprocess on real faces: every face verified
    exact (max abs error 0), and a prompt for this unconditional model is refused with a clear reason."""
    folder = save_tiny_ldm(tmp_path / "tiny-ldm")
    photos = photo_folder(tmp_path / "photos", ("obama.jpg", "biden.jpg"))
    keyface = keyface_cli
    assert keyface("keygen", tmp_path / "k.key").returncode == 0
    common = ["--key", tmp_path / "k.key", "--model", folder, "--no-progress"]
    run = keyface("anonymize", photos, "--out", tmp_path / "anon", *common, "--crop-size", 64, "--steps", 4)
    assert run.returncode == 0, run.stderr
    run = keyface("restore", tmp_path / "anon", "--out", tmp_path / "restored", *common)
    assert run.returncode == 0, run.stderr
    rows = json.loads((tmp_path / "restored.keyface-report.json").read_text())["images"]
    assert len(rows) == 2 and all(r["verified"] is True and r["max_abs_error"] == 0.0 for r in rows)
    run = keyface("anonymize", photos, "--out", tmp_path / "prompted", *common, "--crop-size", 64, "--steps", 4,
                  "--prompt", "a face")
    assert run.returncode != 0 and "unconditional" in (run.stderr + run.stdout)
