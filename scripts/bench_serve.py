"""Serving throughput and latency: xpu-coopt serve against llama.cpp's llama-server and `transformers serve
--continuous-batching`, the same requests from the same client, one server at a time.

    python scripts/bench_serve.py [--servers xpu_coopt,llama.cpp,transformers] [--clients 16]
                                  [--requests 32] [--max-tokens 64] [--threads 2]

The embedded SmolLM2-135M in bfloat16 on every side: xpu_coopt and transformers dequantize its Q4_1 GGUF
to bfloat16 (transformers serve reads a folder of it written once); llama.cpp runs the BF16 copy that
llama-quantize makes of the same GGUF. Prompts: passages of the wikitext-2 and TinyStories texts in
../shared/data, lengths drawn log-normally (ShareGPT-like: many short, a few long, 16-1024 words).
--clients streaming clients send the --requests one after another (greedy, max_tokens, EOS ignored
where the server allows: not transformers serve, whose requests may end early); reported: output tokens/s over the whole run, time to first token and the
gaps between streamed tokens (p50, p99). Each server gets --threads CPU threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "scripts"))
from bench_vs_llamacpp import llama_wrapper  # noqa: E402


def prompts(count: int, seed: int = 0) -> list[str]:
    words = ((DATA / "wikitext2-test.txt").read_text() + (DATA / "tinystories-valid.txt").read_text()).split()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = int(min(1024, max(16, rng.lognormvariate(4.5, 0.8))))
        start = rng.randrange(len(words) - length)
        out.append(" ".join(words[start : start + length]))
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not become healthy")


async def run_clients(url: str, model: str, texts: list[str], clients: int, max_tokens: int,
                      ignore_eos: bool = True) -> dict:  # fmt: skip
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)
    ttfts, gaps, tokens = [], [], 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            text = queue.get_nowait()
            body = {
                "model": model,
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            if ignore_eos:  # an extension: transformers serve refuses it
                body["ignore_eos"] = True
            start = last = time.perf_counter()
            first = True
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                        continue
                    now = time.perf_counter()
                    (ttfts if first else gaps).append(now - (start if first else last))
                    first, last = False, now
                    tokens += 1

    # a connection per request: llama-server closes idle kept-alive ones, which a reuse then finds closed
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[q - 1] * 1e3 if len(values) > 1 else float("nan")

    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "ttft_p50_ms": pct(ttfts, 50),
            "ttft_p99_ms": pct(ttfts, 99), "itl_p50_ms": pct(gaps, 50), "itl_p99_ms": pct(gaps, 99)}  # fmt: skip


def start(name: str, port: int, threads: int, work: Path) -> tuple[subprocess.Popen, str]:
    """The server process and the model name its requests use."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if name == "xpu_coopt":
        command = [sys.executable, "-m", "xpu_coopt.cli", "serve", "--port", str(port), "--threads", str(threads),
                   "--dtype", "bfloat16", "--kv-cache-memory", "512M", "--max-num-seqs", "64"]  # fmt: skip
        return subprocess.Popen(command, env=env, stderr=open(work / "xpu_coopt.log", "w")), "smollm2-135m"
    if name == "llama.cpp":
        from xpu_coopt.checkpoints import smollm2_location

        llama = llama_wrapper(None)
        bf16 = work / "smollm2-bf16.gguf"
        if not bf16.exists():
            subprocess.run([llama, "llama-quantize", "--allow-requantize", str(Path(*smollm2_location())), str(bf16),
                            "BF16"], check=True, capture_output=True)  # fmt: skip
        command = [llama, "llama-server", "-m", str(bf16), "-t", str(threads), "-np", "16", "-c", str(16 * 2048),
                   "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
        log = work / "llama.cpp.log"
        return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), "smollm2"
    folder = work / "smollm2-bf16"
    if not folder.exists():
        import torch

        from xpu_coopt.checkpoints import load_smollm2

        model, tokenizer = load_smollm2(torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    command = ["transformers", "serve", "--continuous-batching", "--port", str(port), "--host", "127.0.0.1",
               "--dtype", "bfloat16", "--device", "cpu"]  # fmt: skip
    command[0] = str(Path(sys.executable).with_name("transformers"))
    log = work / "transformers.log"
    return subprocess.Popen(command, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), str(folder)


def serve_once(name: str, args: argparse.Namespace, work: Path, texts: list[str]) -> dict:
    """One server started, warmed up, measured and stopped."""
    port = free_port()
    process, model = start(name, port, args.threads, work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        ignore_eos = name != "transformers"
        asyncio.run(run_clients(url, model, texts[:2], 2, 4, ignore_eos))  # warm up
        return asyncio.run(run_clients(url, model, texts, args.clients, args.max_tokens, ignore_eos))
    finally:
        process.terminate()
        process.wait(timeout=60)


def median_row(rows: list[dict]) -> dict:
    """Each measure's median over the rounds."""
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="xpu_coopt,llama.cpp,transformers")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every server, in turn; medians reported"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.gettempdir()) / "xpu_coopt-bench-serve"
    work.mkdir(exist_ok=True)
    texts = prompts(args.requests)
    rounds: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for name in args.servers.split(","):
            row = serve_once(name, args, work, texts)
            rounds.setdefault(name, []).append(row)
            print(f"round {round_index + 1} {name:12s} {row['tokens_per_s']:7.1f} tok/s  TTFT p50 "
                  f"{row['ttft_p50_ms']:7.0f} ms p99 {row['ttft_p99_ms']:7.0f} ms  ITL p50 {row['itl_p50_ms']:6.0f} ms "
                  f"p99 {row['itl_p99_ms']:6.0f} ms ({row['tokens']} tokens in {row['seconds']:.1f} s)", flush=True)  # fmt: skip
    results = {name: median_row(rows) for name, rows in rounds.items()}
    if args.rounds > 1:
        for name, row in results.items():
            print(f"median {name:12s} {row['tokens_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_ms']:7.0f} ms  "
                  f"ITL p99 {row['itl_p99_ms']:6.0f} ms")  # fmt: skip
    if "xpu_coopt" in results:
        for name, row in results.items():
            if name != "xpu_coopt":
                print(
                    f"xpu_coopt / {name}: {results['xpu_coopt']['tokens_per_s'] / row['tokens_per_s']:.2f}x tokens/s"
                )
    if args.json:
        report = {"settings": vars(args) | {"json": str(args.json)}, "results": results, "rounds": rounds}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
