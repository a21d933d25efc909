// Compiled global merge for tokenunify.agglomerate.merge: waterz's iterative region merging with
// exactly the semantics of the Python reference ``agglomerate_graph_python`` (merge.py):
//
//   - the edge with the lowest (score, edge index) is popped; the merge level is the largest
//     score popped so far (deleted edges included);
//   - a deleted edge is skipped; a stale edge is re-scored and pushed again;
//   - otherwise its regions merge: the one with fewer live neighbours is absorbed; each of its
//     edges moves to the survivor or, when the survivor already has an edge to that neighbour,
//     the two merge: statistics add into the edge with the lower current (score, key), which
//     becomes stale and takes the smaller key of the two (queued again under it when that is
//     smaller; the old entry is skipped); the other is deleted. A key is an edge index.
//
// Everything is held in flat arrays (struct of arrays), never one object per edge:
//   edges        eu, ev, key (int64), score (double), stale/deleted (uint8)     34 B per edge
//   mean state   sum (double), count (int64)                                    16 B per edge
//   quantile     total (int64), offset (int64), length (int32) into a pool of
//                (bin int32, count int64) pairs, compacted when half garbage   20 B per edge
//                                                                  + 12 B per histogram bin
//   adjacency    incident edge ids per fragment (int64, deleted ids dropped lazily)
//                                                                  16 B per edge (+24 B per node)
//   edge lookup  open-addressing table (u, v) -> edge, load 1/3..1/2  32-48 B per edge
//   heap         4-ary heap of (score, key, edge), one or two per live edge  24-48 B per edge
// about 140-200 B per edge for the mean scoring by this budget; measured with the inputs, the
// outputs and the Python side's copies, about 250 B per edge against about 700 B for the Python
// loop (benchmarks/bench_merge.py).
// Scores are computed in double with the same operations as the Python code (no fast-math), so
// the popped order, and therefore the merge history, is identical.
#include <torch/extension.h>

#include <cstdint>
#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace {

using i64 = int64_t;

class EdgeTable {  // (u, v) with u < v < 2^32 -> edge id; linear probing with tombstones
 public:
  explicit EdgeTable(i64 n) { rehash(n); }

  static uint64_t key(i64 u, i64 v) { return ((uint64_t)u << 32) | (uint64_t)v; }
  void prefetch(uint64_t k) const { __builtin_prefetch(&slots_[slot(k)]); }

  i64 find(uint64_t k) const {
    for (uint64_t i = slot(k);; i = (i + 1) & mask_) {
      const Slot &s = slots_[i];
      if (s.k == kEmpty) return -1;
      if (s.k == k) return s.e;
    }
  }
  void insert(uint64_t k, i64 e) {
    if (2 * (used_ + 1) > (i64)slots_.size()) rehash(live_ + 1);
    uint64_t i = slot(k);
    while (slots_[i].k < kTomb) i = (i + 1) & mask_;  // skip live slots
    if (slots_[i].k == kEmpty) ++used_;
    slots_[i] = {k, e};
    ++live_;
  }
  void erase(uint64_t k) {
    for (uint64_t i = slot(k);; i = (i + 1) & mask_) {
      Slot &s = slots_[i];
      if (s.k == kEmpty) return;
      if (s.k == k) { s.k = kTomb; --live_; return; }
    }
  }

 private:
  struct Slot { uint64_t k; i64 e; };  // 16 B: four slots per cache line
  static constexpr uint64_t kEmpty = ~0ULL, kTomb = ~0ULL - 1;  // ids < 2^32: never a key
  std::vector<Slot> slots_;
  uint64_t mask_ = 0;
  i64 used_ = 0, live_ = 0;  // used: live + tombstones

  uint64_t slot(uint64_t x) const {
    x ^= x >> 33; x *= 0xFF51AFD7ED558CCDULL; x ^= x >> 33;  // murmur3 finaliser
    x *= 0xC4CEB9FE1A85EC53ULL; x ^= x >> 33;
    return x & mask_;
  }
  void rehash(i64 n) {
    uint64_t cap = 16;
    while (cap < (uint64_t)(3 * n)) cap <<= 1;  // load <= 1/3 after a rehash, <= 1/2 before
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(cap, {kEmpty, 0});
    mask_ = cap - 1; used_ = 0; live_ = 0;
    for (const Slot &s : old)
      if (s.k < kTomb) insert(s.k, s.e);
  }
};

class Heap {  // 4-ary min-heap of (score, edge): a node's children share one cache line
 public:
  struct Item {  // (score, key) orders; the edge rides along
    double score;
    i64 key, e;
    bool operator<(const Item &o) const {
      return score < o.score || (score == o.score && (key < o.key || (key == o.key && e < o.e)));
    }
  };
  explicit Heap(std::vector<Item> items) : h_(std::move(items)) {
    if (h_.size() >= 2)
      for (i64 i = ((i64)h_.size() - 2) / 4; i >= 0; --i) down(i);
  }
  bool empty() const { return h_.empty(); }
  const Item &top() const { return h_[0]; }
  void push(Item x) {
    i64 i = (i64)h_.size();
    h_.push_back(x);
    while (i > 0) {
      const i64 p = (i - 1) / 4;
      if (!(x < h_[p])) break;
      h_[i] = h_[p];
      i = p;
    }
    h_[i] = x;
  }
  void pop() {
    h_[0] = h_.back();
    h_.pop_back();
    if (!h_.empty()) down(0);
  }

 private:
  std::vector<Item> h_;
  void down(i64 i) {
    const i64 n = (i64)h_.size();
    const Item x = h_[i];
    for (;;) {
      const i64 c = 4 * i + 1;
      if (c >= n) break;
      i64 m = c;
      for (i64 k = c + 1; k < std::min(c + 4, n); ++k)
        if (h_[k] < h_[m]) m = k;
      if (!(h_[m] < x)) break;
      h_[i] = h_[m];
      i = m;
    }
    h_[i] = x;
  }
};

struct Graph {
  std::vector<i64> eu, ev;
  std::vector<double> score;
  std::vector<i64> key;  // tie-break: the smallest edge index among the merged parts
  std::vector<uint8_t> stale, deleted;
  bool mean;
  // mean
  std::vector<double> sum;
  std::vector<i64> count;
  // quantile: per-edge histogram in a pool of sorted (bin, count) pairs
  i64 quantile = 50, bins = 256;
  std::vector<i64> htot, hoff;
  std::vector<int32_t> hlen, pbin;
  std::vector<i64> pcnt;
  i64 garbage = 0;

  double rescore(i64 e) const {
    if (mean) return 1.0 - sum[e] / (double)count[e];
    const i64 pivot = quantile * htot[e] / 100 + 1;
    i64 run = 0;
    for (i64 k = hoff[e]; k < hoff[e] + hlen[e]; ++k) {
      run += pcnt[k];
      if (run >= pivot) return 1.0 - (pbin[k] + 0.5) / (double)bins;
    }
    return 1.0 - (bins - 0.5) / (double)bins;
  }

  void add_into(i64 keep, i64 drop) {
    if (mean) { sum[keep] += sum[drop]; count[keep] += count[drop]; return; }
    const i64 a0 = hoff[keep], a1 = a0 + hlen[keep], b0 = hoff[drop], b1 = b0 + hlen[drop];
    const i64 start = (i64)pbin.size();
    i64 i = a0, j = b0;
    while (i < a1 || j < b1) {  // merge two sorted lists, adding counts of equal bins
      if (j >= b1 || (i < a1 && pbin[i] < pbin[j])) { pbin.push_back(pbin[i]); pcnt.push_back(pcnt[i]); ++i; }
      else if (i >= a1 || pbin[j] < pbin[i]) { pbin.push_back(pbin[j]); pcnt.push_back(pcnt[j]); ++j; }
      else { pbin.push_back(pbin[i]); pcnt.push_back(pcnt[i] + pcnt[j]); ++i; ++j; }
    }
    garbage += hlen[keep] + hlen[drop];
    hoff[keep] = start;
    hlen[keep] = (int32_t)((i64)pbin.size() - start);
    htot[keep] += htot[drop];
    hlen[drop] = 0;
    if (garbage > 1024 && 2 * garbage > (i64)pbin.size()) compact();
  }

  void compact() {  // move the live histograms to a fresh pool
    std::vector<int32_t> nb;
    std::vector<i64> nc;
    nb.reserve(pbin.size() - garbage);
    nc.reserve(pbin.size() - garbage);
    for (size_t e = 0; e < hoff.size(); ++e) {
      if (deleted[e]) { hlen[e] = 0; continue; }
      const i64 o = (i64)nb.size();
      for (i64 k = hoff[e]; k < hoff[e] + hlen[e]; ++k) { nb.push_back(pbin[k]); nc.push_back(pcnt[k]); }
      hoff[e] = o;
    }
    pbin.swap(nb);
    pcnt.swap(nc);
    garbage = 0;
  }
};

template <typename T>
T *ptr(const torch::Tensor &t) { return t.data_ptr<T>(); }

// eu, ev: int64 (E,), u < v, ids in 1..n_fragments. kind 0: mean (sums float64, counts int64);
// kind 1: quantile (histograms as CSR: hist_off int64 (E+1,), hist_bin int32, hist_cnt int64,
// each edge's bins sorted and distinct). keys int64 (E,): the tie-break of each edge (empty:
// its index, for edges sorted by (u, v)); scores float64 and stale uint8 (E,): the stored
// scores and flags of edges handed up by a hierarchy node (empty: scored here, all fresh);
// frozen uint8 (n_fragments + 1,): the segments frozen in a hierarchy node (empty: none).
// Returns (u, v, level) of the merges in order (int64, int64, float64), then the residual (the
// live edges with a frozen end, empty without frozen): input index, u, v, key (int64), score
// (float64), stale (uint8), and sum (float64), count (int64) for the mean or hist_off, hist_bin,
// hist_cnt for the quantile.
std::vector<torch::Tensor> merge(torch::Tensor eu_t, torch::Tensor ev_t, int64_t kind,
                                 torch::Tensor sums, torch::Tensor counts, torch::Tensor hist_off,
                                 torch::Tensor hist_bin, torch::Tensor hist_cnt, int64_t quantile,
                                 int64_t bins, int64_t n_fragments, double max_threshold,
                                 torch::Tensor keys, torch::Tensor scores, torch::Tensor stale,
                                 torch::Tensor frozen_t) {
  const i64 E = eu_t.numel();
  auto check = [](const torch::Tensor &t, c10::ScalarType type, i64 n, const char *name) {
    TORCH_CHECK(t.scalar_type() == type && t.is_contiguous() && (n < 0 || t.numel() == n),
                "merge: ", name, " has the wrong type, layout or length");
  };
  check(eu_t, torch::kInt64, -1, "eu");
  check(ev_t, torch::kInt64, E, "ev");
  if (kind == 0) {
    check(sums, torch::kFloat64, E, "sums");
    check(counts, torch::kInt64, E, "counts");
  } else {
    check(hist_off, torch::kInt64, E + 1, "hist_off");
    check(hist_bin, torch::kInt32, ptr<i64>(hist_off)[E], "hist_bin");
    check(hist_cnt, torch::kInt64, ptr<i64>(hist_off)[E], "hist_cnt");
  }
  if (keys.numel()) check(keys, torch::kInt64, E, "keys");
  if (scores.numel()) check(scores, torch::kFloat64, E, "scores");
  if (stale.numel()) check(stale, torch::kUInt8, E, "stale");
  if (frozen_t.numel()) check(frozen_t, torch::kUInt8, n_fragments + 1, "frozen");
  Graph g;
  g.eu.assign(ptr<i64>(eu_t), ptr<i64>(eu_t) + E);
  g.ev.assign(ptr<i64>(ev_t), ptr<i64>(ev_t) + E);
  g.stale.assign(E, 0);
  g.deleted.assign(E, 0);
  g.key.resize(E);
  for (i64 e = 0; e < E; ++e) g.key[e] = keys.numel() ? ptr<i64>(keys)[e] : e;
  g.mean = kind == 0;
  if (g.mean) {
    g.sum.assign(ptr<double>(sums), ptr<double>(sums) + E);
    g.count.assign(ptr<i64>(counts), ptr<i64>(counts) + E);
  } else {
    g.quantile = quantile;
    g.bins = bins;
    const i64 *off = ptr<i64>(hist_off);
    const i64 H = off[E];
    g.pbin.assign(ptr<int32_t>(hist_bin), ptr<int32_t>(hist_bin) + H);
    g.pcnt.assign(ptr<i64>(hist_cnt), ptr<i64>(hist_cnt) + H);
    g.hoff.assign(off, off + E);
    g.hlen.resize(E);
    g.htot.assign(E, 0);
    for (i64 e = 0; e < E; ++e) {
      g.hlen[e] = (int32_t)(off[e + 1] - off[e]);
      for (i64 k = off[e]; k < off[e + 1]; ++k) g.htot[e] += g.pcnt[k];
    }
  }
  g.score.resize(E);
  for (i64 e = 0; e < E; ++e) g.score[e] = scores.numel() ? ptr<double>(scores)[e] : g.rescore(e);
  if (stale.numel()) g.stale.assign(ptr<uint8_t>(stale), ptr<uint8_t>(stale) + E);
  std::vector<uint8_t> frozen;
  if (frozen_t.numel()) frozen.assign(ptr<uint8_t>(frozen_t), ptr<uint8_t>(frozen_t) + n_fragments + 1);

  std::vector<std::vector<i64>> adj(n_fragments + 1);
  std::vector<i64> deg(n_fragments + 1, 0);
  EdgeTable table(E);
  for (i64 e = 0; e < E; ++e) {
    adj[g.eu[e]].push_back(e);
    adj[g.ev[e]].push_back(e);
    ++deg[g.eu[e]];
    ++deg[g.ev[e]];
    table.insert(EdgeTable::key(g.eu[e], g.ev[e]), e);
  }
  std::vector<Heap::Item> items(E);
  for (i64 e = 0; e < E; ++e) items[e] = {g.score[e], g.key[e], e};
  Heap heap(std::move(items));
  std::vector<i64> mu, mv;
  std::vector<double> ml;
  double level = -std::numeric_limits<double>::infinity();
  auto other = [&](i64 e, i64 x) { return g.eu[e] == x ? g.ev[e] : g.eu[e]; };
  struct Work { i64 eb, n; uint64_t kb, ka; };
  std::vector<Work> work;

  while (!heap.empty() && heap.top().score < max_threshold) {
    const Heap::Item top = heap.top();
    const i64 e = top.e;
    heap.pop();
    level = std::max(level, top.score);
    if (g.deleted[e] || top.key != g.key[e]) continue;  // gone, or queued again under a new key
    if (g.stale[e]) {
      g.score[e] = g.rescore(e);
      g.stale[e] = 0;
      heap.push({g.score[e], g.key[e], e});
      continue;
    }
    i64 a = g.eu[e], b = g.ev[e];
    if (!frozen.empty()) {  // a hierarchy node: the merge may have to wait for the parent
      bool wait = frozen[a] || frozen[b];
      for (i64 r : {a, b}) {  // an edge to a frozen segment scored no higher: a tie that the
        if (wait) break;      // parent may resolve first (see hierarchy.py)
        for (i64 x : adj[r])
          if (!g.deleted[x] && frozen[other(x, r)] && g.score[x] <= top.score) {
            wait = true;
            break;
          }
      }
      if (wait) {
        frozen[a] = frozen[b] = 1;
        continue;
      }
    }
    if (deg[a] < deg[b]) std::swap(a, b);  // absorb the region with fewer neighbours
    mu.push_back(a);
    mv.push_back(b);
    ml.push_back(level);
    g.deleted[e] = 1;
    table.erase(EdgeTable::key(g.eu[e], g.ev[e]));
    --deg[a];
    std::vector<i64> incident;
    incident.swap(adj[b]);
    // the live edges of b with their neighbours; the hash slots they will touch are
    // prefetched first, so that the cache misses of the lookups overlap
    work.clear();
    for (i64 eb : incident) {
      if (g.deleted[eb]) continue;
      const i64 n = other(eb, b);
      const uint64_t kb = EdgeTable::key(std::min(b, n), std::max(b, n));
      const uint64_t ka = EdgeTable::key(std::min(a, n), std::max(a, n));
      table.prefetch(kb);
      table.prefetch(ka);
      work.push_back({eb, n, kb, ka});
    }
    for (const Work &w : work) {
      const i64 eb = w.eb, n = w.n;
      table.erase(w.kb);
      const i64 lo = std::min(a, n), hi = std::max(a, n);
      const i64 ea = table.find(w.ka);
      if (ea < 0) {  // move the edge to the surviving region
        g.eu[eb] = lo;
        g.ev[eb] = hi;
        table.insert(w.ka, eb);
        adj[a].push_back(eb);
        ++deg[a];
        continue;
      }
      i64 keep, drop;
      if (g.score[eb] > g.score[ea] || (g.score[eb] == g.score[ea] && g.key[eb] > g.key[ea])) {
        keep = ea;  // keep the edge with the lower (score, key)
        drop = eb;
      } else {  // b's edge is kept and moved to a
        keep = eb;
        drop = ea;
        g.eu[keep] = lo;
        g.ev[keep] = hi;
        table.erase(w.ka);
        table.insert(w.ka, keep);
        adj[a].push_back(keep);
      }
      g.add_into(keep, drop);
      g.deleted[drop] = 1;
      g.stale[keep] = 1;
      if (g.key[drop] < g.key[keep]) {  // queue it by its new key at once
        g.key[keep] = g.key[drop];
        heap.push({g.score[keep], g.key[keep], keep});
      }
      --deg[n];
    }
    deg[b] = 0;
    std::vector<i64> &la = adj[a];
    if ((i64)la.size() > 2 * deg[a] + 16) {  // drop deleted ids now and then
      i64 w = 0;
      for (i64 x : la)
        if (!g.deleted[x]) la[w++] = x;
      la.resize(w);
    }
  }
  auto out_i = [](const std::vector<i64> &v) {
    auto t = torch::empty({(i64)v.size()}, torch::kInt64);
    std::copy(v.begin(), v.end(), t.data_ptr<i64>());
    return t;
  };
  auto lev = torch::empty({(i64)ml.size()}, torch::kFloat64);
  std::copy(ml.begin(), ml.end(), lev.data_ptr<double>());
  std::vector<i64> re, ru, rv, rk, rc, roff{0}, rcnt;
  std::vector<double> rs, rsum;
  std::vector<uint8_t> rst;
  std::vector<int32_t> rbin;
  if (!frozen.empty()) {
    for (i64 e = 0; e < E; ++e) {
      if (g.deleted[e] || !(frozen[g.eu[e]] || frozen[g.ev[e]])) continue;
      re.push_back(e); ru.push_back(g.eu[e]); rv.push_back(g.ev[e]); rk.push_back(g.key[e]);
      rs.push_back(g.score[e]); rst.push_back(g.stale[e]);
      if (g.mean) { rsum.push_back(g.sum[e]); rc.push_back(g.count[e]); continue; }
      for (i64 k = g.hoff[e]; k < g.hoff[e] + g.hlen[e]; ++k) {
        rbin.push_back(g.pbin[k]);
        rcnt.push_back(g.pcnt[k]);
      }
      roff.push_back((i64)rbin.size());
    }
  }
  auto out_d = [](const std::vector<double> &v) {
    auto t = torch::empty({(i64)v.size()}, torch::kFloat64);
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t;
  };
  auto st = torch::empty({(i64)rst.size()}, torch::kUInt8);
  std::copy(rst.begin(), rst.end(), st.data_ptr<uint8_t>());
  auto bn = torch::empty({(i64)rbin.size()}, torch::kInt32);
  std::copy(rbin.begin(), rbin.end(), bn.data_ptr<int32_t>());
  std::vector<torch::Tensor> out{out_i(mu), out_i(mv), lev, out_i(re), out_i(ru), out_i(rv),
                                 out_i(rk), out_d(rs), st};
  if (g.mean) {
    out.push_back(out_d(rsum));
    out.push_back(out_i(rc));
  } else {
    out.push_back(out_i(roff));
    out.push_back(bn);
    out.push_back(out_i(rcnt));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("merge", &merge, "waterz iterative region merging on a fragment graph (see merge.py)");
}
