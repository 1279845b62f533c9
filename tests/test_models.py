"""DiT: shapes, adaLN-Zero init, registry, null class, TiT options, attention paths, torch.compile."""
import pytest
import torch

import ucgm_fast
from ucgm_fast.models import DiT_models, get_model
from ucgm_fast.models import dit as dit_module

# Tiny widths keep every test well under a second; the registry's real sizes are checked separately.
TINY = dict(depth=2, hidden_size=32, num_heads=2)
TIT = dict(use_rmsnorm=True, qk_norm=True, use_swiglu=True, use_rope=True)


def randomize(model, seed=0):
    """Non-zero weights everywhere (the zero init would hide most of the network from the checks)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(batch=3, channels=1, size=8, num_classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, num_classes + 1, (batch,), generator=gen)
    return x, t, y


def test_registry_has_every_size_and_patch():
    expected = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (1, 2, 4, 8)}
    assert set(DiT_models) == expected
    assert ucgm_fast.get_model is get_model


@pytest.mark.parametrize("name, depth, hidden, heads, patch", [
    ("DiT-S/2", 12, 384, 6, 2), ("DiT-B/4", 12, 768, 12, 4), ("DiT-L/8", 24, 1024, 16, 8),
    ("DiT-XL/2", 28, 1152, 16, 2), ("DiT-XL/1", 28, 1152, 16, 1), ("DiT-B/1", 12, 768, 12, 1)])
def test_registry_sizes(name, depth, hidden, heads, patch):
    with torch.device("meta"):  # no memory or init cost for the large configs
        model = get_model(name, input_size=32, in_channels=4, num_classes=1000)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (depth, hidden, heads, patch)
    assert len(model.blocks) == depth


def test_dit_s2_parameter_count():
    # Counted by hand from the DiT architecture (no learned sigma; positions are a buffer).
    D, C, p, K = 384, 4, 2, 1000
    block = (D * 6 * D + 6 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
    expected = (C * p * p * D + D) + (256 * D + D + D * D + D) + (K + 1) * D + 12 * block \
        + (D * 2 * D + 2 * D) + (D * p * p * C + p * p * C)
    with torch.device("meta"):
        model = get_model("DiT-S/2", input_size=32, in_channels=4, num_classes=K)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert "pos_embed" in dict(model.named_buffers())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model .DiT-M/2.; valid names: DiT-XL/1.*DiT-S/8"):
        get_model("DiT-M/2")


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="use_flash"):
        get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, use_flash=True, **TINY)


@pytest.mark.parametrize("kw, match", [
    (dict(input_size=9), "not divisible by patch_size"),
    (dict(num_classes=0), "num_classes"),
    (dict(attention="flash"), "attention must be"),
    (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
])
def test_bad_config_errors(kw, match):
    args = dict(input_size=8, in_channels=1, num_classes=10, **TINY)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        get_model("DiT-S/2", **args)


@pytest.mark.parametrize("name, channels, size", [("DiT-S/2", 1, 8), ("DiT-S/4", 3, 16), ("DiT-S/8", 4, 32)])
def test_attributes_and_output_shape(name, channels, size):
    model = randomize(get_model(name, input_size=size, in_channels=channels, num_classes=7, **TINY))
    assert (model.input_size, model.in_channels, model.num_classes) == (size, channels, 7)
    x, t, y = inputs(batch=3, channels=channels, size=size, num_classes=7)
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_zero_init_output_is_zero_and_blocks_are_identity():
    model = get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    tokens = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:  # adaLN-Zero: gates are zero, so each block returns its input
        assert torch.equal(block(tokens, c), tokens)
    # The rest of the network is not zero: the first step's gradient reaches the output layer.
    loss = (model(x, t, y) - x).square().mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_null_class_label_and_table_size():
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY))
    assert model.y_embedder.embedding_table.num_embeddings == 11
    x, t, _ = inputs(batch=2)
    null = torch.full((2,), 10)
    out_null, out_0 = model(x, t, null), model(x, t, torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(out_null).all()
    assert not torch.allclose(out_null, out_0)  # the null class has its own embedding
    with pytest.raises(IndexError):
        model(x, t, torch.full((2,), 11))


def test_forward_with_cfg_matches_manual_guidance():
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY))
    x, t, y = inputs(batch=2, num_classes=9)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.5), uncond + 1.5 * (cond - uncond),
                               rtol=1e-5, atol=1e-6)


def test_time_changes_output():
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY))
    x, t, y = inputs(batch=2)
    assert not torch.allclose(model(x, t, y), model(x, 1 - t, y))


@pytest.mark.parametrize("options", [{}, TIT], ids=["dit", "tit"])
def test_float64_forward(options):
    # The float64 model (the test oracle of training and sampling) computes what the float32 one does.
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **options))
    x, t, y = inputs()
    with torch.no_grad():
        out32 = model(x, t, y)
        out64 = model.double()(x.double(), t.double(), y)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-4 * float(out32.abs().max()))


@pytest.mark.parametrize("options", [
    dict(use_rmsnorm=True), dict(qk_norm=True), dict(use_swiglu=True), dict(use_rope=True), TIT],
    ids=["rmsnorm", "qknorm", "swiglu", "rope", "all"])
def test_tit_options_run_and_backprop(options):
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **options))
    x, t, y = inputs()
    x.requires_grad_(True)
    out = model(x, t, y)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_option_modules():
    model = get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **TIT)
    block = model.blocks[0]
    assert isinstance(block.norm1, dit_module.RMSNorm) and isinstance(block.attn.q_norm, dit_module.RMSNorm)
    assert isinstance(block.mlp, dit_module.SwiGLU)
    assert model.rope is not None
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    # Parameter-free norms: SwiGLU at 2/3 width keeps the MLP size close to the GELU MLP's.
    plain = get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    n_plain = sum(p.numel() for p in plain.parameters())
    n_tit = sum(p.numel() for p in model.parameters())
    assert abs(n_tit - n_plain) / n_plain < 0.02


def test_rmsnorm_is_unit_rms():
    x = torch.randn(4, 5, 64) * 3 + 1
    y = dit_module.RMSNorm()(x)
    torch.testing.assert_close(y.square().mean(-1), torch.ones(4, 5), rtol=1e-4, atol=1e-4)


def test_rope_is_a_rotation_with_relative_positions():
    rope = dit_module.RotaryEmbedding2D(head_dim=8, grid_size=3)
    q, k = torch.randn(2, 1, 9, 8, dtype=torch.float32), torch.randn(2, 1, 9, 8)
    rq, rk = rope(q), rope(k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # rotations keep norms
    assert torch.equal(rq[:, :, 0], q[:, :, 0])  # position (0, 0) is not rotated
    # Relative: the same vectors at token pairs with the same (drow, dcol) give the same dot product.
    v, w = torch.randn(8), torch.randn(8)
    seq = torch.zeros(1, 1, 9, 8)
    a = rope(seq + v)[0, 0]
    b = rope(seq + w)[0, 0]
    # tokens (0,0)->(1,1) are indices 0->4; (1,1)->(2,2) are 4->8
    torch.testing.assert_close(a[0] @ b[4], a[4] @ b[8], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        dit_module.RotaryEmbedding2D(head_dim=6, grid_size=3)


@pytest.mark.parametrize("options", [{}, TIT], ids=["plain", "tit"])
def test_math_and_sdpa_attention_agree(options):
    math = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, attention="math", **TINY,
                               **options))
    sdpa = get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, attention="sdpa", **TINY, **options)
    sdpa.load_state_dict(math.state_dict())
    x, t, y = inputs()
    torch.testing.assert_close(math(x, t, y), sdpa(x, t, y), rtol=1e-4, atol=1e-5)


def test_auto_attention_follows_the_measured_threshold():
    attn = dit_module.Attention(32, 2)
    small = torch.zeros(1, dit_module.CPU_SDPA_MIN_TOKENS - 1, 32)
    large = torch.zeros(1, dit_module.CPU_SDPA_MIN_TOKENS, 32)
    assert attn.use_sdpa(small) is False  # below the threshold CPU uses the math path
    assert attn.use_sdpa(large) is True
    assert dit_module.Attention(32, 2, attention="math").use_sdpa(large) is False
    assert dit_module.Attention(32, 2, attention="sdpa").use_sdpa(small) is True


def test_compile_fullgraph_matches_eager():
    # The TiT options exercise every custom piece (RMSNorm, QK-norm, RoPE, SwiGLU); one compile
    # keeps the test fast on 2 cores.
    torch._dynamo.reset()
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **TIT))
    x, t, y = inputs()
    # fullgraph=True raises on any graph break; the aot_eager backend checks tracing without a C++ build.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, y)
    torch.testing.assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert model.final_layer.linear.weight.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_sdpa_and_matches_cpu():
    model = randomize(get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **TIT))
    x, t, y = inputs()
    ref = model(x, t, y)
    cuda = model.cuda()
    assert cuda.blocks[0].attn.use_sdpa(torch.zeros(1, 16, 32, device="cuda"))
    torch.testing.assert_close(cuda(x.cuda(), t.cuda(), y.cuda()).cpu(), ref, rtol=1e-3, atol=1e-4)
    compiled = torch.compile(cuda, fullgraph=True)
    torch.testing.assert_close(compiled(x.cuda(), t.cuda(), y.cuda()).cpu(), ref, rtol=1e-3, atol=1e-4)


def test_tit_names_and_rmsnorm_in_float32():
    tit = get_model("TiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY)
    dit = get_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10, **TINY, **TIT)
    assert [type(m) for m in tit.modules()] == [type(m) for m in dit.modules()]
    assert get_model("TiT-S/2", input_size=8, in_channels=1, num_classes=10, use_rope=False, **TINY).rope is None
    with pytest.raises(ValueError, match="TiT"):
        get_model("TiT-Q/2")
    # 16-bit inputs are normalised in float32 (as TiT's RMSNorm), then returned in their dtype.
    x = torch.randn(4, 7, 64, dtype=torch.float64) * 30
    norm = dit_module.RMSNorm()
    expected = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = norm(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (x.to(torch.bfloat16).float() * torch.rsqrt(
        x.to(torch.bfloat16).float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16))
    assert (got.double() - expected.double()).abs().max() <= 0.02
    assert torch.allclose(norm(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), rtol=1e-14)  # float64 stays
