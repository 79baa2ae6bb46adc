"""The SYCL backend end to end (its kernels against the oracles are in ops/test_op_kernels.py), its runtime, and
its errors. Runs on the OpenCL CPU device: backend="sycl" on CPU tensors."""

from __future__ import annotations

import pytest
import torch
from helpers import STORIES_VARIANTS, stories_prompt, unequal_stories_prompts

import xpu_coopt
from xpu_coopt.backends import native_build
from xpu_coopt.backends.sycl import kernels, runtime
from xpu_coopt.ops import decode_split

CPU = torch.device("cpu")


def _generate_both(model, ids, **kwargs):
    """Tokens from the reference backend and from the SYCL backend, same model and inputs."""
    reference = xpu_coopt.optimize(model, backend="torch").generate(ids, **kwargs)
    sycl = xpu_coopt.optimize(model, backend="sycl").generate(ids, **kwargs)
    return reference, sycl


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_stories260k_sycl_tokens_match_reference(stories_model, stories_tokenizer, num_beams, kv_dtype):
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=40, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference, sycl = _generate_both(stories_model, ids, **kwargs)
    assert torch.equal(sycl, reference)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_stories260k_sycl_paged_cache_tokens_match_reference(stories_model, stories_tokenizer, num_beams):
    """Unequal prompts in the paged cache: the SYCL decode kernel reads the prompt segment through the
    block table, a new block every 16 generated tokens with one beam."""
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=40, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(
        ids, attention_mask=mask, **kwargs
    )
    paged = xpu_coopt.optimize(stories_model, backend="sycl", kv_cache="paged")
    assert torch.equal(paged.generate(ids, attention_mask=mask, **kwargs), reference)


@pytest.mark.parametrize("kv_cache", ["segment", "paged"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_stories260k_sycl_sliding_window_tokens_match_reference(
    stories_window_model, stories_tokenizer, num_beams, kv_cache
):
    """A window shorter than the sequences (test_real_models: the reference's tokens are transformers'),
    over unequal prompts: the prefill and decode kernels skip the keys before it."""
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=30, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference = xpu_coopt.optimize(stories_window_model, backend="torch").generate(ids, mask, **kwargs)
    sycl = xpu_coopt.optimize(stories_window_model, backend="sycl", kv_cache=kv_cache)
    assert torch.equal(sycl.generate(ids, mask, **kwargs), reference)


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("architecture", sorted(STORIES_VARIANTS))
def test_stories260k_sycl_tokens_of_other_attention_variants_match_reference(
    request, stories_tokenizer, architecture, num_beams
):
    """SmolLM3's layers without rope, Qwen3's query and key norms (test_real_models: the reference's
    tokens are transformers')."""
    model = request.getfixturevalue(STORIES_VARIANTS[architecture])
    ids, mask = unequal_stories_prompts(stories_tokenizer)
    kwargs = dict(max_new_tokens=30, num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
    reference, sycl = _generate_both(model, ids, attention_mask=mask, **kwargs)
    assert torch.equal(sycl, reference)


def test_stories260k_sycl_samples_match_reference(stories_model, stories_tokenizer):
    """Three samples of a prompt share its K/V: the SYCL decode kernel reads them as beams never reordered."""
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(
        max_new_tokens=30, do_sample=True, num_return_sequences=3, top_k=0, eos_token_id=2, pad_token_id=0
    )
    torch.manual_seed(0)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(ids, **kwargs)
    torch.manual_seed(0)
    sycl = xpu_coopt.optimize(stories_model, backend="sycl").generate(ids, **kwargs)
    assert torch.equal(sycl, reference)
    assert len({tuple(row.tolist()) for row in reference}) > 1  # samples, not one sequence three times


@pytest.mark.parametrize("search", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2, top_k=0)])
def test_stories260k_sycl_shares_out_more_rows_than_a_work_group_serves(
    stories_model, stories_tokenizer, search
):
    """One more beam or sample of a prompt than a work-group's rows hold (x 2 query heads per KV head):
    two work-groups share each (request, KV head)'s rows out, and the tokens are the reference's."""
    config = stories_model.config
    group = config.num_attention_heads // config.num_key_value_heads
    sequences = kernels.MAX_DECODE_ROWS // group + 1
    search = {key: sequences if value == 2 else value for key, value in search.items()}
    assert decode_split.chunk_rows(sequences, group, kernels.MAX_DECODE_ROWS).chunks == 2
    ids = stories_prompt(stories_tokenizer)
    kwargs = dict(max_new_tokens=12, eos_token_id=2, pad_token_id=0, **search)
    torch.manual_seed(0)
    reference = xpu_coopt.optimize(stories_model, backend="torch").generate(ids, **kwargs)
    torch.manual_seed(0)
    sycl = xpu_coopt.optimize(stories_model, backend="sycl").generate(ids, **kwargs)
    assert torch.equal(sycl, reference)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_smollm2_sycl_tokens_match_reference(smollm2_fp32, num_beams):
    model, tokenizer = smollm2_fp32
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["The capital of France is", "def fibonacci(n):\n    "], return_tensors="pt", padding=True
    )
    kwargs = dict(max_new_tokens=12, num_beams=num_beams, do_sample=False, pad_token_id=2)
    reference, sycl = _generate_both(
        model, batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
    )
    assert torch.equal(sycl, reference)


def test_sycl_prefill_logits_match_transformers(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    ids = tokenizer(["Gravity is the force that"], return_tensors="pt")["input_ids"]
    ours = xpu_coopt.optimize(model, backend="sycl")(ids).logits
    with torch.no_grad():
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)


def test_runtime_runs_on_the_opencl_cpu_device():
    queue = runtime.queue_for(CPU)
    assert queue.synchronous and queue.device_name  # e.g. the host CPU's name
    assert runtime.queue_for(CPU) is queue  # one queue, its compiled kernels reused


def test_the_launcher_build_says_so_once_and_lands_whole(monkeypatch, tmp_path, capsys):
    """The first use on a machine builds the launcher (g++, a few seconds): stderr says so, and the library
    lands in the cache whole; a second call finds it there, silently."""
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    built = runtime._build_launcher(runtime.sycl_prefix())
    assert "building xpu_coopt's SYCL launcher (once" in capsys.readouterr().err
    assert built.parent.parent == tmp_path and [path.name for path in tmp_path.iterdir()] == [
        built.parent.name
    ]
    assert runtime._build_launcher(runtime.sycl_prefix()) == built
    assert capsys.readouterr().err == ""


def test_a_launcher_in_the_cache_needs_no_compiler(monkeypatch, tmp_path):
    """A prebuilt cache (a container image without g++) serves as it is; the compiler is named only where
    a build is needed."""
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    built = runtime._build_launcher(runtime.sycl_prefix())
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    assert runtime._build_launcher(runtime.sycl_prefix()) == built
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        xpu_coopt.BackendUnavailableError, match=r"g\+\+ is needed to build .*which the disk cache lacks"
    ):
        runtime._build_launcher(runtime.sycl_prefix())


def test_a_damaged_launcher_is_built_again(monkeypatch, tmp_path):
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path))
    built = runtime._build_launcher(runtime.sycl_prefix())
    size = built.stat().st_size
    with open(built, "r+b") as handle:
        handle.truncate(100)
    with pytest.warns(UserWarning, match=f"{built.parent} is damaged \\(launcher.so holds 100 bytes"):
        assert runtime._build_launcher(runtime.sycl_prefix()) == built
    assert built.stat().st_size == size


def test_a_failed_launcher_build_names_the_command_its_status_and_output(monkeypatch, tmp_path):
    compiler = tmp_path / "failing-compiler"
    compiler.write_text("#!/bin/sh\necho 'fatal: no such header' >&2\nexit 3\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("XPU_COOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    message = f"`{compiler} -std=c\\+\\+17 .*` exited with status 3:\\nfatal: no such header"
    with pytest.raises(xpu_coopt.KernelCompileError, match=message):
        runtime._build_launcher(runtime.sycl_prefix())
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(
        xpu_coopt.KernelCompileError, match=r"`false .*` exited with status 1:\n\(no output\)"
    ):
        runtime._build_launcher(runtime.sycl_prefix())
    assert [path.name for path in (tmp_path / "cache").iterdir()] == []


def test_an_unwritable_cache_is_named(monkeypatch, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("XPU_COOPT_CACHE", str(a_file))
    with pytest.raises(OSError, match=f"disk cache \\(XPU_COOPT_CACHE={a_file}\\) cannot be written"):
        runtime._build_launcher(runtime.sycl_prefix())


# A kernel source that does not compile, and what its KernelCompileError names: the source and the
# compiler's log.
BROKEN_SOURCE = '#include "common.hpp"\nextern "C" void f() { undeclared_thing(); }\n'
BROKEN_SOURCE_ERROR = r"broken\.cpp(.|\n)*undeclared_thing"


def test_compile_error_carries_the_compiler_log():
    queue = runtime.queue_for(CPU)
    with pytest.raises(xpu_coopt.KernelCompileError, match=BROKEN_SOURCE_ERROR):
        queue.build("broken.cpp", BROKEN_SOURCE)


@pytest.mark.parametrize("slow", [False, True])
def test_optimize_builds_every_source_with_a_bar_while_it_takes_long(
    monkeypatch, capsys, stories_model, slow
):
    """optimize() builds every kernel source, not the first kernel calls; the bar shows once building has
    taken PROGRESS_DELAY_S (zero for the slow case, as a first compile's 30 s pass it). The builds are
    recorded, not run: a source built again in the process that compiled it compiles again (the
    persistent cache serves later processes), 30 s a case."""
    queue = runtime.queue_for(CPU)
    built = []
    monkeypatch.setattr(queue, "_bundles", {})
    monkeypatch.setattr(queue, "build", lambda source_name, source: built.append(source_name) or len(built))
    if slow:
        monkeypatch.setattr(runtime, "PROGRESS_DELAY_S", 0.0)
    xpu_coopt.optimize(stories_model, backend="sycl")
    sources = {path.name for path in runtime.kernel_source_dir().glob("*.cpp")}
    assert sorted(built) == sorted(f"sycl_kernels/{name}" for name in sources) and len(sources) >= 4
    assert set(queue._bundles) == sources
    shown = capsys.readouterr().err
    assert ("compiling SYCL kernels for" in shown) == slow, shown


def test_a_source_that_does_not_compile_fails_optimize(monkeypatch, tmp_path, stories_model):
    for path in runtime.kernel_source_dir().glob("*.hpp"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "broken.cpp").write_text(BROKEN_SOURCE)
    queue = runtime.queue_for(CPU)
    monkeypatch.setattr(queue, "_bundles", {})
    monkeypatch.setattr(runtime, "kernel_source_dir", lambda: tmp_path)
    with pytest.raises(xpu_coopt.KernelCompileError, match=BROKEN_SOURCE_ERROR):
        xpu_coopt.optimize(stories_model, backend="sycl")


def test_missing_runtime_is_a_clear_error_not_a_fallback(monkeypatch, stories_model):
    # As in a fresh process without the wheels: nothing loaded yet, and the runtime not installed.
    monkeypatch.setattr(runtime, "_launcher", None)
    monkeypatch.setattr(runtime, "_queues", {})
    monkeypatch.setattr(runtime, "_installed_file", lambda distribution, name: None)
    with pytest.raises(
        xpu_coopt.BackendUnavailableError,
        match=r"backend 'sycl' is not available on cpu: .*pip install 'xpu_coopt\[sycl\]'",
    ):
        xpu_coopt.optimize(stories_model, backend="sycl")


def test_sycl_backend_refuses_other_devices():
    with pytest.raises(xpu_coopt.BackendUnavailableError, match="not meta"):
        xpu_coopt.backends.resolve_backend("sycl", torch.device("meta"))


def _decode_args(heads, kv_heads, head_dim, beams=1, dtype=torch.float32):
    query = torch.randn(beams, heads, head_dim, dtype=dtype)
    prompt = torch.randn(1, kv_heads, 5, head_dim, dtype=dtype)
    response = torch.randn(beams, kv_heads, 2, head_dim, dtype=dtype)
    start = torch.zeros(1, dtype=torch.int32)
    slots = torch.arange(beams, dtype=torch.int32)[:, None].repeat(1, 2)
    return (torch.empty_like(query), query, prompt, prompt, None, None, start, response, response, None, None,
            slots, 1, 0.1, "auto")  # fmt: skip


def test_unsupported_head_dim_is_a_clear_error():
    with pytest.raises(ValueError, match="head_dim up to 128, not 256"):
        kernels.ENTRIES.segment_attention_decode(*_decode_args(2, 1, 256))


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"not torch\.float64"):
        kernels.ENTRIES.rms_norm(torch.empty_like(x), x, torch.ones(8, dtype=torch.float64), 1e-5)


def test_decode_splits_fill_an_intel_gpu_and_exercise_the_tests(monkeypatch):
    """Split decoding's sizes. On an XPU device: one work-group per vector engine wanted, at least 64
    prompt columns a split (the Arc A770 has 512 engines; Llama-2-7B has 32 KV heads, Llama-3-8B 8). On the
    OpenCL CPU device: 16 work-groups and one 16-column tile a split, so the tests' prompts split too."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.xpu, "get_device_properties", lambda device: SimpleNamespace(gpu_eu_count=512))
    xpu = torch.device("xpu")
    assert kernels.decode_splits(32, 1024, xpu) == 16  # 16 wanted: shares of 64 columns
    assert kernels.decode_splits(8, 1024, xpu) == 16  # 64 wanted, but no share below 64 columns
    assert kernels.decode_splits(8, 8192, xpu) == 64
    assert kernels.decode_splits(512, 1024, xpu) == 1  # a batch fills the GPU unsplit
    assert kernels.decode_splits(1, 37, CPU) == 2  # whole tiles: 37 columns are 3 tiles, in shares of 2
    assert kernels.decode_splits(4, 64, CPU) == 4
    assert kernels.decode_splits(1, 0, CPU) == 1  # an empty prompt: one split, nothing to read
