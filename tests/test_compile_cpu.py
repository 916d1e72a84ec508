"""What lora_linear puts into a torch.compile graph, checked on the CPU (the same dynamo trace, fake functions,
AOTAutograd partition and, for backend="inductor", the same lowering as on a GPU; only the CUDA-graph recording of
mode="reduce-overhead" needs a GPU: tests/test_gpu_graphs.py).

mode="reduce-overhead" of a patched PEFT Llama's training step at dropout 0 failed on the GPU with "These storage
data ptrs are not allocated in pool ... a custom op's meta function" (bench/results/h200_2026-11-30, run 4), while
the same model at dropout 0.05 and the op with a seed drawn inside the compiled function ran. The difference: at
p = 0, lora_linear passed a module-level CPU tensor (``ops._NO_SEED``) as the op's seed. Dynamo lifted it into
every graph as an input, and the op's autograd saved it for backward, so the forward graph also returned it: a
tensor the graph did not allocate (and on the CPU), inside graphs whose inputs and outputs CUDA graph trees track by
storage. Now no seed is passed without dropout, and with dropout the seed is drawn inside the graph on x's device.
These tests pin that: no graph (dynamo's, AOT's forward and backward) takes a seed input or returns a seed it did
not create, and the compiled step matches eager.
"""
import os

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import lora_kernels

S = 0.75


class _Graphs:
    """A torch.compile backend that records dynamo's graph and AOTAutograd's forward and backward graphs and runs
    them eagerly."""

    def __init__(self):
        self.dynamo, self.fw, self.bw = [], [], []

        def fw(gm, _inputs):
            self.fw.append(gm)
            return make_boxed_func(gm.forward)

        def bw(gm, _inputs):
            self.bw.append(gm)
            return make_boxed_func(gm.forward)

        self._aot = aot_autograd(fw_compiler=fw, bw_compiler=bw)

    def __call__(self, gm, example_inputs):
        self.dynamo.append(gm)
        return self._aot(gm, example_inputs)


def _placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _val(node):
    v = node.meta.get("val", node.meta.get("example_value"))
    return v if isinstance(v, torch.Tensor) else None


def _is_seed_like(v):
    return v is not None and v.dtype == torch.int64 and v.dim() == 0


_SEED_ARG = {"lora_fwd": 7, "lora_bwd": 8, "dora_fwd": 8, "dora_bwd": 12}  # the seed's index in each op's schema


def _op_seeds(gm, name):
    """The seed argument of every call of the op ``name`` in the graph."""
    op = getattr(torch.ops.lora_kernels, name).default
    return [n.args[_SEED_ARG[name]] for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def _inputs(M=12, K=40, N=24, r=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    W, b = torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g)
    return x, W, b, A, B


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_no_seed_tensor_enters_the_graph_without_dropout(p):
    """p = 0: the op gets no seed, no graph has a seed-like input, and the forward graph returns none to save. With
    dropout the seed is made inside the forward graph (torch.randint on x's device), saved for backward as an
    activation the graph itself allocated, never taken from outside."""
    torch._dynamo.reset()
    x, W, b, A, B = _inputs()
    graphs = _Graphs()

    def f(x, A, B):
        return lora_kernels.lora_linear(x, W, b, A, B, S, dropout_p=p, backend="torch")

    xg, Ag, Bg = (t.clone().requires_grad_() for t in (x, A, B))
    y = torch.compile(f, backend=graphs, fullgraph=True)(xg, Ag, Bg)
    y.sum().backward()
    assert len(graphs.fw) == len(graphs.bw) == 1
    fw, bw = graphs.fw[0], graphs.bw[0]
    for gm in (graphs.dynamo[0], fw, bw):
        seeds = [n.name for n in _placeholders(gm) if _is_seed_like(_val(n))]
        if gm is bw and p > 0:
            assert len(seeds) == 1, seeds  # the forward's own seed, saved for backward
        else:
            assert seeds == [], (gm is fw, gm is bw, seeds)
    (fwd_seed,) = _op_seeds(fw, "lora_fwd")
    (bwd_seed,) = _op_seeds(bw, "lora_bwd")
    if p == 0.0:
        assert fwd_seed is None and bwd_seed is None
    else:
        assert fwd_seed.op == "call_function" and "randint" in str(fwd_seed.target), fwd_seed.target
        assert _val(fwd_seed).device == x.device
        assert bwd_seed.op == "placeholder"
    # the compiled forward and backward match eager (same mask at p > 0: compare against the mask of its seed)
    if p == 0.0:
        xe, Ae, Be = (t.clone().requires_grad_() for t in (x, A, B))
        ye = lora_kernels.lora_linear(xe, W, b, Ae, Be, S, backend="torch")
        ye.sum().backward()
        torch.testing.assert_close(y, ye)
        for got, want in ((xg.grad, xe.grad), (Ag.grad, Ae.grad), (Bg.grad, Be.grad)):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dora_no_seed_tensor_enters_the_graph(p):
    """dora_linear as lora_linear: without dropout its op gets no seed and no graph has a seed-like input; with
    dropout the seed is drawn inside the forward graph and saved for backward as the graph's own activation."""
    torch._dynamo.reset()
    x, W, b, A, B = _inputs()
    m = torch.rand(W.shape[0]) + 0.5
    graphs = _Graphs()

    def f(x, A, B, m):
        return lora_kernels.dora_linear(x, W, b, A, B, S, m, dropout_p=p, backend="torch")

    xg, Ag, Bg, mg = (t.clone().requires_grad_() for t in (x, A, B, m))
    y = torch.compile(f, backend=graphs, fullgraph=True)(xg, Ag, Bg, mg)
    y.sum().backward()
    assert graphs.fw and graphs.bw
    for gm in graphs.dynamo + graphs.fw:
        assert not [n.name for n in _placeholders(gm) if _is_seed_like(_val(n))], "a seed entered the graph"
    fwd_seeds = [s for gm in graphs.fw for s in _op_seeds(gm, "dora_fwd")]
    bwd_seeds = [s for gm in graphs.bw for s in _op_seeds(gm, "dora_bwd")]
    assert len(fwd_seeds) == len(bwd_seeds) == 1
    if p == 0.0:
        assert fwd_seeds == [None] and bwd_seeds == [None]
        xe, Ae, Be, me = (t.clone().requires_grad_() for t in (x, A, B, m))
        lora_kernels.dora_linear(xe, W, b, Ae, Be, S, me, backend="torch").sum().backward()
        for got, want in ((xg.grad, xe.grad), (Ag.grad, Ae.grad), (Bg.grad, Be.grad), (mg.grad, me.grad)):
            torch.testing.assert_close(got, want)
    else:
        assert fwd_seeds[0].op == "call_function" and "randint" in str(fwd_seeds[0].target)
        assert bwd_seeds[0].op == "placeholder"


def test_registered_op_accepts_no_seed_only_without_dropout():
    x, W, b, A, B = _inputs()
    y, u = torch.ops.lora_kernels.lora_fwd(x, W, b, A, B, S, 0.0, None, 0, "torch")
    y2, u2 = torch.ops.lora_kernels.lora_fwd(x, W, b, A, B, S, 0.0, torch.tensor(3), 0, "torch")
    assert torch.equal(y, y2) and torch.equal(u, u2)
    dy = torch.randn_like(y)
    grads = torch.ops.lora_kernels.lora_bwd(dy, x, W, A, B, u, S, 0.0, None, 0, "torch", True, True, True)
    assert all(g.numel() for g in grads)
    with pytest.raises(ValueError, match="needs a seed"):
        torch.ops.lora_kernels.lora_fwd(x, W, b, A, B, S, 0.1, None, 0, "torch")


def _peft_llama(dropout):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"])
    model = peft.get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape) * 0.05)
    return model.train()


def _step(call, model, ids):
    for prm in model.parameters():
        prm.grad = None
    loss = call(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: prm.grad.clone() for n, prm in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_peft_llama_training_step_graphs(dropout):
    """The training step of a patched PEFT Llama (the GPU test's model, smaller) compiled on the CPU: no graph takes
    a seed-like input except the backward's saved forward seeds, every lora op's seed is None at dropout 0 and made
    in the forward graph otherwise; at dropout 0 loss and LoRA grads equal eager's."""
    torch._dynamo.reset()
    model = _peft_llama(dropout)
    lora_kernels.patch_peft(model, backend="torch")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _step(model, model, ids)
    graphs = _Graphs()
    compiled = torch.compile(model, backend=graphs)
    loss, grads = _step(compiled, model, ids)
    assert graphs.fw and graphs.bw
    n_fwd = 0
    for gm in graphs.dynamo + graphs.fw:
        assert not [n.name for n in _placeholders(gm) if _is_seed_like(_val(n))], "a seed entered the graph"
    for fw in graphs.fw:
        for seed in _op_seeds(fw, "lora_fwd"):
            n_fwd += 1
            assert (seed is None) if dropout == 0.0 else (seed.op == "call_function")
    assert n_fwd == 14  # 7 projections x 2 layers
    for bw in graphs.bw:
        for seed in _op_seeds(bw, "lora_bwd"):
            assert (seed is None) if dropout == 0.0 else (seed.op == "placeholder")
    if dropout == 0.0:
        torch.testing.assert_close(loss, eager_loss)
        assert grads.keys() == eager_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], eager_grads[n], msg=n)
    else:
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def test_peft_llama_inductor_cpu_matches_eager():
    """The default backend (inductor) on the CPU runs the same fake functions and lowering that reduce-overhead
    wraps on a GPU: the step compiles and matches eager at dropout 0."""
    torch._dynamo.reset()
    model = _peft_llama(0.0)
    lora_kernels.patch_peft(model, backend="torch")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _step(model, model, ids)
    compiled = torch.compile(model)
    for _ in range(2):
        loss, grads = _step(compiled, model, ids)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dora_compiles_to_one_graph(backend):
    """dora_linear under torch.compile(fullgraph=True) on every backend: whether the Triton passes can run is a
    constant of the process that dynamo takes at trace time (it may import the backend, which dynamo cannot trace),
    as it takes the backend's name; the graph's forward and grads match eager."""
    if backend not in lora_kernels.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    torch._dynamo.reset()
    # the Triton passes run on CPU tensors under the interpreter only: on a GPU host without it, on CUDA tensors
    dev = "cuda" if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    x, W = torch.randn(8, 16, device=dev), torch.randn(12, 16, device=dev) / 4
    A, B = torch.randn(4, 16, device=dev).requires_grad_(), torch.randn(12, 4, device=dev).requires_grad_()
    m = (torch.rand(12, device=dev) + 0.5).requires_grad_()
    f = torch.compile(lambda x: lora_kernels.dora_linear(x, W, None, A, B, 2.0, m, backend=backend),
                      backend="aot_eager", fullgraph=True)
    y = f(x)
    grads = torch.autograd.grad(y.square().sum(), (A, B, m))
    y0 = lora_kernels.dora_linear(x, W, None, A, B, 2.0, m, backend=backend)
    grads0 = torch.autograd.grad(y0.square().sum(), (A, B, m))
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    for g, g0 in zip(grads, grads0):
        torch.testing.assert_close(g, g0, rtol=1e-5, atol=1e-5)
