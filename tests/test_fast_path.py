"""Each optimisation of the training fast path against the plain computation (tiny model, CPU).

Supervised-only logits vs full logits, uint8 tiles normalised on the device vs float tiles normalised
on the host, packed vs padded rows, gradient checkpointing per module vs none, and varlen attention:
on CPU, adapt.training.attention.varlen_attention runs through HF's AttentionInterface with a reference kernel
(per-sample SDPA) in place of the CUDA one, which checks what reaches the kernel (no mask, the packed
row's sample boundaries in every layer) and the result; the CPU kernel (sdpa_varlen) is checked against
attention written out from its definition and against HF's masked SDPA; the real GPU kernels (torch
varlen, flash_attn) run only under `-m gpu` on a GPU.
"""

from __future__ import annotations

import copy
import functools
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence

from adapt.checkpoints.models import load
from adapt.data.batching import Collator, per_sample_losses
from adapt.data.samples import SampleBuilder
from adapt.data.templates import Encoder
from adapt.data.tiling import IMAGENET_MEAN, IMAGENET_STD, TilingPolicy, normalize
from adapt.errors import AdaptError
from adapt.training.attention import (
    SDPA_VARLEN,
    TORCH_VARLEN,
    resolve_attn_implementation,
    sdpa_segments,
    torch_varlen_available,
    varlen_attention,
)
from adapt.training.trainer import (
    HostNormalized,
    TrainConfig,
    apply_tuning_mode,
    enable_gradient_checkpointing,
    resolve_workers,
    supervised_loss,
    train,
    varlen_kwargs,
)

GRAD_TOL = 1e-6
CPU_VARLEN = "adapt_cpu_varlen_reference"


def _record(i: int, image: str | None, question: str, answer: str) -> dict:
    record = {"id": f"r{i}", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = image
    return record


RECORDS = [
    _record(0, "a.png", "<image>\nWhat dominates this picture?", "Mostly noise in many colours."),
    _record(1, None, "What is two plus three?", "five"),
    _record(2, "b.jpg", "<image>\nDescribe it briefly.", "A gradient with grain, brighter to the right."),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CI shares two cores: OpenMP threads waiting on each other make these small ops many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(folder / "a.png")
    ramp = np.broadcast_to(np.linspace(0, 255, 448, dtype=np.uint8)[None, :, None], (300, 448, 3))
    Image.fromarray(np.clip(ramp + rng.integers(0, 30, (300, 448, 3)), 0, 255).astype(np.uint8)).save(folder / "b.jpg")
    return folder


@pytest.fixture(scope="module")
def samples(tiny, root):
    encoder = Encoder(tiny.tokenizer, tiny.template, tokens_per_tile=tiny.tokens_per_tile)
    builder = SampleBuilder(encoder, TilingPolicy(max_tiles=1), max_length=2048)
    return [builder.build(r, root, index=i) for i, r in enumerate(RECORDS)]


@pytest.fixture(scope="module")
def pristine():
    """A tiny model of this module's own (the session one may carry other tests' flags and grads)."""
    return load("tiny", seed=0).model


def _fresh_model(pristine):
    """A copy with untouched weights, flags and grads."""
    model = copy.deepcopy(pristine)
    model.train()  # checkpointing only acts in training mode; the tiny model has no dropout
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(model, batch, **kwargs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = supervised_loss(model, batch, None, **kwargs)
    loss.backward()
    return float(loss), _grads(model)


@pytest.fixture(scope="module")
def packed(tiny, samples):
    return Collator(tiny.tokenizer.pad_token_id, pack=True)(samples)


@pytest.fixture(scope="module")
def reference(pristine, packed):
    """The default fast path's loss and gradients on the packed row, which every variant must match."""
    return _loss_and_grads(_fresh_model(pristine), packed)


def _assert_same_grads(got: dict, expected: dict, tol: float = GRAD_TOL) -> None:
    assert got.keys() == expected.keys() and expected
    for name, value in expected.items():
        assert (got[name] - value).abs().max() <= tol, name


def test_supervised_logits_equal_full_logits(pristine, tiny, samples, packed, reference):
    model = _fresh_model(pristine)
    batch = packed
    loss_kept, grads_kept = reference
    loss_full, grads_full = _loss_and_grads(model, batch, logits="full")
    assert abs(loss_kept - loss_full) <= 1e-6
    _assert_same_grads(grads_kept, grads_full)
    # and both are the plain next-token CE over the supervised labels (token reduction here)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       pixel_values=normalize(batch["pixel_values"]), use_cache=False).logits
    token = Collator(tiny.tokenizer.pad_token_id, pack=True, loss_reduction="token")(samples)
    plain = F.cross_entropy(logits[0, :-1], token["labels"][0, 1:], ignore_index=-100)
    assert abs(float(supervised_loss(model, token, None)) - float(plain)) <= 1e-5


def test_device_normalisation_equals_host_float(pristine, tiny, samples, packed, reference):
    collator = Collator(tiny.tokenizer.pad_token_id, pack=True)
    batch = packed
    assert batch["pixel_values"].dtype == torch.uint8
    # the official host pipeline: ToTensor (x / 255) then Normalize((x - mean) / std), in float32
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    official = (batch["pixel_values"].float() / 255.0 - mean) / std
    host = HostNormalized(collator)(samples)
    assert host["pixel_values"].dtype == torch.float32
    assert (host["pixel_values"] - official).abs().max() <= 1e-5
    assert (normalize(batch["pixel_values"]) - official).abs().max() <= 1e-5
    loss_device, grads_device = reference
    loss_host, grads_host = _loss_and_grads(_fresh_model(pristine), {**batch, "pixel_values": official})
    assert abs(loss_device - loss_host) <= 1e-6
    _assert_same_grads(grads_device, grads_host)


def test_packed_training_loss_and_grads_equal_padded(pristine, tiny, samples, packed, reference):
    """The training loss itself (not only per-sample logits, see test_batching): one packed row and the
    padded batch give the same loss and gradients, with the square reduction the recipe uses."""
    padded = Collator(tiny.tokenizer.pad_token_id, pack=False)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    assert padded["input_ids"].shape[0] == len(samples)
    loss_packed, grads_packed = reference
    loss_padded, grads_padded = _loss_and_grads(_fresh_model(pristine), padded)
    assert abs(loss_packed - loss_padded) <= 1e-5
    _assert_same_grads(grads_packed, grads_padded, tol=1e-5)


@pytest.mark.parametrize("which", ["llm", "vision", "all"])
def test_gradient_checkpointing_variants_give_the_same_grads(pristine, packed, reference, which):
    _, plain = reference
    model = _fresh_model(pristine)
    enable_gradient_checkpointing(model, which)
    llm_layers = list(model.model.language_model.layers)
    vision_layers = list(model.model.vision_tower.encoder.layer)
    assert all(layer.gradient_checkpointing == (which in ("llm", "all")) for layer in llm_layers)
    assert all(layer.gradient_checkpointing == (which in ("vision", "all")) for layer in vision_layers)
    _, checkpointed = _loss_and_grads(model, packed)
    _assert_same_grads(checkpointed, plain)


def test_gradient_checkpointing_under_lora(pristine, packed):
    batch = packed
    config = TrainConfig(mode="lora", lora_r=4, lora_dropout=0.0, gradient_checkpointing="all")
    plain_model = apply_tuning_mode(_fresh_model(pristine), TrainConfig(mode="lora", lora_r=4, lora_dropout=0.0))
    torch.manual_seed(1)  # LoRA B starts at zero: give it values so the A gradients are not all zero
    for name, p in plain_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.02)
    state = {n: p.detach().clone() for n, p in plain_model.named_parameters()}
    _, plain = _loss_and_grads(plain_model, batch)
    model = apply_tuning_mode(_fresh_model(pristine), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name])
    enable_gradient_checkpointing(model, config.gradient_checkpointing)
    assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.language_model.layers)
    _, checkpointed = _loss_and_grads(model, batch)
    assert any("lora_A" in n for n in plain) and all("lora_" in n or "modules_to_save" in n for n in plain)
    _assert_same_grads(checkpointed, plain)


# ------------------------------------------------------------------------------------------------
# varlen attention: everything but the CUDA kernel on CPU, the kernels under `-m gpu`
# ------------------------------------------------------------------------------------------------
KERNEL_CALLS: list[dict] = []


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What torch.nn.attention.varlen.varlen_attn computes ((T, H, D) tensors, samples between the
    cu boundaries), as plain per-sample SDPA: stands in for the CUDA kernel on CPU."""
    KERNEL_CALLS.append({"cu": cu_q.tolist(), "max": max_q, "causal": window_size == (-1, 0), "tokens": q.shape[0]})
    assert cu_q is cu_k and max_q == max_k and cu_q.dtype == torch.int32
    out = torch.empty_like(q)
    for start, end in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
        out[start:end] = F.scaled_dot_product_attention(
            *(x[start:end].transpose(0, 1)[None] for x in (q, k, v)), is_causal=window_size == (-1, 0), scale=scale,
            enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


AttentionInterface.register(CPU_VARLEN, functools.partial(varlen_attention, kernel=reference_kernel))
AttentionMaskInterface.register(CPU_VARLEN, flash_attention_mask)  # as torch_varlen and flash_attention_2


def test_varlen_attention_on_a_packed_row(pristine, tiny, samples, packed, reference):
    """Every LLM layer gets no mask and the packed row's sample boundaries (computed once, by
    varlen_kwargs), the vision tower one non-causal segment per tile, and the loss and gradients
    equal SDPA's block-diagonal masking."""
    lengths = [len(s) for s in samples]
    boundaries = np.cumsum([0, *lengths]).tolist()
    assert _is_packed_sequence(packed["position_ids"], 1)  # HF's flash path would also go varlen
    assert varlen_kwargs(pristine, packed) == {}  # SDPA: a mask, no boundaries
    model = _fresh_model(pristine)
    model.set_attn_implementation(CPU_VARLEN)
    kwargs = varlen_kwargs(model, packed)
    assert kwargs["cu_seq_lens_q"].tolist() == boundaries and kwargs["max_length_q"] == max(lengths)
    KERNEL_CALLS.clear()
    loss, grads = _loss_and_grads(model, packed)
    text = [c for c in KERNEL_CALLS if c["causal"]]
    vision = [c for c in KERNEL_CALLS if not c["causal"]]
    assert len(text) == model.config.text_config.num_hidden_layers
    assert all(c["cu"] == boundaries and c["max"] == max(lengths) for c in text)
    tiles = packed["pixel_values"].shape[0]
    assert len(vision) == model.config.vision_config.num_hidden_layers
    assert all(c["cu"] == [1025 * i for i in range(tiles + 1)] for c in vision)
    loss_sdpa, grads_sdpa = reference
    assert abs(loss - loss_sdpa) <= 1e-5
    _assert_same_grads(grads, grads_sdpa, tol=1e-5)
    # the boundaries also reach the layers through checkpointing's recomputation
    enable_gradient_checkpointing(model, "all")
    KERNEL_CALLS.clear()
    _, checkpointed = _loss_and_grads(model, packed)
    text = [c for c in KERNEL_CALLS if c["causal"]]
    assert len(text) == 2 * model.config.text_config.num_hidden_layers  # forward, then recomputed
    assert all(c["cu"] == boundaries for c in text)
    _assert_same_grads(checkpointed, grads)


def test_varlen_attention_on_a_padded_batch(pristine, tiny, samples):
    """Padded rows (pack: false) go through the same implementation, unpadded by their mask."""
    padded = Collator(tiny.tokenizer.pad_token_id, pack=False)(samples)
    assert not padded["attention_mask"].all()
    loss_sdpa, grads_sdpa = _loss_and_grads(_fresh_model(pristine), padded)
    model = _fresh_model(pristine)
    model.set_attn_implementation(CPU_VARLEN)
    assert varlen_kwargs(model, padded) == {}
    KERNEL_CALLS.clear()
    loss, grads = _loss_and_grads(model, padded)
    lengths = padded["attention_mask"].sum(-1).tolist()
    assert [c["cu"] for c in KERNEL_CALLS if c["causal"]][0] == np.cumsum([0, *lengths]).tolist()
    assert abs(loss - loss_sdpa) <= 1e-5
    _assert_same_grads(grads, grads_sdpa, tol=1e-5)


def test_train_uses_varlen_and_restores_the_model(root, tmp_path):
    entries = [(r, str(root)) for r in RECORDS]
    loaded = load("tiny", seed=0)
    KERNEL_CALLS.clear()
    config = TrainConfig(max_steps=1, dataloader_num_workers=0, save_steps=100, pack_tokens=2048, max_tiles=1,
                         attn_implementation=CPU_VARLEN)
    train(loaded, entries, config, tmp_path / "run", progress=False)
    assert any(c["causal"] and len(c["cu"]) == len(RECORDS) + 1 for c in KERNEL_CALLS)  # the packed row
    assert loaded.model.config.text_config._attn_implementation == "sdpa"  # back as loaded, for generation


def _attention_by_definition(q, k, v, lengths, causal, scale):
    """softmax(q k^T * scale + mask) v over a (tokens, heads, dim) row, the mask allowing only pairs in
    the same sample (and not later ones, if causal); key/value heads repeated for grouped queries."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = sample[:, None] == sample[None, :]
    if causal:
        allowed &= torch.ones(len(sample), len(sample), dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v.double())


@pytest.mark.parametrize("lengths", [[5, 1, 9, 3], [7, 7, 7], [12]])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_segments_is_attention_within_each_sample(lengths, causal):
    """The CPU kernel against attention computed from its definition: packed samples of mixed and
    equal lengths (the batched path), causal (LLM) and not (vision), grouped key/value heads."""
    gen = torch.Generator().manual_seed(sum(lengths))
    total, scale = sum(lengths), 0.3
    q = torch.randn(total, 4, 8, generator=gen)
    k, v = (torch.randn(total, 2, 8, generator=gen) for _ in range(2))
    cu = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32)
    out = sdpa_segments(q, k, v, cu, cu, max(lengths), max(lengths), scale=scale,
                        window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True)
    expected = _attention_by_definition(q, k, v, lengths, causal, scale)
    assert out.shape == q.shape and torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("pack", [True, False])
def test_sdpa_varlen_equals_masked_sdpa(pristine, tiny, samples, pack):
    """The CPU training default on the tiny model: the loss and gradients of a packed row (and of a
    padded batch) equal HF's SDPA with its mask."""
    batch = Collator(tiny.tokenizer.pad_token_id, pack=pack)(samples)
    loss_sdpa, grads_sdpa = _loss_and_grads(_fresh_model(pristine), batch)
    model = _fresh_model(pristine)
    model.set_attn_implementation(SDPA_VARLEN)
    assert bool(varlen_kwargs(model, batch)) == pack  # boundaries for a packed row, the mask for padding
    loss, grads = _loss_and_grads(model, batch)
    assert abs(loss - loss_sdpa) <= 1e-5
    # attention's gradient to the key bias is zero by the softmax's shift invariance: rounding only
    _assert_same_grads({n: g for n, g in grads.items() if not n.endswith("k_proj.bias")},
                       {n: g for n, g in grads_sdpa.items() if not n.endswith("k_proj.bias")}, tol=1e-5)


def test_attention_choice_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: covered by the gpu tests")
    for precision_is_half in (True, False):
        assert resolve_attn_implementation("auto", precision_is_half) == SDPA_VARLEN
    assert resolve_attn_implementation("eager") == "eager"


GPU_KERNELS = [
    pytest.param(TORCH_VARLEN, marks=pytest.mark.skipif(not torch_varlen_available(),
                                                        reason="needs a CUDA GPU (sm80+) and torch varlen")),
    pytest.param("flash_attention_2", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
        reason="needs a CUDA GPU with flash_attn installed")),
]


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", GPU_KERNELS)
def test_gpu_varlen_packed_equals_one_by_one(tiny, samples, implementation):
    """The real kernels: a packed row's per-sample losses equal each sample run alone under SDPA,
    and the backward runs."""
    assert resolve_attn_implementation("auto") in ("flash_attention_2", TORCH_VARLEN)
    model = load("tiny", seed=0, dtype="bf16").model.cuda()
    pad_id = tiny.tokenizer.pad_token_id

    def forward(batch):
        batch = {k: v.cuda() for k, v in batch.items()}
        inputs = {k: batch[k] for k in ("input_ids", "position_ids") if k in batch}
        if "pixel_values" in batch:
            inputs["pixel_values"] = normalize(batch["pixel_values"], torch.bfloat16)
        logits = model(**inputs, **varlen_kwargs(model, batch), use_cache=False).logits
        return logits, batch

    alone = {}
    with torch.no_grad():
        for i, sample in enumerate(samples):
            logits, batch = forward(Collator(pad_id, pack=True)([sample]))
            alone[i] = per_sample_losses(logits, batch["labels"], batch["sample_index"])[0]
    model.set_attn_implementation(implementation)
    logits, batch = forward(Collator(pad_id, pack=True)(samples))
    together = per_sample_losses(logits.detach(), batch["labels"], batch["sample_index"])
    for i in alone:
        assert abs(together[i] - alone[i]) < 3e-2, (i, together[i], alone[i])
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------
# switches and defaults
# ------------------------------------------------------------------------------------------------
def test_config_choices():
    assert TrainConfig.from_dict({"gradient_checkpointing": True}).gradient_checkpointing == "all"
    assert TrainConfig.from_dict({"gradient_checkpointing": False}).gradient_checkpointing == "none"
    assert TrainConfig.from_dict({"gradient_checkpointing": "llm", "logits": "full",
                                  "normalize": "host"}).gradient_checkpointing == "llm"
    for bad, message in [({"gradient_checkpointing": "some"}, "unknown gradient_checkpointing choice 'some'"),
                         ({"logits": "kept"}, "unknown logits choice 'kept'"),
                         ({"normalize": "gpu"}, "unknown normalize choice 'gpu'"),
                         ({"dataloader_num_workers": -1}, "dataloader_num_workers: input should be greater than or equal to 0")]:
        with pytest.raises(AdaptError, match=message):
            TrainConfig.from_dict(bad)


def test_workers_default(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_workers(0, cuda=True, cpus=64) == 0 and resolve_workers(3, cuda=True, cpus=64) == 3
    assert resolve_workers(None, cuda=False, cpus=64) == 2
    assert resolve_workers(None, cuda=False, cpus=2) == 1  # the other core is the model's
    assert resolve_workers(None, cuda=False, cpus=1) == 0  # a run pinned to one core
    assert resolve_workers(None, cuda=True, cpus=64) == 8
    assert resolve_workers(None, cuda=True, cpus=6) == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve_workers(None, cuda=True, cpus=16) == 4
    assert resolve_workers(None, cuda=True, cpus=2) == 1


def test_train_switches_do_not_change_the_first_loss(root, tmp_path):
    """Through `train`: full logits, host normalisation and checkpointing everywhere give the first
    step's loss of the default fast path (same data, same init)."""
    entries = [(r, str(root)) for r in RECORDS]
    first = []
    plain = {"logits": "full", "normalize": "host", "gradient_checkpointing": "all", "dataloader_pin_memory": False}
    for name, options in [("fast", {}), ("plain", plain)]:
        config = TrainConfig(max_steps=1, dataloader_num_workers=0, logging_steps=1, save_steps=100, learning_rate=1e-3,
                             warmup_steps=0.0, pack_tokens=2048, **options)
        result = train(load("tiny", seed=0), entries, config, tmp_path / name, progress=False)
        first.append(next(row["loss"] for row in result.log_history if "loss" in row))
    assert first[0] == pytest.approx(first[1], rel=1e-5)
