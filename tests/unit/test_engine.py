"""The engine on a tiny random Llama: batching, KV export/import, sampling, bad input."""

from __future__ import annotations

import random

import pytest
import torch

from tests.factories import make_tiny_model
from tests.factories import run_engine as run
from tideserve.config import EngineConfig
from tideserve.engine.engine import LLMEngine
from tideserve.engine.llm import LLM
from tideserve.engine.sequence import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def make_engine(path, **kw) -> LLMEngine:
    kw.setdefault("kv_cache_bytes", 1 << 22)
    return LLMEngine.from_config(EngineConfig(model=str(path), **kw))


def assert_no_leak(engine: LLMEngine) -> None:
    assert engine.num_free_blocks == engine.num_total_blocks
    assert not engine.seqs and not engine.has_unfinished()


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy_outputs(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    """Runs every prompt greedily to `max_tokens` on `engine`; its outputs by request id."""
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=max_tokens, **GREEDY))
    out = run(engine)
    assert_no_leak(engine)
    return out


def test_batch_invariance_with_chunked_prefill(tiny_model_dir):
    prompts = random_prompts(16)
    alone = make_engine(tiny_model_dir, max_num_batched_tokens=512)
    expected = []
    for i, p in enumerate(prompts):
        alone.add_request(f"a{i}", p, SamplingParams(max_tokens=12, **GREEDY))
        expected.append(run(alone)[f"a{i}"])
    batched = make_engine(tiny_model_dir, max_num_batched_tokens=40)  # forces chunking
    for i, p in enumerate(prompts):
        batched.add_request(f"b{i}", p, SamplingParams(max_tokens=12, **GREEDY))
    got = run(batched)
    assert [got[f"b{i}"] for i in range(16)] == expected
    assert_no_leak(batched)


def test_preemption_under_a_tiny_kv_budget_gives_same_tokens(tiny_model_dir):
    prompts = random_prompts(6, seed=3, lo=20, hi=40)
    roomy = make_engine(tiny_model_dir)
    small = make_engine(tiny_model_dir, kv_cache_bytes=14 * 16 * 2 * 2 * 2 * 16 * 4)  # 14 blocks
    for e in (roomy, small):
        for i, p in enumerate(prompts):
            e.add_request(f"r{i}", p, SamplingParams(max_tokens=30, **GREEDY))
    expected, got = run(roomy), run(small)
    assert got == expected
    assert small.scheduler.num_preemptions > 0
    assert_no_leak(small)


def test_kv_export_import_continues_identically(tiny_model_dir):
    prompt = random_prompts(1, seed=7, lo=50, hi=50)[0]
    ref = make_engine(tiny_model_dir)
    ref.add_request("ref", prompt, SamplingParams(max_tokens=20, **GREEDY))
    expected = run(ref)["ref"]

    src = make_engine(tiny_model_dir)
    src.add_request("x", prompt, SamplingParams(max_tokens=5, **GREEDY), hold_kv=True)
    first = run(src)["x"]
    n_kv = src.kv_num_tokens("x")
    assert n_kv == len(prompt) + 4  # the last sampled token has no KV yet
    layers = [src.export_kv_layer("x", layer) for layer in range(src.model_config.num_layers)]
    src.release("x")
    assert_no_leak(src)

    dst = make_engine(tiny_model_dir, max_num_batched_tokens=64)
    assert dst.begin_import("x", prompt, first, n_kv, SamplingParams(max_tokens=20, **GREEDY))
    for layer, kv in enumerate(layers):
        dst.import_kv_layer("x", layer, kv)
    dst.finish_import("x")
    assert run(dst)["x"] == expected
    assert_no_leak(dst)


def test_abort_during_import_frees_blocks(tiny_model_dir):
    dst = make_engine(tiny_model_dir)
    assert dst.begin_import("y", [5] * 40, [6], 40, SamplingParams(max_tokens=4))
    assert dst.num_free_blocks < dst.num_total_blocks
    dst.import_kv_layer("y", 0, torch.zeros(2, 2, 40, 16))
    assert dst.abort("y")
    assert_no_leak(dst)


def test_abort_running_request_frees_blocks(tiny_model_dir):
    e = make_engine(tiny_model_dir)
    e.add_request("a", [4] * 30, SamplingParams(max_tokens=50, **GREEDY))
    e.add_request("b", [5] * 10, SamplingParams(max_tokens=3, **GREEDY))
    e.step()
    e.step()
    assert e.abort("a") and not e.abort("nope")
    assert "b" in run(e)
    assert_no_leak(e)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir):
    e = make_engine(tiny_model_dir)
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    e.add_request("s1", [7, 8, 9], sp)
    alone = run(e)["s1"]
    e.add_request("s2", [7, 8, 9], sp)
    for i, p in enumerate(random_prompts(4, seed=9)):
        e.add_request(f"noise{i}", p, SamplingParams(max_tokens=16, temperature=1.0))
    assert run(e)["s2"] == alone
    e.add_request("s3", [7, 8, 9], SamplingParams(max_tokens=16, temperature=1.0, seed=99))
    assert run(e)["s3"] != alone
    assert_no_leak(e)


def test_top_k_one_equals_greedy_and_logprobs(tiny_model_dir):
    e = make_engine(tiny_model_dir)
    e.add_request("g", [3, 4, 5], SamplingParams(max_tokens=8, logprobs=2, **GREEDY))
    e.add_request(
        "k", [3, 4, 5], SamplingParams(max_tokens=8, temperature=0.8, top_k=1, ignore_eos=True)
    )
    outs = {}
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs["g"].token_ids == outs["k"].token_ids
    lps = outs["g"].logprobs
    assert len(lps) == 8
    for tok, lp in zip(outs["g"].token_ids, lps):
        assert max(lp, key=lp.get) == tok and lp[tok] <= 0.0 and len(lp) == 2


def test_sharded_checkpoint_and_dummy_weights(tmp_path):
    sharded = make_tiny_model(tmp_path / "sharded", shards=3)
    single = make_tiny_model(tmp_path / "single")
    prompts = random_prompts(3, seed=5)
    outs = []
    for path in (sharded, single):
        e = make_engine(path)
        for i, p in enumerate(prompts):
            e.add_request(str(i), p, SamplingParams(max_tokens=6, **GREEDY))
        outs.append(run(e))
    assert outs[0] == outs[1]
    dummy = make_engine(single, load_format="dummy")
    dummy.add_request("d", prompts[0], SamplingParams(max_tokens=4, **GREEDY))
    assert len(run(dummy)["d"]) == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(tiny_model_dir, dtype):
    e = make_engine(tiny_model_dir, dtype=dtype)
    e.add_request("h", [3, 4, 5, 6], SamplingParams(max_tokens=5, **GREEDY))
    assert len(run(e)["h"]) == 5
    assert e.runner.kv.tensor.dtype == getattr(torch, dtype)


def test_bad_input_is_a_clear_error(tiny_model_dir, tmp_path):
    llm = LLM(model=str(tiny_model_dir), kv_cache_bytes=1 << 22)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="empty"):
        llm.engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-3)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([[5] * 300])
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        llm.generate([[5, 100000]])
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate([[5]], [SamplingParams(), SamplingParams()])
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        LLM(model=str(tmp_path / "missing"))
    assert_no_leak(llm.engine)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = make_tiny_model(tmp_path / "gpt", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(ValueError, match="LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"):
        make_engine(path)


def test_matches_hf_transformers_on_tiny_models(tmp_path):
    transformers = pytest.importorskip("transformers")
    variants = {
        "llama": {},
        "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_bias=True),
        "llama3": dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": dict(
            architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None
        ),
        "tied": dict(tie_word_embeddings=True),
    }
    ids = torch.randint(3, 512, (1, 70), generator=torch.Generator().manual_seed(1))
    for name, overrides in variants.items():
        path = make_tiny_model(tmp_path / name, **overrides)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ref = hf.generate(
            ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        e = make_engine(path, max_num_batched_tokens=32)
        e.add_request(name, ids[0].tolist(), SamplingParams(max_tokens=16, **GREEDY))
        assert run(e)[name] == ref[0, 70:].tolist(), name


def test_layer_streaming_hook_hands_off_a_prefill(tiny_model_dir):
    prompt = random_prompts(1, seed=11, lo=45, hi=45)[0]
    ref = make_engine(tiny_model_dir)
    ref.add_request("ref", prompt, SamplingParams(max_tokens=12, **GREEDY))
    expected = run(ref)["ref"]

    src = make_engine(tiny_model_dir, max_num_batched_tokens=16)  # 3 chunks; streams on the last
    src.add_request("p", prompt, SamplingParams(max_tokens=1, **GREEDY), hold_kv=True)
    src.add_request("other", [9, 8, 7], SamplingParams(max_tokens=3, **GREEDY))
    streamed, first = {}, None
    while src.has_unfinished():
        for out in src.step(on_kv_layer=lambda rid, i, kv: streamed.setdefault((rid, i), kv)):
            if out.request_id == "p":
                first = out.token_ids
    assert sorted(streamed) == [("p", i) for i in range(src.model_config.num_layers)]
    src.release("p")
    assert_no_leak(src)

    dst = make_engine(tiny_model_dir)
    assert dst.begin_import("p", prompt, [], len(prompt), SamplingParams(max_tokens=12, **GREEDY))
    for (_, layer), kv in streamed.items():
        dst.import_kv_layer("p", layer, kv)
    dst.finish_import("p", first)
    assert run(dst)["p"] == expected
    assert_no_leak(dst)


@pytest.mark.parametrize("part", ["kernel", "ops"])
def test_cpu_kernels_and_the_torch_path_agree(tiny_model_dir, part):
    """The CPU attention kernel (`kernel`) and the fused row-wise ops (`ops`), each against
    the torch code it replaces (the CUDA path's): the same greedy tokens on the tiny model
    (fp32: they differ by rounding at most)."""
    prompts = random_prompts(12, seed=21, lo=1, hi=120)
    results = []
    for use in (True, False):
        e = make_engine(tiny_model_dir, max_num_batched_tokens=64)
        if getattr(e.runner, part) is None:
            pytest.skip("the CPU kernels could not be built here")
        if not use:
            setattr(e.runner, part, None)
        results.append(greedy_outputs(e, prompts, 10))
    assert results[0] == results[1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_cpu(tiny_model_dir):
    prompts = random_prompts(6, seed=31)
    results = []
    for device in ("cpu", "cuda"):
        e = make_engine(tiny_model_dir, device=device, max_num_batched_tokens=48)
        results.append(greedy_outputs(e, prompts, 8))
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
def test_cpu_decode_kernel_matches_a_reference(dtype, heads, kv_heads, head_dim):
    """The kernel (its AVX-512 path for head_dim 64/128 where the CPU has it, else the generic
    loop) against plain fp32 attention over the same block tables: lengths below, at and
    across block boundaries, and a single token."""
    from tideserve.engine import cpu_kernels

    mod = cpu_kernels.load()
    if mod is None:
        pytest.skip("the CPU attention kernel could not be built here")
    gen = torch.Generator().manual_seed(5)
    bs, num_blocks = 16, 100
    cache = torch.randn(2, kv_heads, num_blocks * bs, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 33, 200])
    tables = torch.randperm(num_blocks, generator=gen)[: 6 * 13].view(6, 13).contiguous()
    q = torch.randn(6, heads, head_dim, generator=gen).to(dtype)
    scale = head_dim**-0.5
    out = mod.paged_decode_attention(q, cache, tables, lens, bs, scale).float()
    g = heads // kv_heads
    for b, n in enumerate(lens.tolist()):
        slots = (tables[b, :, None] * bs + torch.arange(bs)).reshape(-1)[:n]
        k, v = cache[0][:, slots].float(), cache[1][:, slots].float()  # [kvh, n, hd]
        qq = q[b].float().view(kv_heads, g, head_dim) * scale
        ref = (torch.softmax(qq @ k.transpose(1, 2), -1) @ v).reshape(heads, head_dim)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16/fp16: the output's rounding
        torch.testing.assert_close(out[b], ref, atol=tol, rtol=tol)


def _fused_ops():
    from tideserve.engine import cpu_kernels

    mod = cpu_kernels.load()
    if mod is None:
        pytest.skip("the CPU kernels could not be built here")
    return mod


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_fused_cpu_ops_match_the_torch_ops(dtype):
    """The fused norm / residual / rotary + KV write / SiLU ops against the torch ops they
    replace in a decoder layer: bit-exact where both round the same way (bf16/fp16 rotary and
    residual adds), else within the last bit of the model dtype."""
    import torch.nn.functional as F

    from tideserve.engine.model import apply_rotary

    ops = _fused_ops()
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).to(dtype)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 2**-22}[dtype]
    close = dict(atol=ulp, rtol=ulp)
    T, D, H, K, hd, S = 37, 96, 6, 2, 32, 64

    x, r, w = rand(T, D), rand(T, D), (torch.rand(D, generator=gen) + 0.5).to(dtype)
    h, n = ops.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(h, x + r)
    torch.testing.assert_close(n, w * F.rms_norm(x + r, (D,), eps=1e-5), **close)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), w * F.rms_norm(x, (D,), eps=1e-5), **close)

    gu = rand(T, 2 * D, s=3.0)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gu), F.silu(gate) * up, atol=4 * ulp, rtol=2 * ulp)

    qkv = rand(T, (H + 2 * K) * hd)
    angles = torch.rand(T, 1, hd // 2, generator=gen) * 100
    cos, sin = (
        torch.cat((angles, angles), -1).cos().to(dtype),
        torch.cat((angles, angles), -1).sin().to(dtype),
    )
    slots = torch.randperm(S, generator=gen)[:T]
    cache, ref_cache = torch.zeros(2, K, S, hd, dtype=dtype), torch.zeros(2, K, S, hd, dtype=dtype)
    q = ops.rope_write_kv(qkv, cos, sin, cache, slots, H, K)
    heads = qkv.view(T, H + 2 * K, hd)
    rotated = apply_rotary(heads[:, : H + K], cos, sin)
    ref_cache.index_copy_(
        2, slots, torch.stack((rotated[:, H:], heads[:, H + K :])).transpose(1, 2)
    )
    exact = dtype != torch.float32  # fp32 may contract x*cos + y*sin into one FMA
    check = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    assert check(q, rotated[:, :H]) and check(cache, ref_cache)
    assert cache[:, :, [s for s in range(S) if s not in set(slots.tolist())]].abs().sum() == 0
    with pytest.raises(RuntimeError, match="slot out of range"):  # never a write past the cache
        ops.rope_write_kv(qkv, cos, sin, cache, slots + S, H, K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_greedy_argmax_reads_logits_in_the_model_dtype(dtype):
    """The sampler's row argmax (the CPU kernel, or torch's) picks what float32 argmax picks,
    the first index among equal maxima included; random and logprob rows are unaffected."""
    from tideserve.engine.sampler import Sampler

    ops = _fused_ops()
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 1000, generator=gen).to(dtype)
    logits[1, 10] = logits[1, 700] = 40.0  # a tie: the first wins
    logits[2, -1] = 40.0  # the last column
    logits[3, 0] = 40.0  # the first column
    expected = logits.float().argmax(dim=-1)
    assert expected[1] == 10
    greedy = [SamplingParams(temperature=0.0)] * 5
    for sampler in (Sampler(ops.argmax_rows), Sampler()):
        out = sampler(logits, greedy, [str(i) for i in range(5)])
        assert out.token_ids == expected.tolist()
    mixed = [SamplingParams(temperature=0.0, logprobs=2)] + [
        SamplingParams(temperature=1.0, seed=i) for i in range(4)
    ]
    a = Sampler(ops.argmax_rows)(logits, mixed, list("abcde"))
    b = Sampler()(logits.float(), mixed, list("abcde"))
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs


def test_kv_cache_asks_for_huge_pages_and_starts_zeroed(tiny_model_dir):
    from tideserve.engine.kv_cache import advise_huge_pages

    assert advise_huge_pages(torch.empty(1024)) is False  # under 2 MiB: nothing to advise
    e = make_engine(tiny_model_dir, kv_cache_bytes=8 << 20)
    assert e.runner.kv.tensor.abs().sum() == 0


def test_cpu_kernel_rows_do_not_depend_on_chunking(tiny_model_dir):
    """With the CPU kernel every row attends on its own, so a prompt's KV is bit-identical
    whether it is prefilled in one chunk or in many small ones beside other requests."""
    prompt = random_prompts(1, seed=41, lo=100, hi=100)[0]
    kvs = []
    for budget in (512, 16):
        e = make_engine(tiny_model_dir, max_num_batched_tokens=budget)
        if e.runner.kernel is None:
            pytest.skip("the CPU kernel could not be built here")
        e.add_request("x", prompt, SamplingParams(max_tokens=1, **GREEDY), hold_kv=True)
        for i, p in enumerate(random_prompts(3, seed=42)):
            e.add_request(f"other{i}", p, SamplingParams(max_tokens=4, **GREEDY))
        run(e)
        kvs.append([e.export_kv_layer("x", n) for n in range(e.model_config.num_layers)])
        e.release("x")
        assert_no_leak(e)
    assert all(torch.equal(a, b) for a, b in zip(*kvs))
