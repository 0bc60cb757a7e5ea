"""advgrpo.trainer.pipeline: the tiny SD3 pipeline, loading, LoRA (wrap, disable, save/load) and encode/decode."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import StableDiffusion3Pipeline  # noqa: E402

from advgrpo.trainer.pipeline import (  # noqa: E402
    TINY_IMAGE_SIZE,
    LoraSettings,
    ModelLoadError,
    add_lora,
    build_tiny_sd3_pipeline,
    decode_latents,
    encode_negative_prompt,
    encode_prompts,
    load_lora,
    load_sd3_pipeline,
    lora_disabled,
    lora_wrapped_modules,
    save_lora,
)

SEQ = 16  # T5 tokens, as in the tiny preset
PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Block 1 is the last block: context_pre_only, so its attention has no to_add_out.
EXPECTED_WRAPPED = sorted(
    [f"transformer_blocks.0.attn.{m}" for m in PROJECTIONS]
    + [f"transformer_blocks.1.attn.{m}" for m in PROJECTIONS if m != "to_add_out"]
)


def tiny(seed: int = 0) -> StableDiffusion3Pipeline:
    pipeline = build_tiny_sd3_pipeline(seed)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def module_states(pipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {k: v.state_dict() for k, v in pipeline.components.items() if isinstance(v, torch.nn.Module)}


def assert_same_weights(a, b) -> None:
    sa, sb = module_states(a), module_states(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].keys() == sb[name].keys(), name
        for key in sa[name]:
            assert torch.equal(sa[name][key], sb[name][key]), f"{name}.{key}"


def transformer_out(pipeline, seed: int = 0) -> torch.Tensor:
    """The transformer's velocity on fixed random inputs (batch 2, two timesteps)."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipeline.transformer.config
    size = cfg.sample_size
    with torch.no_grad():
        return pipeline.transformer(
            hidden_states=torch.randn(2, cfg.in_channels, size, size, generator=g),
            timestep=torch.tensor([900.0, 300.0]),
            encoder_hidden_states=torch.randn(2, 20, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
            return_dict=False,
        )[0]


def perturb(params, seed: int = 1, scale: float = 0.05) -> None:
    """Stands in for training: moves every LoRA weight (B included, so the adapter is no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- tiny pipeline


def test_tiny_pipeline_is_deterministic_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    a, b = tiny(0), tiny(0)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_weights(a, b)
    other = module_states(tiny(1))["transformer"]
    assert any(not torch.equal(v, other[k]) for k, v in module_states(a)["transformer"].items())
    assert all(not m.training for m in a.components.values() if isinstance(m, torch.nn.Module))


def test_tiny_pipeline_samples_end_to_end():
    pipeline = tiny()
    assert pipeline.vae_scale_factor * pipeline.transformer.config.sample_size == TINY_IMAGE_SIZE
    out = pipeline(
        prompt=["a red dog", "the cat"],
        num_inference_steps=2,
        guidance_scale=4.5,
        max_sequence_length=SEQ,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert out.images.min() >= 0 and out.images.max() <= 1
    # Other sizes work too (the position grid goes up to 64x64 latents).
    out = pipeline(
        prompt="a cat", num_inference_steps=2, height=64, width=48, max_sequence_length=SEQ, output_type="np"
    )
    assert out.images.shape == (1, 64, 48, 3)


def test_tokenizers_really_tokenize():
    pipeline = tiny()
    assert pipeline.tokenizer_3.tokenize("a photo of the cat")[:3] == ["▁a", "▁photo", "▁of"]
    ids = pipeline.tokenizer_3("the cat").input_ids
    assert ids[-1] == pipeline.tokenizer_3.eos_token_id and pipeline.tokenizer_3.unk_token_id not in ids
    assert "cat</w>" in pipeline.tokenizer.tokenize("the cat")  # a BPE merge


# ---------------------------------------------------------------- LoRA


def test_add_lora_wraps_the_joint_attention_projections_and_trains_only_them():
    transformer = tiny().transformer
    params = add_lora(transformer, LoraSettings())
    assert lora_wrapped_modules(transformer) == EXPECTED_WRAPPED  # SD3.5's attn2 stays unwrapped
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in transformer.named_parameters() if any(p is q for q in params)}
    assert len(params) == 2 * len(EXPECTED_WRAPPED)
    assert all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert to_q.r["default"] == 32 and to_q.scaling["default"] == 64 / 32
    assert to_q.lora_A["default"].weight.shape == (32, to_q.in_features)


def test_lora_starts_as_identity_and_disabling_gives_the_base_model():
    pipeline = tiny()
    base = transformer_out(pipeline)
    params = add_lora(pipeline.transformer)
    assert torch.equal(transformer_out(pipeline), base)  # gaussian init: B = 0
    perturb(params)
    trained = transformer_out(pipeline)
    assert not torch.allclose(trained, base, atol=1e-4)

    with lora_disabled(pipeline.transformer):
        assert torch.equal(transformer_out(pipeline), base)
    assert torch.equal(transformer_out(pipeline), trained)
    assert all(p.requires_grad for p in params)

    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(pipeline.transformer):
            raise RuntimeError("boom")
    assert torch.equal(transformer_out(pipeline), trained)

    # Frozen adapters stay frozen (peft's enable_adapters would mark them trainable again).
    for p in params:
        p.requires_grad_(False)
    with lora_disabled(pipeline.transformer):
        with lora_disabled(pipeline.transformer):  # nesting keeps it off until the outer block ends
            pass
        assert torch.equal(transformer_out(pipeline), base)
    assert not any(p.requires_grad for p in params)
    assert torch.equal(transformer_out(pipeline), trained)


def test_lora_trains_in_fp32_on_a_bf16_base():
    pipeline = load_sd3_pipeline("tiny", dtype="bfloat16", device="cpu")
    params = add_lora(pipeline.transformer)
    assert {p.dtype for p in params} == {torch.float32}
    assert pipeline.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.dtype == torch.bfloat16
    cfg = pipeline.transformer.config
    out = pipeline.transformer(
        hidden_states=torch.randn(1, cfg.in_channels, 8, 8, dtype=torch.bfloat16),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 20, cfg.joint_attention_dim, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, dtype=torch.bfloat16),
        return_dict=False,
    )[0]
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_saved_lora_loads_with_diffusers_into_a_fresh_pipeline(tmp_path):
    pipeline = tiny()
    perturb(add_lora(pipeline.transformer))
    trained = transformer_out(pipeline)
    save_lora(pipeline, tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    # The path advgrpo-generate takes: a plain diffusers load. The saved alpha (64, not the rank)
    # must come back, or the adapter would act at half strength.
    fresh = tiny()
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(transformer_out(fresh), trained, rtol=0, atol=1e-6)

    again = tiny()
    load_lora(again, tmp_path / "lora", adapter_name="grpo")
    torch.testing.assert_close(transformer_out(again), trained, rtol=0, atol=1e-6)

    def sample(p):
        return p(
            prompt="a cat",
            num_inference_steps=2,
            max_sequence_length=SEQ,
            output_type="np",
            generator=torch.Generator().manual_seed(3),
        ).images

    assert abs(sample(pipeline) - sample(fresh)).max() < 1e-5


# ---------------------------------------------------------------- prompts and latents


def test_encode_prompts_and_the_negative_prompt():
    pipeline = tiny()
    embeds, pooled = encode_prompts(pipeline, ["a cat", "the red dog", ""], device="cpu", max_sequence_length=SEQ)
    assert embeds.shape == (3, 77 + SEQ, 96)  # CLIP tokens (padded to T5's width) then T5 tokens
    assert pooled.shape == (3, 32 + 48)
    assert not torch.equal(embeds[0], embeds[1])

    neg, neg_pooled = encode_negative_prompt(pipeline, device="cpu", max_sequence_length=SEQ, batch_size=2)
    assert neg.shape == (2, 77 + SEQ, 96) and neg_pooled.shape == (2, 80)
    torch.testing.assert_close(neg[0], embeds[2], rtol=0, atol=0)
    # The same as what the pipeline's CFG branch computes for its default negative prompt (under
    # no_grad, as in the pipeline: T5 with autograd on differs in the last bit).
    with torch.no_grad():
        _, ref_neg, _, ref_neg_pooled = pipeline.encode_prompt(
            "a cat", None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=SEQ
        )
    assert torch.equal(neg[:1], ref_neg) and torch.equal(neg_pooled[:1], ref_neg_pooled)


def test_decode_latents_matches_the_pipelines_own_decoding():
    pipeline = tiny()

    def sample(output_type):
        return pipeline(
            prompt=["a cat", "a dog"],
            num_inference_steps=2,
            max_sequence_length=SEQ,
            output_type=output_type,
            generator=torch.Generator().manual_seed(0),
        ).images

    latents = sample("latent")
    assert latents.shape == (2, 16, 8, 8)
    images = decode_latents(pipeline, latents)
    assert images.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, sample("pt"), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loading


def test_load_sd3_pipeline_from_a_saved_directory_is_frozen(tmp_path):
    tiny(0).save_pretrained(tmp_path / "sd3")
    pipeline = load_sd3_pipeline(str(tmp_path / "sd3"), dtype=torch.float32, device="cpu")
    assert_same_weights(pipeline, tiny(0))
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            assert not any(p.requires_grad for p in module.parameters())
    assert pipeline.tokenizer_3.tokenize("a cat") == tiny().tokenizer_3.tokenize("a cat")

    built = load_sd3_pipeline("tiny", dtype="bfloat16", device="cpu", seed=0)
    assert built.transformer.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in built.transformer.parameters())


@pytest.mark.parametrize("name", ["/nonexistent/sd3-model", "./runs/missing", "runs/a/b"])
def test_load_sd3_pipeline_missing_path_is_a_clear_error(name):
    with pytest.raises(ModelLoadError, match="no such directory") as err:
        load_sd3_pipeline(name, dtype="float32", device="cpu")
    assert repr(name) in str(err.value)


def test_load_sd3_pipeline_rejects_a_directory_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_sd3_pipeline(str(tmp_path), dtype="float32", device="cpu")
