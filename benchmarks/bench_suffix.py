"""Suffix drafting replayed over the target's own answers: τ, proposal cost and memory, no target forward.

The global index holds prompt + greedy answer of the corpus's first conversations (what a server would have
served); each of the last `--eval` greedy answers is then decoded step by step as a verifier would see it: the
row's request index holds its prompt + the answer so far, a proposal is checked against the true answer, the
accepted prefix + one target token advance the row. τ = answer tokens / steps. Proposers side by side:

- `request`: the row's own sequence only (today's lookup generalised to longest match + frequency);
- `global`: the global index only;
- `hybrid`: both, the longer match first (SuffixDrafter, as served);
each at a fixed γ and with γᵢ from confidence (`--confidence-gamma-max`). Also: µs per proposal and the global
index's memory at the corpus size (~5M tokens with the sampled answers).

    tide bench bench_suffix --corpus ../shared/data/sharegpt_selfdistill_smollm2.npz --eval 800 \
        --out benchmarks/results/bench_suffix.json
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_json

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sharegpt_selfdistill_smollm2.npz"


def prompt_answer_pairs(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(prompts, greedy answers, sampled answers as prompt+answer) in corpus order."""
    d = np.load(path)
    po, pf = d["prompt_off"], d["prompt_flat"]
    prompts = [pf[po[i]:po[i + 1]].astype(np.int32) for i in range(len(po) - 1)]
    go, gf, gi = d["greedy_resp_off"], d["greedy_resp_flat"], d["greedy_prompt_index"]
    greedy = [gf[go[k]:go[k + 1]].astype(np.int32) for k in range(len(go) - 1)]
    greedy_prompts = [prompts[int(i)] for i in gi]
    so, sf, si = d["sampled_resp_off"], d["sampled_resp_flat"], d["sampled_prompt_index"]
    sampled = [np.concatenate([prompts[int(si[k])], sf[so[k]:so[k + 1]].astype(np.int32)])
               for k in range(len(so) - 1)]
    return greedy_prompts, greedy, sampled


def replay(drafter, prompt: np.ndarray, answer: np.ndarray, gamma: int, confidence_gamma: bool,
           source: str) -> tuple[int, int, int, int, float]:
    """Decode `answer` with proposals from `drafter` -> (steps, proposals made, drafted, accepted, seconds)."""
    slot = 0
    drafter.reset_slot(slot)
    tokens = list(prompt)
    i = steps = proposals = drafted = accepted = 0
    seconds = 0.0
    n = len(answer)
    while i < n:
        t0 = time.perf_counter()
        prop = drafter.propose(slot, tokens, gamma, sources=source)
        seconds += time.perf_counter() - t0
        a = 0
        if prop is not None:
            g = len(prop) if confidence_gamma else min(len(prop), gamma)
            draft = prop.tokens[:g]
            proposals += 1
            drafted += g
            while a < g and i + a < n and draft[a] == answer[i + a]:
                a += 1
            accepted += a
        adv = min(a + 1, n - i)
        tokens.extend(int(t) for t in answer[i:i + adv])
        i += adv
        steps += 1
    return steps, proposals, drafted, accepted, seconds


def main(argv: list[str] | None = None) -> dict:
    from tide_trt.config import SuffixConfig
    from tide_trt.draft.suffix import SuffixDrafter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--eval", type=int, default=800, help="held-out greedy answers (the corpus's last ones)")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--confidence-gamma-max", type=int, default=8)
    p.add_argument("--min-confidence", type=float, nargs="+", default=[0.0, 0.3])
    p.add_argument("--max-tokens", type=int, default=SuffixConfig.max_tokens, help="draft.suffix.max_tokens")
    p.add_argument("--with-sampled", action="store_true", help="also index the sampled answers (memory at ~5M)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    prompts, greedy, sampled = prompt_answer_pairs(args.corpus)
    train = [np.concatenate([pr, an]) for pr, an in zip(prompts[:-args.eval], greedy[:-args.eval], strict=True)]
    if args.with_sampled:
        train += sampled
    evals = list(zip(prompts[-args.eval:], greedy[-args.eval:], strict=True))
    eval_tokens = sum(len(a) for _, a in evals)
    result: dict = {"machine": machine(), "corpus": str(args.corpus), "eval_answers": len(evals),
                    "eval_positions": eval_tokens, "runs": []}
    for min_conf in args.min_confidence:
        drafter = SuffixDrafter(SuffixConfig(min_confidence=min_conf, max_tokens=args.max_tokens), max_slots=1,
                                max_seq_len=4096)
        t0 = time.perf_counter()
        indexed = drafter.preload(train)
        build_s = time.perf_counter() - t0
        mem = drafter.global_index.memory_bytes
        log.info("indexed %d tokens in %.2f s (%.0f MB)", indexed, build_s, mem / 1e6)
        for source in ("request", "global", "hybrid"):
            for conf_gamma in (False, True):
                gamma = args.confidence_gamma_max if conf_gamma else args.gamma
                tot = np.zeros(4, dtype=np.int64)
                secs = 0.0
                for prompt, answer in evals:
                    *counts, s = replay(drafter, prompt, answer, gamma, conf_gamma, source)
                    tot += counts
                    secs += s
                steps, proposals, drafted, accepted = (int(x) for x in tot)
                run = {"min_confidence": min_conf, "source": source,
                       "gamma": f"confidence<= {gamma}" if conf_gamma else gamma,
                       "tau": eval_tokens / steps, "proposes_at": proposals / steps,
                       "accepted_per_drafted": accepted / max(drafted, 1), "drafted_per_step": drafted / steps,
                       "us_per_proposal": 1e6 * secs / steps, "indexed_tokens": indexed,
                       "index_memory_mb": mem / 1e6, "index_build_s": build_s}
                result["runs"].append(run)
                log.info("%s", run)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
