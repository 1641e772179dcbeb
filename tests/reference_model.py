"""A deliberately plain float64 numpy implementation of EdgeVLM's forward pass (loops over heads,
positions and patches) that the torch model is tested against."""

import math

import numpy as np

_erf = np.vectorize(math.erf)


def act(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "quick_gelu":
        return x / (1 + np.exp(-1.702 * x))
    if name == "silu":
        return x / (1 + np.exp(-x))
    raise ValueError(name)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def linear(sd, name, x):
    y = x @ sd[name + ".weight"].T
    if name + ".bias" in sd:
        y = y + sd[name + ".bias"]
    return y


def vit(sd, cfg, pixel):
    """pixel [3, S, S] -> list of hidden states (embeddings, after block 1, ...) each [1+P, D]."""
    v = cfg.vision
    p, g = v.patch_size, v.grid
    patches = []
    for gy in range(g):
        for gx in range(g):
            patches.append(pixel[:, gy * p:(gy + 1) * p, gx * p:(gx + 1) * p].reshape(-1))
    x = linear(sd, "vision.patch_embed", np.stack(patches))
    x = np.concatenate([sd["vision.class_embedding"][None], x]) + sd["vision.position_embedding"]
    if v.pre_layernorm:
        x = layer_norm(x, sd["vision.pre_layernorm.weight"], sd["vision.pre_layernorm.bias"], v.layer_norm_eps)
    states = [x]
    hd = v.head_dim
    for i in range(v.num_layers):
        pre = f"vision.layers.{i}."
        h = layer_norm(x, sd[pre + "layer_norm1.weight"], sd[pre + "layer_norm1.bias"], v.layer_norm_eps)
        q, k, vv = (linear(sd, pre + f"self_attn.{n}_proj", h) for n in "qkv")
        heads = []
        for hh in range(v.num_heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            a = softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd))
            heads.append(a @ vv[:, sl])
        x = x + linear(sd, pre + "self_attn.out_proj", np.concatenate(heads, -1))
        h = layer_norm(x, sd[pre + "layer_norm2.weight"], sd[pre + "layer_norm2.bias"], v.layer_norm_eps)
        x = x + linear(sd, pre + "mlp.fc2", act(v.hidden_act, linear(sd, pre + "mlp.fc1", h)))
        states.append(x)
    return states


def cls_attention(sd, cfg, pixel, block):
    """[H, P]: softmax over all tokens of the [CLS] query at `block`, patch columns only."""
    v = cfg.vision
    x = vit(sd, cfg, pixel)[block]
    pre = f"vision.layers.{block}."
    h = layer_norm(x, sd[pre + "layer_norm1.weight"], sd[pre + "layer_norm1.bias"], v.layer_norm_eps)
    q, k = linear(sd, pre + "self_attn.q_proj", h), linear(sd, pre + "self_attn.k_proj", h)
    hd = v.head_dim
    return np.stack([softmax(q[0, hh * hd:(hh + 1) * hd] @ k[:, hh * hd:(hh + 1) * hd].T / math.sqrt(hd))[1:]
                     for hh in range(v.num_heads)])


def rope(x, pos, theta):
    """Rotate pairs (i, i + d/2) of one head vector by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    out = x.copy()
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        c, s = math.cos(ang), math.sin(ang)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def forward(sd, cfg, input_ids, pixel):
    """Logits [T', V] of one sequence with one image token (or none when pixel is None)."""
    t = cfg.text
    emb = sd["text.embed_tokens.weight"][np.asarray(input_ids)]
    if pixel is not None:
        feats = vit(sd, cfg, pixel)[cfg.feature_layer_index]
        if cfg.vision_feature_select == "default":
            feats = feats[1:]
        img = linear(sd, "projector.linear_2", act(cfg.projector.hidden_act, linear(sd, "projector.linear_1", feats)))
        p = list(input_ids).index(cfg.image_token_id)
        emb = np.concatenate([emb[:p], img, emb[p + 1:]])
    x = emb
    n = x.shape[0]
    rep = t.num_heads // t.num_kv_heads
    hd = t.head_dim
    for i in range(t.num_layers):
        pre = f"text.layers.{i}."
        h = rms_norm(x, sd[pre + "input_layernorm.weight"], t.rms_norm_eps)
        q = linear(sd, pre + "self_attn.q_proj", h)
        k = linear(sd, pre + "self_attn.k_proj", h)
        v = linear(sd, pre + "self_attn.v_proj", h)
        out = np.zeros_like(q)
        for hh in range(t.num_heads):
            kv = hh // rep
            qh = np.stack([rope(q[j, hh * hd:(hh + 1) * hd], j, t.rope_theta) for j in range(n)])
            kh = np.stack([rope(k[j, kv * hd:(kv + 1) * hd], j, t.rope_theta) for j in range(n)])
            vh = v[:, kv * hd:(kv + 1) * hd]
            for j in range(n):
                a = softmax(qh[j] @ kh[: j + 1].T / math.sqrt(hd))
                out[j, hh * hd:(hh + 1) * hd] = a @ vh[: j + 1]
        x = x + linear(sd, pre + "self_attn.o_proj", out)
        h = rms_norm(x, sd[pre + "post_attention_layernorm.weight"], t.rms_norm_eps)
        g = act("silu", linear(sd, pre + "mlp.gate_proj", h)) * linear(sd, pre + "mlp.up_proj", h)
        x = x + linear(sd, pre + "mlp.down_proj", g)
    x = rms_norm(x, sd["text.norm.weight"], t.rms_norm_eps)
    head = sd.get("text.lm_head.weight", sd["text.embed_tokens.weight"])
    return x @ head.T


def state_dict_f64(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
