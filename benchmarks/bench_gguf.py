"""CPU decode side by side on the default model's GGUF file: our engine with bf16 weights, with the file's own
Q4_1 blocks (`engine.weights: q4_1`), and llama.cpp on the same file, the same thread count and prompts; plus
speculative decoding with the shipped default draft on both weight formats (its τ both ways: the draft was trained
on bf16 labels). Beside them: bytes of weights one decode step reads and the memory bandwidth this machine reaches
(a STREAM-like triad), so the numbers are read against the physical limit.

    tide bench bench_gguf --prompts 8 --max-new-tokens 128 --batch-sizes 1 8 --threads 2 \
        --llama-cpp-path ~/.cache/tide_trt/llama_cpp --out benchmarks/results/bench_gguf.json

The llama.cpp column needs `llama-cpp-python` (an optional benchmark dependency, built from the registry's sdist
for this CPU; ~30 min on 2 cores), e.g. into a folder outside the work tree, so that its numpy 2 does not shadow
the venv's (the folder is appended to sys.path):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python \
        --target ~/.cache/tide_trt/llama_cpp llama-cpp-python

Without it the column is skipped with a logged line and `"llama_cpp": {"skipped": "<why>"}` in the JSON.
Greedy everywhere; throughput = output tokens / wall seconds of generation (prefill included, model loading
excluded); the systems take turns per chunk of prompts (rotating who goes first) so slow drifts hit all alike.
llama.cpp runs through its C API (llama_decode on a batch with one sequence id per prompt, argmax in numpy), so
bs 8 is real batched decoding there as well.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench_engine import Tally, _ours_chunk
from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)


def stream_triad_gbs(mb: int = 256, reps: int = 5) -> dict:
    """STREAM-like triad a = b + s·c over float32 arrays of `mb` MB each (3 arrays: 2 read, 1 written), on torch's
    threads. Best of `reps`; bytes counted as STREAM does (3 × array size)."""
    n = mb * (1 << 20) // 4
    b, c = torch.rand(n), torch.rand(n)
    a = torch.empty(n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        best = min(best, time.perf_counter() - t0)
    read_only = float("inf")
    for _ in range(reps):  # read bandwidth alone (what a decode step needs)
        t0 = time.perf_counter()
        b.sum()
        read_only = min(read_only, time.perf_counter() - t0)
    return {"array_mb": mb, "triad_gb_s": 3 * n * 4 / best / 1e9, "read_gb_s": n * 4 / read_only / 1e9,
            "threads": torch.get_num_threads()}


class LlamaCpp:
    """Greedy batched decoding with llama.cpp's C API (through llama-cpp-python's ctypes bindings)."""

    def __init__(self, lib: Any, model_path: Path, threads: int, max_batch: int, max_len: int):
        self.lib = lib
        lib.llama_backend_init()
        self._quiet = lib.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp holds it
        lib.llama_log_set(self._quiet, None)
        mp = lib.llama_model_default_params()
        self.model = lib.llama_model_load_from_file(str(model_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(vocab)
        cp = lib.llama_context_default_params()
        cp.n_ctx = max_batch * max_len
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.capacity = 512
        self.batch = lib.llama_batch_init(self.capacity, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence id, wants logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = int(want)
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        ptr = self.lib.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_new: int, eos: tuple[int, ...]) -> tuple[int, float, int]:
        """Greedy-decode every prompt (one sequence id each) to max_new tokens or EOS. Returns (output tokens,
        seconds, decode steps summed over sequences)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        last: dict[int, int] = {}
        for s, p in enumerate(prompts):  # prefill, one prompt per call (chunks of the batch capacity)
            for lo in range(0, len(p), self.capacity):
                part = p[lo:lo + self.capacity]
                self._decode([(t, lo + j, s, lo + j == len(p) - 1) for j, t in enumerate(part)])
            last[s] = self._argmax(len(part) - 1)
        out = {s: [t] for s, t in last.items()}
        steps = 0
        live = [s for s in out if out[s][-1] not in eos]
        while live:
            live = [s for s in live if len(out[s]) < max_new]
            if not live:
                break
            self._decode([(out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True) for s in live])
            steps += len(live)  # sequence-steps, as the engine's τ counts them
            for i, s in enumerate(live):
                out[s].append(self._argmax(i))
            live = [s for s in live if out[s][-1] not in eos]
        return sum(len(o) for o in out.values()), time.perf_counter() - t0, steps


def load_llama_cpp(path: str | None) -> tuple[Any, str | None]:
    """(the llama_cpp module, None) or (None, why it is missing)."""
    if path:
        sys.path.append(str(Path(path).expanduser()))  # appended: the venv's own numpy stays first
    try:
        import llama_cpp

        return llama_cpp, None
    except Exception as exc:  # ImportError, or a broken build raising OSError on loading its library
        return None, (f"llama-cpp-python not importable ({exc}); install it with CMAKE_ARGS=\"-DGGML_NATIVE=ON\" "
                      "pip install --no-binary llama-cpp-python --target DIR llama-cpp-python and pass "
                      "--llama-cpp-path DIR")


def table(result: dict) -> str:
    """The README table of one result: tok/s, τ and ratios per system and batch size."""
    lines = ["| bs | system | tok/s | τ | × bf16 plain | × llama.cpp |", "|---|---|---|---|---|---|"]
    for run, row in result["runs"].items():
        systems = [n for n in row if isinstance(row[n], dict)]
        base = row["ours_plain[bf16]"]["tokens_per_s"]
        llama = row["llama_cpp"]["tokens_per_s"] if "llama_cpp" in row else None
        for n in systems:
            tps = row[n]["tokens_per_s"]
            vs_llama = f"{tps / llama:.2f}" if llama else "—"
            tau = "—" if n == "llama_cpp" else f"{row[n]['tau']:.2f}"
            lines.append(f"| {run[2:]} | {n} | {tps:.1f} | {tau} | {tps / base:.2f} | {vs_llama} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="tide bench bench_gguf")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft", default="default")
    p.add_argument("--no-spec", action="store_true", help="skip the speculative columns")
    p.add_argument("--llama-cpp-path", default=None, help="folder holding llama_cpp (pip install --target)")
    p.add_argument("--stream-mb", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from tide_trt.config import EngineConfig, ModelConfig
    from tide_trt.engine.generator import SpeculativeGenerator
    from tide_trt.engine.torch_engine import TorchTargetEngine
    from tide_trt.models.default_model import gguf_path
    from tide_trt.runtime import build_drafter, encode_prompt, resolve_draft_path
    from tide_trt.workloads import sharegpt_prompts

    torch.set_num_threads(args.threads)
    max_len = 512 + args.max_new_tokens + 16
    engines = {w: TorchTargetEngine.from_config(ModelConfig(), EngineConfig(
        max_batch_size=max(args.batch_sizes), max_seq_len=max_len, num_threads=args.threads, weights=w))
        for w in ("bf16", "q4_1")}
    tokenizer = engines["bf16"].tokenizer
    prompts = [encode_prompt(tokenizer, t)[-512:] for t in sharegpt_prompts(args.prompts, seed=1234)]
    eos = engines["bf16"].info.eos_token_ids
    systems: dict[str, Any] = {}
    for w, eng in engines.items():
        systems[f"ours_plain[{w}]"] = lambda c, i, e=eng, w=w: _ours_chunk(SpeculativeGenerator(e), c,
                                                                            args.max_new_tokens, 0, f"p{w}{i}")
        if not args.no_spec:
            drafter = build_drafter(eng, resolve_draft_path(args.draft))
            systems[f"ours_spec[{w}]"] = lambda c, i, e=eng, d=drafter, w=w: _ours_chunk(
                SpeculativeGenerator(e, d), c, args.max_new_tokens, args.gamma, f"s{w}{i}")
    lib, missing = load_llama_cpp(args.llama_cpp_path)
    llama = None
    if lib is None:
        log.warning("llama.cpp column skipped: %s", missing)
    else:
        llama = LlamaCpp(lib, gguf_path(), args.threads, max(args.batch_sizes), max_len)
        systems["llama_cpp"] = lambda c, i: llama.generate(c, args.max_new_tokens, eos)

    weights_bytes = {w: e.weights.linear_bytes() for w, e in engines.items()}
    result: dict[str, Any] = {
        "benchmark": "gguf", "machine": machine(), "model": engines["bf16"].info.name, "gguf": gguf_path().name,
        "threads": args.threads, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "gamma": args.gamma, "draft": str(resolve_draft_path(args.draft)),
        "llama_cpp": {"version": getattr(lib, "__version__", "?")} if lib is not None else {"skipped": missing},
        "weight_bytes_per_step": weights_bytes,
        "gguf_file_bytes": gguf_path().stat().st_size,
        "bandwidth": stream_triad_gbs(args.stream_mb),
        "runs": {},
    }
    bw = result["bandwidth"]["read_gb_s"] * 1e9
    result["bound_tok_s_bs1"] = {w: bw / b for w, b in weights_bytes.items()}  # weights read once per step
    names = list(systems)
    for bs in args.batch_sizes:
        tallies = {n: Tally() for n in names}
        for k, i in enumerate(range(0, len(prompts), bs)):
            chunk = prompts[i:i + bs]
            for name in names[k % len(names):] + names[:k % len(names)]:
                tokens, seconds, steps = systems[name](chunk, i)
                tallies[name].add(tokens, seconds, steps, len(chunk))
            log.info("bs %d: %d/%d prompts done", bs, i + len(chunk), len(prompts))
        row: dict[str, Any] = {n: t.summary() for n, t in tallies.items()}
        tps = {n: row[n]["tokens_per_s"] for n in names}
        row["ratio_q4_1_vs_bf16_plain"] = tps["ours_plain[q4_1]"] / tps["ours_plain[bf16]"]
        if "llama_cpp" in tps:
            for n in names:
                if n != "llama_cpp":
                    row[f"ratio_vs_llama_cpp[{n}]"] = tps[n] / tps["llama_cpp"]
        result["runs"][f"bs{bs}"] = row
        log.info("bs %d: %s", bs, {n: round(v, 1) for n, v in tps.items()})
    if llama is not None:
        llama.close()
    write_json(result, args.out)
    log.info("\n%s", table(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
