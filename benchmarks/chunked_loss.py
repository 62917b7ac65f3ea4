"""What ``model.loss_chunk_tokens`` saves and costs: peak memory and CPU time of one forward +
backward of a small hybrid whose full-vocabulary logits dominate its memory, with the output layer
+ loss unchunked and in chunks of several sizes — all in one run, reported as ratios to unchunked
(absolute numbers are printed for reference; the machines are shared).

Peak memory: the largest number of bytes torch's CPU allocator holds during the pass (torch
profiler memory events), above what was held before it. Time: CPU time of the best of
``--repeats`` passes on one thread (counts the work, not the waiting on a busy machine).

    python benchmarks/chunked_loss.py [--seq 8192] [--vocab 32768] [--chunks 0,512,2048,8192]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
# Run as `python benchmarks/chunked_loss.py`: its folder is on sys.path.
from long_context_scaling import peak_bytes  # torch profiler's peak allocator bytes of one pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--chunks", default="0,512,2048,8192", help="loss_chunk_tokens values (0: off)")
    ap.add_argument("--pattern", default="M-", help="layers (no attention: its cost is not the point)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from hymoe.model import hf
    from hymoe.model.config import ModelConfig

    cfg = ModelConfig(pattern=args.pattern, max_sequence_length=args.seq)
    model = hf.build_single_process(cfg, args.vocab, seed=0)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(2, args.vocab, (1, args.seq + 1), generator=g)

    def run(chunk):
        def one():
            model.config.hymoe_loss_chunk_tokens = chunk
            model.zero_grad(set_to_none=False)
            model(data[:, :-1], None, None, labels=data[:, 1:]).sum().backward()
        return one

    logits_mib = args.seq * args.vocab * 4 / 2**20
    print(f"{args.pattern}, hidden {cfg.hidden_size}, seq {args.seq}, vocab {args.vocab}: fp32 logits "
          f"{logits_mib:.0f} MiB")
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        fn = run(chunk)
        fn()  # warm-up; gradients exist from here on in every measured pass
        cpu = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            fn()
            cpu.append(time.process_time() - t0)
        rows.append({"loss_chunk_tokens": chunk, "peak_mib": peak_bytes(fn) / 2**20, "cpu_s": min(cpu)})
    base = rows[0]
    for r in rows:
        r["memory_ratio"] = r["peak_mib"] / base["peak_mib"]
        r["time_ratio"] = r["cpu_s"] / base["cpu_s"]
        name = "off" if r["loss_chunk_tokens"] == 0 else str(r["loss_chunk_tokens"])
        print(f"  loss_chunk_tokens {name:>6s}: peak {r['peak_mib']:8.1f} MiB ({r['memory_ratio']:.2f}×)"
              f"   cpu {r['cpu_s'] * 1e3:8.1f} ms ({r['time_ratio']:.2f}×)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seq": args.seq, "vocab": args.vocab, "pattern": args.pattern,
                       "logits_mib": logits_mib, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
