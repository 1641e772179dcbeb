"""What the recipe report measures besides accuracy: weight bytes and estimated prefill FLOPs."""

from __future__ import annotations

FLOPS_PROMPT = "how many objects are there?"


def prefill_flops(cfg, text_tokens: int) -> dict:
    """Estimated FLOPs (2 x multiply-accumulates) to prefill one image + a prompt of `text_tokens`
    text tokens (the prompt without its image token), up to the first token's logits.

    Counts the ViT blocks that run (patch embedding, attention projections, QK^T and AV over 1+P
    tokens, MLP), the token method's own work (similarity matrices), the projector on the tokens it
    sees, and every decoder layer on T = text_tokens + K positions (causal attention: T(T+1)/2 query-key
    pairs per head) plus the LM head on the last position. Dense count: N:M sparsity and low-bit
    weights change the cost per MAC on hardware that exploits them, not the number counted here.
    Returns {"vision", "tokens", "projector", "llm", "total", "visual_tokens", "prompt_tokens"}.
    """
    from ..tokens import get_setting, visual_token_count

    v, t = cfg.vision, cfg.text
    p = v.num_patches
    n = p + 1
    dv, di = v.hidden_size, v.intermediate_size
    vision = p * v.num_channels * v.patch_size**2 * dv
    vision += cfg.feature_layer_index * (n * (4 * dv * dv + 2 * dv * di) + 2 * n * n * dv)
    k = visual_token_count(cfg)
    s = get_setting(cfg)
    projected = cfg.num_visual_tokens
    method_macs = 0
    if s is not None and k < cfg.num_visual_tokens:
        if s.method in ("divprune", "clsdiv"):
            method_macs = p * p * t.hidden_size  # cosine matrix of the projected tokens
        elif s.method == "clsmerge":
            projected = k
            method_macs = p * k * dv
        elif s.method == "tome":
            projected = k
            m, rounds = p, 0
            while m > k and rounds < 64:
                method_macs += ((m + 1) // 2) * (m // 2) * dv
                m -= min(m - k, (m + 1) // 2)
                rounds += 1
        else:
            projected = k
    projector = projected * (dv * t.hidden_size + t.hidden_size * t.hidden_size)
    T = text_tokens + k
    d, hd = t.hidden_size, t.head_dim
    per_layer = T * (2 * d * t.num_heads * hd + 2 * d * t.num_kv_heads * hd + 3 * d * t.intermediate_size)
    per_layer += 2 * t.num_heads * hd * T * (T + 1) // 2
    llm = t.num_layers * per_layer + d * t.vocab_size
    macs = {"vision": vision, "tokens": method_macs, "projector": projector, "llm": llm}
    out = {k2: 2 * v2 for k2, v2 in macs.items()}
    out["total"] = sum(out.values())
    out["visual_tokens"] = k
    out["prompt_tokens"] = T
    return out


def prompt_text_tokens(processor, question: str = FLOPS_PROMPT) -> int:
    """Text tokens of the model's prompt for `question` (BOS included, the image token excluded)."""
    return len(processor.encode_prompt(question)) - 1


def weight_bytes(model) -> tuple[int, str]:
    """(bytes, source): edgemm.compress.weight_bytes when the weight-compression package provides it,
    else the bytes of the tensors a checkpoint stores."""
    try:
        from ..compress import weight_bytes as wb  # the weight-compression API (packed int4/int8, masks)
    except ImportError:
        wb = None
    if wb is not None:
        return int(wb(model)), "edgemm.compress.weight_bytes"
    from ..models.checkpoint import state_dict_for_saving

    return sum(v.numel() * v.element_size() for v in state_dict_for_saving(model).values()), "checkpoint tensors"
