// Visual-token compression, reproducing edgemm/tokens (docs/tokens.md "What every runtime must reproduce").
#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine.h"

namespace edgemm {
namespace {

int attention_block(const Config& c, bool has_layer, int64_t layer) {
  const int run = c.feature_blocks;
  int64_t b = !has_layer ? run - 1 : (layer < 0 ? layer + c.v.layers : layer);
  if (b < 0 || b >= run)
    fail(EDGEMM_ERR_FORMAT, "visual_tokens: [CLS] attention of ViT block " + std::to_string(has_layer ? layer : b) +
                                " is not available; blocks 0.." + std::to_string(run - 1) + " run");
  return int(b);
}

// k largest scores, ties to the lower index, returned ascending.
std::vector<int32_t> keep_top(const std::vector<float>& score, int64_t k) {
  std::vector<int32_t> order(score.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return score[size_t(a)] > score[size_t(b)]; });
  order.resize(size_t(k));
  std::sort(order.begin(), order.end());
  return order;
}

std::vector<float> gather(const float* x, int64_t D, const std::vector<int32_t>& idx) {
  std::vector<float> out(idx.size() * size_t(D));
  for (size_t i = 0; i < idx.size(); ++i) std::copy(x + idx[i] * D, x + (idx[i] + 1) * D, out.begin() + i * D);
  return out;
}

std::vector<float> unit_rows(const float* x, int64_t n, int64_t D) {
  std::vector<float> u(static_cast<size_t>(n * D));
  for (int64_t i = 0; i < n; ++i) {
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) ss += x[i * D + d] * x[i * D + d];
    float nrm = std::max(std::sqrt(ss), 1e-12f);
    for (int64_t d = 0; d < D; ++d) u[size_t(i * D + d)] = x[i * D + d] / nrm;
  }
  return u;
}

// cosine similarity matrix of a [n, D] vs b [m, D] (already unit rows)
std::vector<float> sim(const std::vector<float>& a, int64_t n, const std::vector<float>& b, int64_t m, int64_t D) {
  std::vector<float> s(static_cast<size_t>(n * m));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc += a[size_t(i * D + d)] * b[size_t(j * D + d)];
      s[size_t(i * m + j)] = acc;
    }
  return s;
}

std::vector<float> cos_dist(const float* x, int64_t n, int64_t D) {
  std::vector<float> u = unit_rows(x, n, D);
  std::vector<float> s = sim(u, n, u, n, D);
  for (auto& v : s) v = 1.0f - v;
  return s;
}

int64_t argmax_first(const std::vector<float>& v) {
  int64_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[size_t(best)]) best = int64_t(i);
  return best;
}

std::vector<int32_t> max_min_select(const std::vector<float>& dist, int64_t n, int64_t k, int64_t first,
                                    const std::vector<float>* weight) {
  std::vector<char> chosen(size_t(n), 0);
  std::vector<int32_t> sel;
  sel.push_back(int32_t(first));
  chosen[size_t(first)] = 1;
  std::vector<float> mind(dist.begin() + first * n, dist.begin() + (first + 1) * n);
  for (int64_t i = 1; i < k; ++i) {
    int64_t j = -1;
    float best = -INFINITY;
    for (int64_t p = 0; p < n; ++p) {
      if (chosen[size_t(p)]) continue;
      float sc = weight ? mind[size_t(p)] * (*weight)[size_t(p)] : mind[size_t(p)];
      if (j < 0 || sc > best) {
        best = sc;
        j = p;
      }
    }
    if (j < 0) break;
    sel.push_back(int32_t(j));
    chosen[size_t(j)] = 1;
    for (int64_t p = 0; p < n; ++p) mind[size_t(p)] = std::min(mind[size_t(p)], dist[size_t(j * n + p)]);
  }
  std::sort(sel.begin(), sel.end());
  return sel;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  uint64_t z = x;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<float> cls_score(const Config& c, const std::map<int, std::vector<float>>& attn, const std::vector<int>& blocks) {
  std::vector<float> s;
  for (int b : blocks) {
    auto it = attn.find(b);
    if (it == attn.end()) fail(EDGEMM_ERR_INTERNAL, "missing [CLS] attention of block " + std::to_string(b));
    if (s.empty()) s.assign(it->second.size(), 0.f);
    for (size_t i = 0; i < s.size(); ++i) s[i] += it->second[i];
  }
  (void)c;
  return s;
}

}  // namespace

std::vector<int32_t> keep_top_k(const std::vector<float>& score, int64_t k) { return keep_top(score, k); }

int early_block(const Config& c, int64_t k) {
  const TokenSetting& t = c.tokens;
  if (t.method != "fastervlm" || !t.early || k >= c.v.patches()) return -1;
  const int b = attention_block(c, t.has_layer, t.layer);
  return b < c.feature_blocks - 1 ? b : -1;
}

std::vector<int> token_blocks(const Config& c) {
  const TokenSetting& t = c.tokens;
  if (t.method == "fastervlm" || t.method == "clsdiv" || t.method == "clsmerge")
    return {attention_block(c, t.has_layer, t.layer)};
  if (t.method == "vtccls") {
    int e = attention_block(c, t.has_end, t.end);
    int64_t s = t.start < 0 ? t.start + c.v.layers : t.start;
    if (s < 0 || s > e) fail(EDGEMM_ERR_FORMAT, "visual_tokens: vtccls start block " + std::to_string(t.start) + " must be in 0.." + std::to_string(e));
    std::vector<int> r;
    for (int64_t b = s; b <= e; ++b) r.push_back(int(b));
    return r;
  }
  return {};
}

void compress_tokens(Model& m, Session& s, const float* feats, int64_t P, const std::map<int, std::vector<float>>& attn,
                     int64_t k, std::vector<float>* embeds, std::vector<int32_t>* index) {
  const Config& c = m.cfg;
  const std::string& meth = c.tokens.method;
  const int64_t D = c.v.hidden, Dt = c.t.hidden;
  std::vector<int32_t> idx;
  std::vector<float> out_feats;  // to project
  if (meth == "fastervlm" || meth == "vtccls") {
    idx = keep_top(cls_score(c, attn, token_blocks(c)), k);
    out_feats = gather(feats, D, idx);
  } else if (meth == "divprune" || meth == "clsdiv") {
    std::vector<float> all;
    project_tokens(m, s, feats, P, &all);
    std::vector<float> dist = cos_dist(all.data(), P, Dt);
    if (meth == "divprune") {
      std::vector<float> nearest(size_t(P), INFINITY);
      for (int64_t j = 0; j < P; ++j)
        for (int64_t i = 0; i < P; ++i)
          if (i != j) nearest[size_t(j)] = std::min(nearest[size_t(j)], dist[size_t(i * P + j)]);
      idx = max_min_select(dist, P, k, argmax_first(nearest), nullptr);
    } else {
      std::vector<float> a = cls_score(c, attn, token_blocks(c));
      float mx = *std::max_element(a.begin(), a.end());
      std::vector<float> w(a.size());
      for (size_t i = 0; i < a.size(); ++i) w[i] = std::pow(a[i] / mx, float(c.tokens.alpha));
      idx = max_min_select(dist, P, k, argmax_first(a), &w);
    }
    *embeds = gather(all.data(), Dt, idx);
    *index = idx;
    return;
  } else if (meth == "pool") {
    const int64_t g = c.v.grid();
    int64_t bh = -1, bw = -1;
    for (int64_t h = 1; h <= g; ++h)
      if (k % h == 0) {
        int64_t w = k / h;
        if (h <= w && w <= g && (bh < 0 || w - h < bw - bh)) { bh = h; bw = w; }
      }
    if (bh < 0) fail(EDGEMM_ERR_FORMAT, "pool cannot make " + std::to_string(k) + " tokens");
    out_feats.assign(size_t(k * D), 0.f);
    for (int64_t i = 0; i < bh; ++i)
      for (int64_t j = 0; j < bw; ++j) {
        int64_t r0 = (i * g) / bh, r1 = ((i + 1) * g + bh - 1) / bh;
        int64_t c0 = (j * g) / bw, c1 = ((j + 1) * g + bw - 1) / bw;
        float* o = &out_feats[size_t((i * bw + j) * D)];
        for (int64_t d = 0; d < D; ++d) {
          float sum = 0.f;
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t cc = c0; cc < c1; ++cc) sum += feats[(r * g + cc) * D + d];
          o[d] = sum / float((r1 - r0) * (c1 - c0));
        }
        idx.push_back(int32_t(r0 * g + c0));
      }
  } else if (meth == "random") {
    std::vector<uint64_t> keys(static_cast<size_t>(P));
    for (int64_t i = 0; i < P; ++i) keys[size_t(i)] = splitmix64((c.tokens.seed << 32) | uint64_t(i));
    std::vector<int32_t> order(static_cast<size_t>(P));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return keys[size_t(a)] < keys[size_t(b)]; });
    order.resize(size_t(k));
    std::sort(order.begin(), order.end());
    idx = order;
    out_feats = gather(feats, D, idx);
  } else if (meth == "clsmerge") {
    std::vector<float> a = cls_score(c, attn, token_blocks(c));
    idx = keep_top(a, k);
    std::vector<float> u = unit_rows(feats, P, D);
    std::vector<float> uk = gather(u.data(), D, idx);
    std::vector<float> sm = sim(u, P, uk, k, D);
    std::vector<int64_t> assign(static_cast<size_t>(P));
    for (int64_t p = 0; p < P; ++p) {
      int64_t best = 0;
      for (int64_t j = 1; j < k; ++j)
        if (sm[size_t(p * k + j)] > sm[size_t(p * k + best)]) best = j;
      assign[size_t(p)] = best;
    }
    for (int64_t j = 0; j < k; ++j) assign[size_t(idx[size_t(j)])] = j;
    std::vector<float> num(size_t(k * D), 0.f), den(size_t(k), 0.f);
    for (int64_t p = 0; p < P; ++p) {
      int64_t j = assign[size_t(p)];
      for (int64_t d = 0; d < D; ++d) num[size_t(j * D + d)] += feats[p * D + d] * a[size_t(p)];
      den[size_t(j)] += a[size_t(p)];
    }
    out_feats.resize(size_t(k * D));
    for (int64_t j = 0; j < k; ++j)
      for (int64_t d = 0; d < D; ++d) out_feats[size_t(j * D + d)] = num[size_t(j * D + d)] / den[size_t(j)];
  } else if (meth == "tome") {
    int64_t n = P;
    std::vector<float> x(feats, feats + P * D);
    std::vector<float> size(size_t(P), 1.f);
    std::vector<int32_t> pos(static_cast<size_t>(P));
    std::iota(pos.begin(), pos.end(), 0);
    while (n > k) {
      const int64_t na = (n + 1) / 2, nb = n / 2;
      std::vector<float> xa, xb, sa, sb;
      std::vector<int32_t> pa, pb;
      for (int64_t i = 0; i < n; ++i) {
        auto& X = (i % 2 == 0) ? xa : xb;
        X.insert(X.end(), x.begin() + i * D, x.begin() + (i + 1) * D);
        ((i % 2 == 0) ? sa : sb).push_back(size[size_t(i)]);
        ((i % 2 == 0) ? pa : pb).push_back(pos[size_t(i)]);
      }
      const int64_t r = std::min(n - k, na);
      std::vector<float> smat = sim(unit_rows(xa.data(), na, D), na, unit_rows(xb.data(), nb, D), nb, D);
      std::vector<float> best(static_cast<size_t>(na));
      std::vector<int64_t> dst(static_cast<size_t>(na));
      for (int64_t i = 0; i < na; ++i) {
        int64_t bj = 0;
        for (int64_t j = 1; j < nb; ++j)
          if (smat[size_t(i * nb + j)] > smat[size_t(i * nb + bj)]) bj = j;
        best[size_t(i)] = nb ? smat[size_t(i * nb + bj)] : -INFINITY;
        dst[size_t(i)] = bj;
      }
      std::vector<int64_t> order(static_cast<size_t>(na));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return best[size_t(a)] > best[size_t(b)]; });
      // size-weighted merge of the r best a's into their b's (all at once)
      std::vector<float> num(static_cast<size_t>(nb * D));
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t d = 0; d < D; ++d) num[size_t(j * D + d)] = xb[size_t(j * D + d)] * sb[size_t(j)];
      std::vector<float> sb2 = sb;
      for (int64_t t = 0; t < r; ++t) {
        int64_t i = order[size_t(t)], j = dst[size_t(i)];
        for (int64_t d = 0; d < D; ++d) num[size_t(j * D + d)] += xa[size_t(i * D + d)] * sa[size_t(i)];
        sb2[size_t(j)] += sa[size_t(i)];
      }
      struct Tok { int32_t pos; float size; int64_t src; bool is_b; };
      std::vector<Tok> toks;
      for (int64_t t = r; t < na; ++t) toks.push_back({pa[size_t(order[size_t(t)])], sa[size_t(order[size_t(t)])], order[size_t(t)], false});
      for (int64_t j = 0; j < nb; ++j) toks.push_back({pb[size_t(j)], sb2[size_t(j)], j, true});
      std::sort(toks.begin(), toks.end(), [](const Tok& a, const Tok& b) { return a.pos < b.pos; });
      std::vector<float> nx(toks.size() * size_t(D));
      size.assign(toks.size(), 0.f);
      pos.assign(toks.size(), 0);
      for (size_t t = 0; t < toks.size(); ++t) {
        const Tok& tk = toks[t];
        for (int64_t d = 0; d < D; ++d)
          nx[t * D + d] = tk.is_b ? num[size_t(tk.src * D + d)] / sb2[size_t(tk.src)] : xa[size_t(tk.src * D + d)];
        size[t] = tk.size;
        pos[t] = tk.pos;
      }
      x.swap(nx);
      n = int64_t(toks.size());
    }
    idx = pos;
    out_feats = x;
  } else {
    fail(EDGEMM_ERR_UNSUPPORTED, "visual-token method '" + meth + "' is not implemented");
  }
  project_tokens(m, s, out_feats.data(), int64_t(idx.size()), embeds);
  *index = idx;
}

}  // namespace edgemm
