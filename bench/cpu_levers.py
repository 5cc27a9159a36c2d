"""Per-step cost of the CPU speed levers on nanoGPT's character-level recipe network.

    python bench/cpu_levers.py [--steps 40] [--repeats 5] [--threads 2]
    python bench/cpu_levers.py --precision [--steps 40] [--repeats 5]
    python bench/cpu_levers.py --generation [--repeats 5]
    python bench/cpu_levers.py --char-tokenizer [--repeats 5]
    python bench/cpu_levers.py --determinism [--steps 40] [--repeats 5]

One process; the network is the recipe's (4 layers, 4 heads, 128 dims, block 64, batch 12, vocab 67,
no bias), trained on random windows of Tiny Shakespeare. Each variant gets its own copy of the same
initial weights; variants are timed in turn (A, B, C, ..., A, B, C, ...) so machine noise hits
all of them, and the table gives the median milliseconds per optimizer step (forward, backward,
clip, AdamW step) and the ratio against the first row, lm_lab's eager path before this benchmark
(``torch.optim.AdamW`` with neither ``foreach`` nor ``fused``: what it picks on CPU by default).
Compile time (first steps of a compiled variant) is reported separately; the whole-run effect,
compile time included, is in ``bench/shakespeare_char.py``.

``--precision`` measures mixed precision instead: matmul rates in fp32 and bf16 at the recipe's and
BERT-Mini's shapes, SDPA forward + backward in fp32 and bf16 (flash and math kernels), and whole
steps in fp32, in ``bf16-mixed`` as lm_lab runs it (autocast; lm_lab's CPU attention:
``lm_lab.models.layers.sdpa``) and in ``bf16-mixed`` with SDPA called on the bf16 tensors as they
come (PyTorch's behaviour, patched in here for the comparison).

``--regional`` compares the eager bf16-mixed step with one whose transformer blocks are compiled
one by one (regional compilation: the four blocks share one graph) and one whose whole network is
compiled, compile time from the cache
``TORCHINDUCTOR_CACHE_DIR`` names (point it at an empty directory for a user's first run).

``--attention`` measures lm_lab's CPU attention under bf16 autocast: forward + backward of the
math path with bf16 matmuls (``layers._cpu_attention_math``, what ``sdpa`` runs up to
``CPU_BF16_MATH_ATTENTION_MAX_LEN`` positions) against PyTorch's fused kernel in fp32 (what it runs
beyond, and at every length before), at several lengths; then whole bf16-mixed steps with each.

``--generation`` times sampling from the recipe's network (batch 1, prompt of one token, as the
recipe's validation samples and ``lm-lab-generate`` run it) with the key/value cache
(``lm_lab.models.generation.generate``, ``layers.KVCache``) against the same loop re-reading the
window at every step (the network without ``new_kv_cache``: generation before the cache); both
produce the same tokens from the same seed, which the script checks.

``--determinism`` compares compiled bf16-mixed steps with and without PyTorch's deterministic
algorithms (``compile=true`` turns them on on CPU: ``lm_lab.training.compilation``).

``--char-tokenizer`` times the recipe's first-run data preparation on the corpus (``--data``): training
the char tokenizer and encoding the text, by ``tokenizers`` itself (``WordLevelTrainer`` and
``encode_batch`` on newline-ended pieces: lm_lab before, and what it still does for a text holding an
added token) against lm_lab's ``train_tokenizer("char")`` (characters counted) and ``CharEncoder``
(a code-point table); the script checks that both give the same ``tokenizer.json`` and ids.

``--optimizer`` measures AdamW's three CPU implementations: the optimizer step alone on the recipe's
804,352 parameters (for-loop, PyTorch's CPU default; ``foreach``; ``fused``, lm_lab's default since
``optimizer.fused=null`` picks it on CPU), then whole steps in fp32 and bf16-mixed with the for-loop
and the fused kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lm_lab.models.gpt.model as gpt_model  # noqa: E402
import lm_lab.models.layers as layers  # noqa: E402
from lm_lab.models.gpt.model import GPT, GPTConfig  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_optimizer(model: torch.nn.Module, **kw: object) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **kw)


def sdpa_as_called(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
    """The decoders' attention without lm_lab's CPU fp32 upcast: SDPA on whatever dtype autocast gave."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class Variant:
    def __init__(
        self,
        name: str,
        base: GPT,
        compile_model: bool | str,
        bf16: bool = False,
        attention: object = None,
        math_max_len: int | None = None,
        deterministic: bool = False,
        **opt_kw: object,
    ) -> None:
        self.name, self.bf16, self.attention, self.deterministic = name, bf16, attention, deterministic
        self.math_max_len = layers.CPU_BF16_MATH_ATTENTION_MAX_LEN if math_max_len is None else math_max_len
        self.model = copy.deepcopy(base)
        self.opt = make_optimizer(self.model, **opt_kw)
        if compile_model == "regional":  # each block compiled (one graph for the 4, same code); the rest eager
            for block in self.model.transformer.h:
                block.compile()
            self.fwd = self.model.loss
        elif compile_model:
            mode = compile_model if isinstance(compile_model, str) else None
            self.fwd = torch.compile(self.model.loss, mode=mode)
        else:
            self.fwd = self.model.loss
        self.compile_s: float | None = None
        self.compiled = compile_model
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # PyTorch's deterministic algorithms (what compile=true turns on on CPU), on for this variant's
        # steps only; its compiled graphs were made under the same setting (Dynamo guards on it, and on
        # warn_only too: set both on every step, or a variant compiled before the first set recompiles).
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        gpt_model.causal_attention = self.attention or ORIGINAL_ATTENTION
        layers.CPU_BF16_MATH_ATTENTION_MAX_LEN = self.math_max_len
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext():
            loss = self.fwd(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss


ORIGINAL_ATTENTION = gpt_model.causal_attention


def rate(fn: object, flops: float, n: int = 50) -> float:
    """GFLOP/s of ``fn()`` (median of 5 timings of ``n`` calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return flops / statistics.median(times) / 1e9


def precision_tables() -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    print("| matmul (M x K x N) | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("| --- | ---: | ---: | ---: |")
    for m, k, n in [(768, 128, 384), (768, 128, 512), (768, 512, 128), (4096, 256, 1024), (4096, 1024, 256)]:
        r = {}
        for dt in (torch.float32, torch.bfloat16):
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            r[dt] = rate(lambda a=a, b=b: a @ b, 2 * m * k * n)
        print(
            f"| {m} x {k} x {n} | {r[torch.float32]:.0f} | {r[torch.bfloat16]:.0f} | {r[torch.bfloat16] / r[torch.float32]:.2f}x |"
        )
    print("\n| SDPA forward + backward (B, heads, T, head dim) | kernel | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("| --- | --- | ---: | ---: | ---: |")
    for shape, causal in [((12, 4, 64, 32), True), ((32, 4, 128, 64), False)]:
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            ms = {}
            for dt in (torch.float32, torch.bfloat16):
                q, k, v = (torch.randn(*shape, dtype=dt, requires_grad=True) for _ in range(3))
                g = torch.randn(*shape, dtype=dt)

                def fwd_bwd(q=q, k=k, v=v, g=g, backend=backend, causal=causal) -> None:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)

                ms[dt] = 1.0 / rate(fwd_bwd, 1.0, n=20) / 1e6  # seconds per call -> ms
            name = "x".join(map(str, shape)) + (" causal" if causal else "")
            print(
                f"| {name} | {backend.name.lower()} | {ms[torch.float32]:.2f} | {ms[torch.bfloat16]:.2f} "
                f"| {ms[torch.bfloat16] / ms[torch.float32]:.2f}x |"
            )
    print()


def attention_table(repeats: int) -> None:
    """Forward + backward of bf16 q/k/v (as autocast hands them over): the fused kernel in fp32 vs the
    math path with bf16 matmuls, causal (decoders) and with a padding mask (BERT)."""
    import torch.nn.functional as F

    print(
        "\n| attention forward + backward (B, heads, T, head dim) | fused SDPA in fp32, ms | math, bf16 matmuls, ms | math / fused |"
    )
    print("| --- | ---: | ---: | ---: |")
    shapes = [((12, 4, 64, 32), True), ((32, 4, 128, 64), False), ((8, 12, 256, 64), True), ((4, 12, 512, 64), True)]
    for shape, causal in shapes:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=gen).bfloat16().requires_grad_() for _ in range(3))
        g = torch.randn(*shape, generator=gen).bfloat16()
        keep = torch.rand(shape[0], 1, 1, shape[2], generator=gen) > 0.1
        keep[..., 0] = True
        kw = {"is_causal": True} if causal else {"attn_mask": keep}

        def fused(kw=kw, q=q, k=k, v=v, g=g) -> None:
            F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).bfloat16().backward(g)

        def math_bf16(kw=kw, q=q, k=k, v=v, g=g) -> None:
            layers._cpu_attention_math(q, k, v, matmul_dtype=torch.bfloat16, **kw).backward(g)

        n = max(2, 20 * 64 // shape[2])
        for fn in (fused, math_bf16):
            for _ in range(3):
                fn()
        runs: dict[str, list[float]] = {"fused": [], "math": []}
        for _ in range(repeats):
            for name, fn in (("fused", fused), ("math", math_bf16)):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                runs[name].append((time.perf_counter() - t0) / n * 1e3)
        ms = {name: statistics.median(t) for name, t in runs.items()}
        label = "x".join(map(str, shape)) + (" causal" if causal else " padding mask")
        print(f"| {label} | {ms['fused']:.2f} | {ms['math']:.2f} | {ms['math'] / ms['fused']:.2f}x |")


def optimizer_table(base: GPT, repeats: int, calls: int = 20) -> None:
    """AdamW's step alone, each implementation on its own copy of the network with the same gradients."""
    kinds = {
        "for-loop (PyTorch's CPU default)": {},
        "foreach": {"foreach": True},
        "fused (lm_lab's default)": {"fused": True},
    }
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in base.parameters()]
    opts = {}
    for name, kw in kinds.items():
        model = copy.deepcopy(base)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g.clone()
        opts[name] = make_optimizer(model, **kw)
    times: dict[str, list[float]] = {name: [] for name in opts}
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                opt.step()
            times[name].append((time.perf_counter() - t0) / calls * 1e3)
    n = sum(p.numel() for p in base.parameters())
    print(f"\nAdamW step alone, {n:,} parameters in {len(grads)} tensors; median of {repeats} x {calls} steps\n")
    print("| AdamW implementation | ms / step | vs for-loop |")
    print("| --- | ---: | ---: |")
    first = statistics.median(next(iter(times.values())))
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {statistics.median(t) / first:.2f}x |")


class _WithoutCache(torch.nn.Module):
    """The network as generation saw it before the key/value cache: no ``new_kv_cache``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.config = net, net.config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)


def generation_table(base: GPT, repeats: int) -> None:
    from lm_lab.models.generation import generate

    net = base.eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    sides = {"re-reading the window": _WithoutCache(net), "key/value cache (lm_lab now)": net}
    print(f"\nsampling from the recipe's network (batch 1, one-token prompt); median of {repeats}\n")
    print("| new tokens | re-reading the window, ms | key/value cache, ms | cache / window |")
    print("| ---: | ---: | ---: | ---: |")
    for n in (64, 200):
        times: dict[str, list[float]] = {k: [] for k in sides}
        outs = {}
        for _ in range(repeats):
            for name, model in sides.items():
                t0 = time.perf_counter()
                outs[name] = generate(model, prompt, n, generator=torch.Generator().manual_seed(0))
                times[name].append((time.perf_counter() - t0) * 1e3)
        a, b = (outs[k] for k in sides)
        assert torch.equal(a, b), "the cache changed the sampled tokens"
        w, c = (statistics.median(times[k]) for k in sides)
        print(f"| {n} | {w:.1f} | {c:.1f} | {c / w:.2f}x |")


def char_tokenizer_table(text: str, repeats: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from lm_lab.data.tokenizer import CHAR_PATTERN, EOT, UNK_CHAR, CharEncoder, char_pieces, train_tokenizer

    def by_tokenizers() -> tuple[str, list[int]]:
        tok = Tokenizer(models.WordLevel(unk_token=UNK_CHAR))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=10**6, special_tokens=[EOT, UNK_CHAR], show_progress=False)
        tok.train_from_iterator(char_pieces([text]), trainer=trainer)
        encs = tok.encode_batch(list(char_pieces([text])), add_special_tokens=False)
        return tok.to_str(), [i for e in encs for i in e.ids]

    def by_lm_lab() -> tuple[str, list[int]]:
        tok = train_tokenizer("char", iter([text]), vocab_size=0)
        return tok.to_str(), CharEncoder(tok)(text).tolist()

    sides = {
        "tokenizers (trainer, encode_batch on pieces)": by_tokenizers,
        "lm_lab (counted, code-point table)": by_lm_lab,
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    outs = {}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    a, b = outs.values()
    assert a == b, "the char tokenizer or its ids differ"
    base = statistics.median(times[next(iter(sides))])
    print(f"\nthe char tokenizer on {len(text):,} characters: train + encode, median of {repeats}\n")
    print("| implementation | seconds | vs tokenizers |")
    print("| --- | ---: | ---: |")
    for name in sides:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {t / base:.3f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--precision", action="store_true", help="fp32 vs bf16-mixed (matmuls, attention, steps)")
    p.add_argument("--regional", action="store_true", help="bf16-mixed eager vs compiled blocks (regional compilation)")
    p.add_argument("--optimizer", action="store_true", help="AdamW for-loop vs foreach vs fused (alone and in steps)")
    p.add_argument("--attention", action="store_true", help="bf16-mixed attention: fused fp32 kernel vs bf16 math")
    p.add_argument("--generation", action="store_true", help="sampling with the key/value cache vs without")
    p.add_argument("--char-tokenizer", action="store_true", help="the char tokenizer: tokenizers' vs lm_lab's")
    p.add_argument(
        "--determinism", action="store_true", help="compiled bf16-mixed steps with/without deterministic algorithms"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    text = args.data.read_text(encoding="utf-8")
    if args.char_tokenizer:
        char_tokenizer_table(text, args.repeats)
        return
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    B, T = 12, 64

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - T - 1, (B,))
        return torch.stack([data[i : i + T] for i in ix]), torch.stack([data[i + 1 : i + 1 + T] for i in ix])

    cfg = GPTConfig(vocab_size=67, n_layer=4, n_head=4, n_embd=128, max_seq_len=T, dropout=0.0, bias=False)
    cfg.activation = "gelu"
    base = GPT(cfg)
    if args.generation:
        generation_table(base, args.repeats)
        return
    if args.regional:
        variants = [
            Variant("eager, bf16-mixed (lm_lab), AdamW fused", base, False, bf16=True, fused=True),
            Variant("compiled blocks (regional), bf16-mixed, AdamW fused", base, "regional", bf16=True, fused=True),
            Variant("compiled network, bf16-mixed, AdamW fused", base, True, bf16=True, fused=True),
        ]
    elif args.determinism:
        variants = [
            Variant("compiled network, bf16-mixed, AdamW fused", base, True, bf16=True, fused=True),
            Variant(
                "the same, deterministic algorithms (compile=true on CPU)",
                base,
                True,
                bf16=True,
                deterministic=True,
                fused=True,
            ),
        ]
    elif args.attention:
        attention_table(args.repeats)
        variants = [
            Variant(
                "eager, bf16-mixed, attention by the fused kernel in fp32 (before)",
                base,
                False,
                True,
                math_max_len=0,
                fused=True,
            ),
            Variant(
                "eager, bf16-mixed, attention as math with bf16 matmuls (lm_lab now)", base, False, True, fused=True
            ),
        ]
    elif args.optimizer:
        optimizer_table(base, args.repeats)
        variants = [
            Variant("eager, fp32, AdamW for-loop", base, False),
            Variant("eager, fp32, AdamW fused", base, False, fused=True),
            Variant("eager, bf16-mixed (lm_lab), AdamW for-loop", base, False, bf16=True),
            Variant(
                "eager, bf16-mixed (lm_lab), AdamW fused (the recipe's default)", base, False, bf16=True, fused=True
            ),
        ]
    elif args.precision:
        precision_tables()
        variants = [
            Variant("eager, fp32 (32-true)", base, False),
            Variant("eager, bf16-mixed as lm_lab runs it (lm_lab's CPU attention)", base, False, bf16=True),
            Variant("eager, bf16-mixed, SDPA on bf16 (PyTorch as called)", base, False, True, sdpa_as_called),
            Variant("eager, bf16-mixed (lm_lab), AdamW foreach", base, False, bf16=True, foreach=True),
        ]
    else:
        variants = [
            Variant("eager, AdamW for-loop (torch's CPU default)", base, False),
            Variant("eager, AdamW foreach", base, False, foreach=True),
            Variant("eager, AdamW fused", base, False, fused=True),
            Variant("compiled network, AdamW foreach", base, True, foreach=True),
            Variant("compiled network, AdamW fused", base, True, fused=True),
            Variant("compiled network (max-autotune), AdamW fused", base, "max-autotune", fused=True),
        ]
    batches = [batch() for _ in range(args.steps)]
    for v in variants:  # warm-up (and compilation)
        t0 = time.perf_counter()
        for x, y in batches[:3]:
            v.step(x, y)
        if v.compiled:
            v.compile_s = time.perf_counter() - t0
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            for x, y in batches:
                v.step(x, y)
            v.times.append((time.perf_counter() - t0) / len(batches) * 1e3)
    base_ms = statistics.median(variants[0].times)
    print(
        f"\nnanoGPT char recipe network, batch {B} x {T}; median of {args.repeats} x {args.steps} steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| variant | ms / step | vs first row | compile time (s) |")
    print("| --- | ---: | ---: | ---: |")
    for v in variants:
        ms = statistics.median(v.times)
        comp = f"{v.compile_s:.1f}" if v.compile_s is not None else ""
        print(f"| {v.name} | {ms:.1f} | {ms / base_ms:.2f}x | {comp} |")


if __name__ == "__main__":
    main()
