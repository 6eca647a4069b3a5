"""What one decode step's attention costs in torch's scaled_dot_product_attention when the key
length is new (as at every step of a rollout whose prompt length was not seen before) and when
it has been seen, for each SDPA backend that accepts the shapes. Qwen2.5-VL-7B's decode shapes:
G=8 rows, 28 query heads, 4 key/value heads (GQA), head dim 128, bf16.

    python bench/sdpa_new_lengths.py [--start 1746] [--lengths 100] [--json out.json]

A backend that builds something per shape (cuDNN's attention builds and caches an execution
plan per shape) shows a first pass much slower than the second.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def pass_over(lengths, q, kv, backend, gqa):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for n in lengths:
        k = kv[:, :, :n]
        if backend is None:  # torch's own choice
            F.scaled_dot_product_attention(q, k, k, enable_gqa=gqa)
        else:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, k, enable_gqa=gqa)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(lengths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", type=int, default=1746, help="first key length (bench/gpu.py's prompt)")
    parser.add_argument("--lengths", type=int, default=100, help="new key lengths per backend")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    g, heads, kv_heads, dim = 8, 28, 4, 128
    q = torch.randn(g, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "default_enabled": {"flash": torch.backends.cuda.flash_sdp_enabled(),
                               "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                               "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                               "math": torch.backends.cuda.math_sdp_enabled()},
           "ms_per_call": {}}
    start = args.start
    for gqa in (True, False):  # enable_gqa on 4 KV heads, or the KV heads repeated to 28 first
        kv = torch.randn(g, kv_heads if gqa else heads, start + 6 * args.lengths, dim, device="cuda",
                         dtype=torch.bfloat16)
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            name = f"{backend.name.lower()}{'_gqa' if gqa else '_repeated_kv'}"
            lengths = list(range(start, start + args.lengths))
            try:
                new = pass_over(lengths, q, kv, backend, gqa)
                seen = pass_over(lengths, q, kv, backend, gqa)
            except Exception as e:  # the backend does not take these shapes
                out["ms_per_call"][name] = f"unsupported: {str(e).splitlines()[0][:200]}"
                print(f"{name}: unsupported", flush=True)
                continue
            out["ms_per_call"][name] = {"new_length": 1e3 * new, "seen_length": 1e3 * seen}
            print(f"{name}: {1e3 * new:.3f} ms per call at a new key length, {1e3 * seen:.3f} ms seen", flush=True)
            start += args.lengths  # the next backend gets lengths no backend has seen
        # And the default choice, on lengths nothing has seen yet.
        lengths = list(range(start, start + args.lengths))
        new, seen = (pass_over(lengths, q, kv, None, gqa) for _ in range(2))
        name = f"default{'_gqa' if gqa else '_repeated_kv'}"
        out["ms_per_call"][name] = {"new_length": 1e3 * new, "seen_length": 1e3 * seen}
        print(f"{name}: {1e3 * new:.3f} ms per call at a new key length, {1e3 * seen:.3f} ms seen", flush=True)
        start = args.start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
