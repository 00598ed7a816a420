"""KeyFace latent nodes on a real ComfyUI host (CPU, seeded tiny SD1.5-architecture UNet)."""

from __future__ import annotations

import pytest
import torch


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def image_latent(tiny):
    _, vae, _ = tiny
    torch.manual_seed(0)
    return {"samples": vae.encode(torch.rand(1, 128, 128, 3)).detach()}


def test_every_node_registers(host):
    nodes, _ = host
    expected = {"KeyFaceLoadKey": "Load Key", "KeyFaceInvertToNoise": "Invert to Noise", "KeyFaceApplyKeyFlip": "Apply Key Flip",
                "KeyFaceRegenerate": "Regenerate", "KeyFaceRestore": "Restore", "KeyFaceFaceMask": "Face Mask",
                "KeyFaceCropFaces": "Crop Faces", "KeyFacePasteFaces": "Paste Faces",
                "KeyFaceSaveAnonymized": "Save Anonymized", "KeyFaceLoadAnonymized": "Load Anonymized",
                "KeyFaceRestorePhoto": "Restore Photo"}
    for node_id, name in expected.items():
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name


@pytest.mark.parametrize("prediction", ["eps", "v", "flow"])
def test_exact_restore_and_wrong_key(tiny, kf, key_pair, image_latent, prediction):
    models, _, _ = tiny
    model, (key, other) = models[prediction], key_pair
    C = kf.core_nodes
    noise, inv = C.invert_latent(model, image_latent, 20, "normal", "exact", 1.0)
    anonymized, regen = C.regenerate_latent(model, C.flip_latent(noise, key))
    restored, stats = C.restore_latent(model, anonymized, key)
    wrong, _ = C.restore_latent(model, anonymized, other, allow_wrong_key=True)
    error, wrong_error = rel(restored["samples"], image_latent["samples"]), rel(wrong["samples"], image_latent["samples"])
    print(f"\n[{prediction}] v2: anonymize calls {inv.model_calls} invert + {regen.model_calls} draw, restore calls "
          f"{stats['model_calls']}, restore error {error:.3g}, wrong key {wrong_error:.3g}, "
          f"anonymized differs by {rel(anonymized['samples'], image_latent['samples']):.3g}")
    assert torch.equal(restored["samples"], image_latent["samples"])     # measured: error 0
    assert stats["verification"].exact is True and stats["model_calls"] == 20  # restore = steps model calls
    assert wrong_error >= 0.5 and stats["verification"].message().startswith("verified exact")
    assert rel(anonymized["samples"], image_latent["samples"]) >= 0.5


@pytest.mark.parametrize("mode", ["plain", "exact_single"])
def test_other_inversion_modes_restore_approximately_and_say_so(tiny, kf, key_pair, image_latent, mode):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 10, "normal", mode, 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    restored, stats = C.restore_latent(models["eps"], anonymized, key_pair[0])
    error = rel(restored["samples"], image_latent["samples"])
    print(f"\n[{mode}] restore error {error:.3g}: {stats['verification'].message()}")
    assert stats["model_calls"] == 10
    if stats["verification"].exact is False:
        assert "differs from the original by" in stats["verification"].message()


def test_wrong_key_is_refused_without_opt_in(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    with pytest.raises(kf.errors.WrongKeyError) as err:
        C.restore_latent(models["eps"], anonymized, key_pair[1])
    assert "other.key" in str(err.value)


def test_restore_twice_is_refused(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    restored, _ = C.restore_latent(models["eps"], anonymized, key_pair[0])
    with pytest.raises(kf.errors.InputMismatchError, match="already restored"):
        C.restore_latent(models["eps"], restored, key_pair[0])


@pytest.mark.parametrize("scramble", ["pairswap", "signflip"])
def test_flip_is_an_exact_involution(tiny, kf, key_pair, image_latent, scramble):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    once = C.flip_latent(noise, key_pair[0], scramble=scramble)
    twice = C.flip_latent(once, key_pair[0])
    assert torch.equal(twice["samples"], noise["samples"])
    assert torch.equal(twice["keyface"].state.x, noise["keyface"].state.x)
    assert torch.equal(twice["keyface"].state.residual, noise["keyface"].state.residual)
    assert once["keyface"].state.residual is None and once["keyface"].lock.scramble == scramble
    changed = float((once["samples"] != noise["samples"]).float().mean())
    assert 0.4 < changed < 0.6 if scramble == "signflip" else changed > 0.95   # a sign flip keeps half in place


SAMPLERS = ["euler", "dpmpp_2m", "uni_pc", "euler_ancestral"]


@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_regenerate_equals_stock_sampler_custom_advanced(host, tiny, kf, key_pair, image_latent, sampler_name):
    """Regenerate is ComfyUI's own sampling: SamplerCustomAdvanced with the same model, conditioning, sigmas, noise
    (protocol.sampler_start_noise) and latent + noise_mask returns the same latent bit for bit."""
    nodes, _ = host
    import comfy.samplers
    from comfy_extras import nodes_custom_sampler as ncs
    models, _, clip = tiny
    model = models["eps"]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a face"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    C, P = kf.core_nodes, kf.protocol
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    noise, _ = C.invert_latent(model, image_latent, 8, "normal", "exact", 1.0, positive=cond, mask=mask)
    keyed = C.flip_latent(noise, key_pair[0])
    sampler = comfy.samplers.sampler_object(sampler_name)
    ours, _ = C.regenerate_latent(model, keyed, cond, negative, sampler, "karras", 8, 4.0, seed=7)
    info = keyed["keyface"]
    sigmas = C.adapter.sigmas_for(model, "karras", 8)
    start, background = P.sampler_start_noise(info.state.x, info.faces, float(info.settings.sigmas[0]), flow=False,
                                              max_denoise=C._max_denoise(model, float(sigmas[0])))

    class GivenNoise:
        seed = 7

        def generate_noise(self, latent):
            return start.to(torch.float32)
    guider = ncs.CFGGuider.execute(model, cond, negative, 4.0)[0]
    latent = {"samples": model.model.latent_format.process_out(background).to(torch.float32),
              "noise_mask": (info.faces.mask >= 0.5).to(torch.float32)}
    stock = ncs.SamplerCustomAdvanced.execute(GivenNoise(), guider, sampler, sigmas, latent)[0]
    assert torch.equal(stock["samples"], ours["samples"])


def test_mask_holds_the_background_and_restore_is_exact(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    noise, _ = C.invert_latent(models["eps"], image_latent, 20, "normal", "exact", 1.0, mask=mask)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    inside = (anonymized["keyface"].keyed.faces.mask >= 0.5).expand_as(image_latent["samples"])
    # Outside the mask the draw returns ComfyUI's latent_image (one float32 scale round trip).
    assert torch.allclose(anonymized["samples"][~inside], image_latent["samples"][~inside], rtol=1e-6, atol=1e-6)
    assert rel(anonymized["samples"][inside], image_latent["samples"][inside]) > 0.5
    restored, stats = C.restore_latent(models["eps"], anonymized, key_pair[0])
    assert torch.equal(restored["samples"], image_latent["samples"]) and stats["verification"].exact


def test_other_model_or_prompt_is_refused_at_restore(tiny, kf, key_pair, image_latent):
    models, _, clip = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    with pytest.raises(kf.errors.InputMismatchError, match="different model"):
        C.restore_latent(models["v"], anonymized, key_pair[0])
    other_prompt = clip.encode_from_tokens_scheduled(clip.tokenize("something else"))
    with pytest.raises(kf.errors.InputMismatchError, match="conditioning differs"):
        C.restore_latent(models["eps"], anonymized, key_pair[0], positive=other_prompt)


def test_the_new_face_may_be_drawn_with_another_prompt_and_cfg(tiny, kf, key_pair, image_latent):
    """The face is never inverted again, so Regenerate's prompt and cfg are free; Restore uses the inversion's."""
    models, _, clip = tiny
    C = kf.core_nodes
    face_prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a smiling person"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    noise, _ = C.invert_latent(models["eps"], image_latent, 6, "normal", "exact", 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]), face_prompt, negative,
                                        None, "karras", 6, 6.0)
    restored, stats = C.restore_latent(models["eps"], anonymized, key_pair[0])
    assert torch.equal(restored["samples"], image_latent["samples"]) and stats["model_calls"] == 6


def test_interrupt_stops_promptly_and_progress_is_reported(tiny, kf, image_latent):
    import comfy.model_management
    import comfy.utils
    models, _, _ = tiny
    C = kf.core_nodes
    ticks = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: ticks.append((value, total)))
    try:
        C.invert_latent(models["eps"], image_latent, 6, "normal", "exact", 1.0)
        assert ticks and ticks[-1][0] == ticks[-1][1] == 6
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            C.invert_latent(models["eps"], image_latent, 50, "normal", "exact", 1.0)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(previous)


def test_key_object_never_shows_its_bytes(kf, key_pair):
    key = key_pair[0]
    material = key._material
    for text in (str(key), repr(key), f"{key}", str([key]), str({"key": key})):
        assert material.hex() not in text.lower()
    with pytest.raises(TypeError):
        import pickle
        pickle.dumps(key)


def test_live_previews_like_ksampler(tiny, kf, key_pair, image_latent, monkeypatch):
    """With ComfyUI's --preview-method set, Invert/Regenerate send a preview image with each step, as KSampler does."""
    import comfy.utils
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod
    models, _, _ = tiny
    C = kf.core_nodes
    monkeypatch.setattr(latent_preview.args, "preview_method", LatentPreviewMethod.Latent2RGB)
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total, preview)))
    try:
        noise, _ = C.invert_latent(models["eps"], image_latent, 5, "normal", "exact", 1.0)
        C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]), steps=5)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert [v for v, _, _ in seen] == [1, 2, 3, 4, 5] * 2 and {t for _, t, _ in seen} == {5}
    fmt, image, size = seen[-1][2]
    assert fmt == "JPEG" and image.size[0] > 0


def test_load_key_reruns_when_the_secret_changes_and_its_cache_key_reveals_nothing(kf, monkeypatch):
    import hashlib
    L = kf.key_nodes.LoadKey
    value = "ab" * 32
    monkeypatch.setenv("KEYFACE_TEST_FP", value)
    first = L.fingerprint_inputs("environment variable", "", "KEYFACE_TEST_FP", "key")
    assert first == L.fingerprint_inputs("environment variable", "", "KEYFACE_TEST_FP", "key")
    for hidden in (value, hashlib.sha256(value.encode()).hexdigest()[:8]):
        assert hidden not in first
    monkeypatch.setenv("KEYFACE_TEST_FP", "cd" * 32)
    assert L.fingerprint_inputs("environment variable", "", "KEYFACE_TEST_FP", "key") != first
    on_disk = L.fingerprint_inputs("key file", "my_keyface.key", "", "key")
    assert "my_keyface.key" in on_disk and "missing" not in on_disk


def test_every_input_and_output_has_a_tooltip(kf):
    for module in (kf.core_nodes, kf.face_nodes, kf.key_nodes):
        for node in module.NODES:
            schema = node.define_schema()
            assert schema.node_id.startswith("KeyFace") and schema.description
            missing = [p.id for p in (*schema.inputs, *schema.outputs) if not getattr(p, "tooltip", None)]
            assert not missing, (schema.node_id, missing)


def test_comfyui_reads_the_pack_metadata(host):
    """ComfyUI (and the registry) parse pyproject.toml's [project] and [tool.comfy] with their own parser."""
    from pathlib import Path
    from comfy_config.config_parser import extract_node_configuration
    config = extract_node_configuration(str(Path(__file__).resolve().parents[1]))
    assert config is not None and config.project.name == "keyface" and config.project.version
    assert config.tool_comfy.publisher_id == "keyface" and config.tool_comfy.display_name.startswith("KeyFace")


def test_load_key_rereads_a_replaced_file_of_equal_size_and_mtime(kf):
    """Issue 13: a key file replaced by another of the same size with its mtime kept (`cp -p`, a sync tool) must
    change Load Key's cache fingerprint, so the new key is used; the fingerprint never holds the key itself."""
    import os
    from pathlib import Path
    keys = Path(os.environ["KEYFACE_KEYS_DIR"])
    path = keys / "swapped.key"
    first, second = "11" * 32, "22" * 32
    path.write_text(first + "\n")
    stamp = path.stat()
    L = kf.key_nodes.LoadKey
    before = L.fingerprint_inputs("key file", "swapped.key", "KEYFACE_KEY", "key")
    try:
        path.write_text(second + "\n")
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert path.stat().st_size == stamp.st_size and path.stat().st_mtime_ns == stamp.st_mtime_ns
        after = L.fingerprint_inputs("key file", "swapped.key", "KEYFACE_KEY", "key")
        assert before != after
        assert L.fingerprint_inputs("key file", "swapped.key", "KEYFACE_KEY", "key") == after   # stable while unchanged
        for fingerprint in (before, after):
            assert first not in fingerprint and second not in fingerprint
        loaded = L.execute("key file", "swapped.key", "KEYFACE_KEY", "key").args[0]
        nonce = b"n" * 16
        assert loaded.image_key(nonce) == kf.keys.load_key_file(path).image_key(nonce)   # the second key in use
    finally:
        path.unlink()
