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
                "KeyFaceSaveAnonymized": "Save Anonymized", "KeyFaceLoadAnonymized": "Load Anonymized"}
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
    restored, calls = C.restore_latent(model, anonymized, key)
    wrong, _ = C.restore_latent(model, anonymized, other, allow_wrong_key=True)
    error, wrong_error = rel(restored["samples"], image_latent["samples"]), rel(wrong["samples"], image_latent["samples"])
    print(f"\n[{prediction}] exact: anonymize calls {inv.model_calls}+{regen.model_calls}, restore calls "
          f"{calls['invert_calls']}+{calls['regenerate_calls']}, restore error {error:.3g}, wrong key {wrong_error:.3g}, "
          f"anonymized differs by {rel(anonymized['samples'], image_latent['samples']):.3g}")
    assert error <= 1e-4
    assert wrong_error >= 0.5
    assert rel(anonymized["samples"], image_latent["samples"]) >= 0.5
    assert calls["invert_calls"] + calls["regenerate_calls"] <= 60


def test_plain_mode_is_approximate(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    errors = {}
    for mode in ("plain", "exact"):
        noise, _ = C.invert_latent(models["eps"], image_latent, 20, "normal", mode, 1.0)
        out, _ = C.regenerate_latent(models["eps"], noise)
        errors[mode] = rel(out["samples"], image_latent["samples"])
    print(f"\nround trip without key, 20 steps: plain {errors['plain']:.3g}, exact {errors['exact']:.3g}")
    assert errors["exact"] <= 1e-6 < errors["plain"]


def test_wrong_key_is_refused_without_opt_in(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    with pytest.raises(kf.errors.WrongKeyError) as err:
        C.restore_latent(models["eps"], anonymized, key_pair[1])
    assert "other.key" in str(err.value)


def test_flip_is_an_exact_involution(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    twice = C.flip_latent(C.flip_latent(noise, key_pair[0]), key_pair[0])
    assert torch.equal(twice["samples"], noise["samples"])
    assert torch.equal(twice["keyface"].state, noise["keyface"].state)
    assert torch.equal(twice["keyface"].second, noise["keyface"].second)
    once = C.flip_latent(noise, key_pair[0])
    assert 0.4 < float((once["samples"] != noise["samples"]).float().mean()) < 0.6


@pytest.mark.parametrize("mode", ["plain", "exact_single"])
def test_noise_works_in_stock_ksampler_advanced(host, tiny, kf, image_latent, mode):
    nodes, _ = host
    models, _, clip = tiny
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a face"))
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 10, "normal", mode, 1.0, positive=cond)
    ours, _ = C.regenerate_latent(models["eps"], noise, positive=cond)
    stock = nodes.KSamplerAdvanced().sample(models["eps"], "disable", 0, 10, 1.0, "euler", "normal", cond, cond,
                                            {"samples": noise["samples"]}, 0, 10000, "disable")[0]
    assert torch.equal(stock["samples"], ours["samples"])


def test_mask_holds_the_background_exactly(tiny, kf, key_pair, image_latent):
    models, _, _ = tiny
    C = kf.core_nodes
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    noise, _ = C.invert_latent(models["eps"], image_latent, 20, "normal", "exact", 1.0, mask=mask)
    anonymized, _ = C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
    inside = anonymized["keyface"].mask.bool().expand_as(image_latent["samples"])
    original_state = models["eps"].model.latent_format.process_in(image_latent["samples"].double())
    assert torch.equal(anonymized["keyface"].state[~inside], original_state[~inside])
    assert rel(anonymized["samples"][inside], image_latent["samples"][inside]) > 0.5
    restored, _ = C.restore_latent(models["eps"], anonymized, key_pair[0])
    assert rel(restored["samples"], image_latent["samples"]) <= 1e-4


def test_other_model_or_prompt_is_refused(tiny, kf, key_pair, image_latent):
    models, _, clip = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 4, "normal", "exact", 1.0)
    with pytest.raises(kf.errors.InputMismatchError, match="different model"):
        C.regenerate_latent(models["v"], noise)
    other_prompt = clip.encode_from_tokens_scheduled(clip.tokenize("something else"))
    with pytest.raises(kf.errors.InputMismatchError, match="conditioning differs"):
        C.regenerate_latent(models["eps"], noise, positive=other_prompt)


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
        C.regenerate_latent(models["eps"], C.flip_latent(noise, key_pair[0]))
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
    for module in (kf.core_nodes, kf.face_nodes):
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


def test_exact_residual_is_sealed_not_flipped(tiny, kf, key_pair, image_latent):
    """Apply Key Flip seals the exact method's residual (the new face starts from zero) and unseals it on the way back;
    a wrong key unseals nothing, so a wrong-key restore is a clean other face, never NaN."""
    import numpy as np
    models, _, _ = tiny
    C = kf.core_nodes
    noise, _ = C.invert_latent(models["eps"], image_latent, 6, "normal", "exact", 1.0)
    residual = noise["keyface"].second
    assert residual.abs().max() > 0
    once = C.flip_latent(noise, key_pair[0])
    info = once["keyface"]
    assert torch.equal(info.second, torch.zeros_like(residual)) and info.sealed is not None
    plain_bytes = np.ascontiguousarray(residual[0].numpy(), dtype="<f8").view(np.uint8).reshape(-1)
    assert info.sealed[0].shape == plain_bytes.shape and np.mean(info.sealed[0] == plain_bytes) < 0.05
    anonymized, _ = C.regenerate_latent(models["eps"], once)
    assert anonymized["keyface"].sealed is info.sealed
    restored, _ = C.restore_latent(models["eps"], anonymized, key_pair[0])
    assert torch.equal(restored["samples"], image_latent["samples"]) or rel(restored["samples"], image_latent["samples"]) < 1e-6
    wrong, _ = C.restore_latent(models["eps"], anonymized, key_pair[1], allow_wrong_key=True)
    assert torch.isfinite(wrong["samples"]).all() and rel(wrong["samples"], image_latent["samples"]) > 0.5


def test_images_from_before_sealing_still_restore(tiny, kf, key_pair, image_latent, tmp_path):
    """An exact-method PNG saved when the residual was flipped (no sealed residual stored) restores exactly."""
    import numpy as np
    models, _, _ = tiny
    C, F, M = kf.core_nodes, kf.face_nodes, kf.metadata
    noise, _ = C.invert_latent(models["eps"], image_latent, 6, "normal", "exact", 1.0)
    legacy = C.make_latent(noise, noise["samples"],
                           noise["keyface"].with_(extra={**noise["keyface"].extra, "legacy_residual": True}))
    flipped = C.flip_latent(legacy, key_pair[0])
    assert flipped["keyface"].sealed is None and flipped["keyface"].second.abs().max() > 0
    anonymized, _ = C.regenerate_latent(models["eps"], flipped)
    size = 8 * image_latent["samples"].shape[-1]
    faces = F.FaceSet((size, size), size, (F.FaceRegion(0, (0, 0, size), torch.ones(size, size)),))
    record = F.build_record(faces, anonymized["keyface"], True)
    assert "sealed_residual" not in record.faces[0].payload
    M.write_png_atomic(tmp_path / "legacy.png", np.zeros((size, size, 3), np.uint8), record)
    _, stored_record, _ = M.read_png(tmp_path / "legacy.png")
    stored, _, exact = F.record_to_inputs(stored_record, torch.zeros(1, size, size, 3))
    assert exact and stored["keyface"].extra["legacy_residual"]
    restored, _ = C.restore_latent(models["eps"], stored, key_pair[0])
    assert rel(restored["samples"], image_latent["samples"]) < 1e-6
