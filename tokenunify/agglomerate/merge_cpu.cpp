// Compiled global merge for tokenunify.agglomerate.merge: waterz's iterative region merging with
// exactly the semantics of the Python reference ``merge_node`` (merge.py):
//
//   - the edge with the lowest (score, key, edge index) is popped; the merge level is the largest
//     score popped so far (deleted edges included);
//   - a deleted edge is skipped; a stale edge is re-scored and pushed again;
//   - otherwise its regions merge: the one with fewer live neighbours is absorbed; each of its
//     edges moves to the survivor or, when the survivor already has an edge to that neighbour,
//     the two merge: statistics add into the edge with the lower current (score, key), which
//     becomes stale and takes the smaller key of the two (queued again under it when that is
//     smaller; the old entry is skipped); the other is deleted.
//
// Keys (int64, any values) are replaced by their dense ranks on entry and restored on output,
// so that a queue entry is 16 bytes: (score, rank << 32 | edge). Everything is held in flat
// arrays, never one object per edge, laid out so that one edge's hot fields share a cache line:
//   edges        score, statistics, stored ends, key rank, flags in one struct  40 B per edge
//   histograms   (bin << 48 | count) words in one pool, compacted when its garbage outgrows
//                the live words plus half the edge count
//                                                                          8 B per bin held
//   adjacency    (neighbour, edge) per fragment and edge end (dead entries dropped lazily)
//                                                                          16 B per edge (+24 B per node)
//   regions      union-find parents, degrees, marks: 12 B per node; dead edges: 1 bit per edge
//                in a hierarchy node also the frozen mask and the ties' answers: 6 B per node
//   queue        the quantile's scores take `bins` values: one binary heap per value (the one in
//                use is small and stays in cache); the mean: an aligned 4-ary heap
//                                                                          16-32 B per edge
// about 80-100 B per edge by this budget (benchmarks/bench_merge.py measures it with the inputs
// and outputs: 130 B). The merge is bound by memory latency: every step touches a random edge
// and region. So an absorbed region is never rewritten into the edges and lists that name it:
// it points at its absorber (union-find), and stored ends and neighbour ids resolve through it.
// A moved edge is then not touched at all; only edges that merge are. Which of the absorbed
// region's neighbours the absorber already has an edge to is found by marking the absorber's
// neighbours (an array indexed by region, mostly in cache) or, when the absorber's list is
// longer than the neighbours' degrees added up (a large region absorbing small ones, where the
// marks would cost a pass over its list per merge), by searching the neighbours' lists. The
// arrays are not madvised for transparent huge pages: with THP's default `defrag=madvise` a
// fault on such a range compacts memory in the faulting thread; on the 1.5 M-edge grid the
// hint made merges slower, not faster (README, Concepts, step 4 of the agglomeration).
// Against the former design (a hash table of (u, v) -> edge, every moved edge's ends
// rewritten), on the 1.5 M-edge grid (2.2 M pops, 3.2 M moved edges, 1.0 M edge merges,
// 512 k merges): about 11 % less time and 130 against 155 B per edge. What is left is mostly
// the popped edges, the merging edges and their histograms, and the adjacency lists, each a
// cache miss. Scores are computed in double with the same operations as the Python code (no
// fast-math), so the popped order, and therefore the merge history, is identical.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

namespace {

using i64 = int64_t;
using u32 = uint32_t;
using u64 = uint64_t;

// kTie: re-scored at the current level (a hierarchy node counts it as tied there)
constexpr u32 kDeleted = 1u << 31, kStale = 1u << 30, kTie = 1u << 29, kLenMask = kTie - 1;
constexpr int kBinShift = 48;
constexpr u64 kCountMask = (1ULL << kBinShift) - 1;

struct Edge {  // 40 B
  double score;  // the stored score
  union {
    double sum;  // mean: sum of affinities
    i64 hoff;    // quantile: offset of the histogram in the pool
  };
  i64 count;   // mean: samples; quantile: histogram total
  u32 u, v;    // ends as given (u < v); current ends resolve through the union-find
  u32 key;     // dense rank of the tie-break key
  u32 meta;    // deleted, stale, tie, histogram length
  bool deleted() const { return meta & kDeleted; }
  bool stale() const { return meta & kStale; }
  u32 hlen() const { return meta & kLenMask; }
};

template <typename T>
struct Buffer {  // a growable array without zero-filling, 64-byte aligned
  T *p = nullptr;
  i64 n = 0, cap = 0;
  Buffer() = default;
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
  ~Buffer() { std::free(p); }
  void reserve(i64 c) {
    if (c <= cap) return;
    c = std::max<i64>(c, 2 * cap);
    const size_t bytes = ((size_t)c * sizeof(T) + 63) / 64 * 64;
    T *q = static_cast<T *>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(q, "merge: out of memory");
    if (n) std::memcpy(q, p, (size_t)n * sizeof(T));
    std::free(p);
    p = q;
    cap = c;
  }
  void swap(Buffer &o) {
    std::swap(p, o.p);
    std::swap(n, o.n);
    std::swap(cap, o.cap);
  }
};

class Heap {  // 4-ary min-heap of (score, rank << 32 | edge); children of i share a cache line
 public:
  struct Item {
    double score;
    u64 ke;
    bool operator<(const Item &o) const {
      return score < o.score || (score == o.score && ke < o.ke);
    }
  };
  explicit Heap(i64 n) { h_.reserve(n + kPad + 1); h_.n = kPad; }
  bool empty() const { return h_.n == kPad; }
  const Item &top() const { return h_.p[kPad]; }
  template <typename F>
  void near_top(F f) const {  // the entries popped next: the top two levels of the heap
    for (i64 i = 0; i < std::min<i64>(h_.n - kPad, 5); ++i) f(h_.p[kPad + i].ke);
  }
  Item *raw(i64 n) {  // fill n items, then heapify()
    h_.reserve(kPad + n);
    h_.n = kPad + n;
    return h_.p + kPad;
  }
  void heapify() {
    const i64 n = h_.n - kPad;
    if (n >= 2)
      for (i64 i = (n - 2) / 4; i >= 0; --i) down(i);
  }
  void push(Item x) {
    h_.reserve(h_.n + 1);
    Item *h = h_.p + kPad;
    i64 i = h_.n++ - kPad;
    while (i > 0) {
      const i64 p = (i - 1) / 4;
      if (!(x < h[p])) break;
      h[i] = h[p];
      i = p;
    }
    h[i] = x;
  }
  void pop() {
    Item *h = h_.p + kPad;
    h[0] = h[h_.n - 1 - kPad];
    --h_.n;
    if (!empty()) down(0);
  }

 private:
  static constexpr i64 kPad = 3;  // logical i at i + 3: children 4i+1..4i+4 at 4(i+1)..4(i+1)+3
  Buffer<Item> h_;
  void down(i64 i) {
    Item *h = h_.p + kPad;
    const i64 n = h_.n - kPad;
    const Item x = h[i];
    for (;;) {
      const i64 c = 4 * i + 1;
      if (c >= n) break;
      i64 m = c;
      if (c + 3 < n) {  // all four children
        const i64 m1 = h[c + 1] < h[c] ? c + 1 : c;
        const i64 m2 = h[c + 3] < h[c + 2] ? c + 3 : c + 2;
        m = h[m2] < h[m1] ? m2 : m1;
      } else {
        for (i64 k = c + 1; k < n; ++k)
          if (h[k] < h[m]) m = k;
      }
      if (!(h[m] < x)) break;
      h[i] = h[m];
      i = m;
    }
    h[i] = x;
  }
};


// The quantile scoring's scores take only `bins` values, 1 - (bin + 0.5) / bins: one binary heap
// of (rank << 32 | edge) per score value, so that the heap in use is small and stays in cache.
// Pops in exactly the (score, rank, edge) order of the 4-ary heap.
class BucketQueue {
 public:
  BucketQueue(i64 bins) : bins_(bins), b_(bins) {}
  // the bucket of a score, or -1 when it is not one of the quantile's values
  i64 bucket(double score) const {
    const double x = (1.0 - score) * (double)bins_ - 0.5;
    if (!(x > -0.5 && x < (double)bins_ - 0.5)) return -1;
    const i64 bin = std::llround(x);
    if (1.0 - ((double)bin + 0.5) / (double)bins_ != score) return -1;
    return bins_ - 1 - bin;  // ascending score
  }
  double score(i64 k) const { return 1.0 - ((double)(bins_ - 1 - k) + 0.5) / (double)bins_; }
  void add(i64 k, u64 ke) { b_[k].push_back(ke); }  // before heapify()
  void heapify() {
    for (auto &h : b_) std::make_heap(h.begin(), h.end(), std::greater<u64>());
    n_ = 0;
    for (auto &h : b_) n_ += (i64)h.size();
    cur_ = 0;
    settle();
  }
  bool empty() const { return n_ == 0; }
  double top_score() const { return score(cur_); }
  u64 top_ke() const { return b_[cur_].front(); }
  template <typename F>
  void near_top(F f) const {  // the entries popped next: the top four levels of the heap
    const auto &h = b_[cur_];
    for (size_t i = 0; i < std::min<size_t>(h.size(), 15); ++i) f(h[i]);
  }
  void pop() {
    std::pop_heap(b_[cur_].begin(), b_[cur_].end(), std::greater<u64>());
    b_[cur_].pop_back();
    --n_;
    settle();
  }
  void push(i64 k, u64 ke) {
    b_[k].push_back(ke);
    std::push_heap(b_[k].begin(), b_[k].end(), std::greater<u64>());
    ++n_;
    if (k < cur_) cur_ = k;
  }

 private:
  i64 bins_, n_ = 0, cur_ = 0;
  std::vector<std::vector<u64>> b_;
  void settle() {
    if (n_ == 0) return;
    while (b_[cur_].empty()) ++cur_;
  }
};


class Queue {  // the bucket queue when every score is a quantile value, else the 4-ary heap
 public:
  using Item = Heap::Item;
  Queue(const Edge *ed, i64 E, bool quantile, i64 bins)
      : heap_(quantile ? 0 : E), bq_(quantile ? bins : 0) {
    buckets_ = quantile;
    for (i64 e = 0; buckets_ && e < E; ++e)
      if (bq_.bucket(ed[e].score) < 0) buckets_ = false;  // a score from elsewhere: no buckets
    if (buckets_) {
      for (i64 e = 0; e < E; ++e) bq_.add(bq_.bucket(ed[e].score), ke(ed[e], e));
      bq_.heapify();
      return;
    }
    Item *items = heap_.raw(E);
    for (i64 e = 0; e < E; ++e) items[e] = {ed[e].score, ke(ed[e], e)};
    heap_.heapify();
  }
  static u64 ke(const Edge &x, i64 e) { return ((u64)x.key << 32) | (u64)e; }
  bool empty() const { return buckets_ ? bq_.empty() : heap_.empty(); }
  Item top() const { return buckets_ ? Item{bq_.top_score(), bq_.top_ke()} : heap_.top(); }
  void pop() { buckets_ ? bq_.pop() : heap_.pop(); }
  template <typename F>
  void near_top(F f) const {
    if (empty()) return;
    buckets_ ? bq_.near_top(f) : heap_.near_top(f);
  }
  void push(Item x) {
    if (!buckets_) return heap_.push(x);
    const i64 k = bq_.bucket(x.score);
    TORCH_CHECK(k >= 0, "merge: score ", x.score, " is not a quantile value");
    bq_.push(k, x.ke);
  }

 private:
  bool buckets_;
  Heap heap_;
  BucketQueue bq_;
};

struct Graph {
  Buffer<Edge> edges;
  bool mean = true;
  i64 quantile = 50, bins = 256;
  Buffer<u64> pool;  // quantile: sorted (bin << 48 | count) words per edge
  i64 garbage = 0;

  double rescore(const Edge &e) const {
    if (mean) return 1.0 - e.sum / (double)e.count;
    const i64 pivot = quantile * e.count / 100 + 1;
    i64 run = 0;
    const u64 *h = pool.p + e.hoff;
    for (u32 k = 0; k < e.hlen(); ++k) {
      run += (i64)(h[k] & kCountMask);
      if (run >= pivot) return 1.0 - ((double)(h[k] >> kBinShift) + 0.5) / (double)bins;
    }
    return 1.0 - (bins - 0.5) / (double)bins;
  }

  void add_into(Edge &keep, Edge &drop) {
    if (mean) {
      keep.sum += drop.sum;
      keep.count += drop.count;
      return;
    }
    const u32 la = keep.hlen(), lb = drop.hlen();
    pool.reserve(pool.n + la + lb);
    const u64 *a = pool.p + keep.hoff, *b = pool.p + drop.hoff;
    u64 *o = pool.p + pool.n;
    const i64 start = pool.n;
    u32 i = 0, j = 0;
    while (i < la && j < lb) {  // merge two sorted lists, adding counts of equal bins
      const u64 x = a[i], y = b[j];
      if ((x >> kBinShift) < (y >> kBinShift)) { *o++ = x; ++i; }
      else if ((y >> kBinShift) < (x >> kBinShift)) { *o++ = y; ++j; }
      else { *o++ = x + (y & kCountMask); ++i; ++j; }
    }
    while (i < la) *o++ = a[i++];
    while (j < lb) *o++ = b[j++];
    pool.n = o - pool.p;
    garbage += la + lb;
    keep.hoff = start;
    keep.meta = (keep.meta & ~kLenMask) | (u32)(pool.n - start);
    keep.count += drop.count;
    drop.meta &= ~kLenMask;
    // compact() scans every edge: wait for garbage worth that scan as well as the live words
    if (garbage > 1024 && garbage > (pool.n - garbage) + edges.n / 2) compact();
  }

  void compact() {  // move the live histograms to a fresh pool
    Buffer<u64> fresh;
    fresh.reserve(std::max<i64>(pool.n - garbage, 16));
    for (i64 e = 0; e < edges.n; ++e) {
      Edge &x = edges.p[e];
      if (x.deleted()) { x.meta &= ~kLenMask; continue; }
      std::memcpy(fresh.p + fresh.n, pool.p + x.hoff, x.hlen() * sizeof(u64));
      x.hoff = fresh.n;
      fresh.n += x.hlen();
    }
    pool.swap(fresh);
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
  TORCH_CHECK(E < (1LL << 31) && n_fragments < (1LL << 32) - 1,
              "merge: at most 2^31 edges and 2^32 - 2 fragments per call");
  if (kind == 0) {
    check(sums, torch::kFloat64, E, "sums");
    check(counts, torch::kInt64, E, "counts");
  } else {
    TORCH_CHECK(bins >= 2 && bins <= (1 << 16), "merge: bins must be in 2..65536");
    check(hist_off, torch::kInt64, E + 1, "hist_off");
    check(hist_bin, torch::kInt32, ptr<i64>(hist_off)[E], "hist_bin");
    check(hist_cnt, torch::kInt64, ptr<i64>(hist_off)[E], "hist_cnt");
  }
  if (keys.numel()) check(keys, torch::kInt64, E, "keys");
  if (scores.numel()) check(scores, torch::kFloat64, E, "scores");
  if (stale.numel()) check(stale, torch::kUInt8, E, "stale");
  if (frozen_t.numel()) check(frozen_t, torch::kUInt8, n_fragments + 1, "frozen");
  const i64 *eu = ptr<i64>(eu_t), *ev = ptr<i64>(ev_t);
  for (i64 e = 0; e < E; ++e)
    TORCH_CHECK(eu[e] >= 1 && eu[e] < ev[e] && ev[e] <= n_fragments,
                "merge: edge ", e, " (", eu[e], ", ", ev[e], ") is not 1 <= u < v <= ",
                n_fragments);

  // keys -> dense ranks (order and equality kept); korig maps a rank back
  std::vector<u32> rank(E);
  std::vector<i64> korig;
  if (keys.numel()) {
    const i64 *k = ptr<i64>(keys);
    std::vector<u32> idx(E);
    std::iota(idx.begin(), idx.end(), 0u);
    std::sort(idx.begin(), idx.end(), [k](u32 a, u32 b) { return k[a] < k[b]; });
    for (i64 i = 0; i < E; ++i) {
      if (korig.empty() || korig.back() != k[idx[i]]) korig.push_back(k[idx[i]]);
      rank[idx[i]] = (u32)(korig.size() - 1);
    }
  } else {
    std::iota(rank.begin(), rank.end(), 0u);
  }

  Graph g;
  g.mean = kind == 0;
  g.quantile = quantile;
  g.bins = bins;
  g.edges.reserve(std::max<i64>(E, 1));
  g.edges.n = E;
  Edge *ed = g.edges.p;
  if (!g.mean) {
    const i64 *off = ptr<i64>(hist_off);
    const int32_t *hb = ptr<int32_t>(hist_bin);
    const i64 *hc = ptr<i64>(hist_cnt);
    g.pool.reserve(std::max<i64>(2 * off[E], 16));
    g.pool.n = off[E];
    i64 total = 0;
    for (i64 k = 0; k < off[E]; ++k) {
      TORCH_CHECK(hb[k] >= 0 && hb[k] < bins && hc[k] >= 0, "merge: histogram entry ", k,
                  " has bin ", hb[k], " or count ", hc[k], " out of range");
      total += hc[k];
      g.pool.p[k] = ((u64)hb[k] << kBinShift) | (u64)hc[k];
    }
    TORCH_CHECK(total < (i64)kCountMask, "merge: histogram counts add up to 2^48 or more");
    for (i64 e = 0; e < E; ++e) {
      Edge &x = ed[e];
      x.hoff = off[e];
      x.count = 0;
      for (i64 k = off[e]; k < off[e + 1]; ++k) x.count += hc[k];
      x.meta = (u32)(off[e + 1] - off[e]);
    }
  } else {
    const double *s = ptr<double>(sums);
    const i64 *c = ptr<i64>(counts);
    for (i64 e = 0; e < E; ++e) {
      ed[e].sum = s[e];
      ed[e].count = c[e];
      ed[e].meta = 0;
    }
  }
  for (i64 e = 0; e < E; ++e) {
    Edge &x = ed[e];
    x.u = (u32)eu[e];
    x.v = (u32)ev[e];
    x.key = rank[e];
    x.score = scores.numel() ? ptr<double>(scores)[e] : g.rescore(x);
    if (stale.numel() && ptr<uint8_t>(stale)[e]) x.meta |= kStale;
  }
  std::vector<u32>().swap(rank);
  std::vector<uint8_t> frozen;
  if (frozen_t.numel()) frozen.assign(ptr<uint8_t>(frozen_t), ptr<uint8_t>(frozen_t) + n_fragments + 1);

  std::vector<u32> deg(n_fragments + 1, 0);
  for (i64 e = 0; e < E; ++e) {
    ++deg[ed[e].u];
    ++deg[ed[e].v];
  }
  // Regions: rep[] is a union-find forest (an absorbed region points at its absorber), so that
  // an edge's stored ends, and the neighbour ids in the adjacency lists, are resolved lazily
  // instead of being rewritten when a region is absorbed. adj[x] holds (neighbour as stored,
  // edge) of every live edge of region x (and dead ones, dropped lazily); `dead` mirrors the
  // edges' deleted flag in a bitset that stays in cache.
  std::vector<u32> rep(n_fragments + 1);
  std::iota(rep.begin(), rep.end(), 0u);
  auto find = [&rep](u32 x) {
    while (rep[x] != x) {
      rep[x] = rep[rep[x]];
      x = rep[x];
    }
    return x;
  };
  std::vector<u64> dead((E + 63) / 64 + 1, 0);
  auto is_dead = [&dead](u32 e) { return (dead[e >> 6] >> (e & 63)) & 1; };
  auto kill = [&dead, ed](u32 e) {
    dead[e >> 6] |= 1ULL << (e & 63);
    ed[e].meta |= kDeleted;
  };
  struct Adj { u32 n, e; };
  std::vector<std::vector<Adj>> adj(n_fragments + 1);
  for (i64 x = 0; x <= n_fragments; ++x) adj[x].reserve(deg[x]);
  for (i64 e = 0; e < E; ++e) {
    adj[ed[e].u].push_back({ed[e].v, (u32)e});
    adj[ed[e].v].push_back({ed[e].u, (u32)e});
  }
  constexpr u32 kNone = ~0u;
  std::vector<u32> mark(n_fragments + 1, kNone);  // neighbour of the absorber -> its edge
  Queue heap(ed, E, !g.mean, bins);
  std::vector<i64> mu, mv;
  std::vector<double> ml;
  double level = -std::numeric_limits<double>::infinity();

  // A hierarchy node (frozen not empty): which segments the parent may already have merged
  // with frozen ones at the current level (merge.py's _Ties): a segment is tainted when live
  // edges stored at the level or below, or re-scored at it, link it to a frozen segment. One
  // search per tie component and level; stamp/taint hold the answers of the current level
  // (taint 2: in the search under way).
  std::vector<u32> stamp, todo, seen, tied_now;
  std::vector<uint8_t> taint;
  u32 epoch = 0;
  if (!frozen.empty()) {
    stamp.assign(n_fragments + 1, 0);
    taint.assign(n_fragments + 1, 0);
  }
  auto new_level = [&]() {
    ++epoch;
    for (u32 x : tied_now) ed[x].meta &= ~kTie;
    tied_now.clear();
  };
  auto tainted = [&](u32 r) -> bool {
    if (frozen[r]) return true;
    if (stamp[r] == epoch) return taint[r] == 1;
    seen.assign(1, r);
    todo.assign(1, r);
    stamp[r] = epoch;
    taint[r] = 2;
    bool hit = false;
    while (!todo.empty() && !hit) {
      const u32 q = todo.back();
      todo.pop_back();
      for (const Adj &x : adj[q]) {
        if (is_dead(x.e)) continue;
        const Edge &y = ed[x.e];
        if (y.score > level && !(y.meta & kTie)) continue;
        const u32 m = find(x.n);
        if (frozen[m] || (stamp[m] == epoch && taint[m] == 1)) {
          hit = true;
          break;
        }
        if (stamp[m] == epoch) continue;
        stamp[m] = epoch;
        taint[m] = 2;
        seen.push_back(m);
        todo.push_back(m);
      }
    }
    for (u32 q : seen) taint[q] = hit ? 1 : 0;
    return hit;
  };
  // Whether the popped edge (a, b) is the whole link between its unfrozen end and the global
  // segment of its frozen end: none of the unfrozen end's other neighbours is tainted.
  auto only_link = [&](u32 a, u32 b) -> bool {
    if (frozen[a] == frozen[b]) return false;
    const u32 f = frozen[a] ? a : b, x = frozen[a] ? b : a;
    for (const Adj &y : adj[x]) {
      if (is_dead(y.e)) continue;
      const u32 n = find(y.n);
      if (n != f && tainted(n)) return false;
    }
    return true;
  };

  while (!heap.empty() && heap.top().score < max_threshold) {
    const Queue::Item top = heap.top();
    const u32 e = (u32)top.ke;
    heap.pop();
    heap.near_top([ed](u64 ke) { __builtin_prefetch(&ed[(u32)ke]); });  // the next pops'
    if (top.score > level && !frozen.empty()) new_level();
    level = std::max(level, top.score);
    if (is_dead(e)) continue;  // gone (the bitset is in cache, the edge may not be)
    Edge &te = ed[e];
    if ((top.ke >> 32) != te.key) continue;  // queued again under a new key
    if (te.stale()) {
      bool hot = false;
      u32 a = 0, b = 0;
      if (!frozen.empty()) {
        a = find(te.u);
        b = find(te.v);
        hot = tainted(a);
        te.meta |= kTie;  // tied at this level, whatever its new score
        tied_now.push_back(e);
      }
      te.score = g.rescore(te);
      te.meta &= ~kStale;
      if (hot && te.score > level && !only_link(a, b))  // it leaves the level, and its ends may
        frozen[a] = frozen[b] = 1;                      // have merged in the parent: they wait
      heap.push({te.score, ((u64)te.key << 32) | e});
      continue;
    }
    u32 a = find(te.u), b = find(te.v);
    if (b < a) std::swap(a, b);
    bool absorb = false;
    if (!frozen.empty() && tainted(a)) {  // the parent may already have merged its ends: it
      if (!only_link(a, b)) {             // waits, unless the unfrozen end can only join the
        frozen[a] = frozen[b] = 1;        // frozen one through this edge
        continue;
      }
      absorb = true;
      if (frozen[b]) std::swap(a, b);  // the frozen end absorbs: its id is the one the parent knows
    }
    if (!absorb && deg[a] < deg[b]) std::swap(a, b);  // absorb the region with fewer neighbours
    mu.push_back(a);
    mv.push_back(b);
    ml.push_back(level);
    kill(e);
    --deg[a];
    rep[b] = a;
    // Which of b's neighbours a already has an edge to: either a's live neighbours are marked
    // with their edge (a pass over a's list), or each neighbour's list is searched for an
    // entry that resolves to a, whichever costs less. The marks alone would cost a pass over
    // a's list per merge, quadratic when a large region absorbs small ones one by one.
    std::vector<Adj> &la = adj[a];
    std::vector<Adj> incident;  // b's list, freed with b at the end of the merge
    incident.swap(adj[b]);
    size_t w = 0, cost_n = 0;
    for (size_t i = 0; i < incident.size(); ++i) {  // b's live edges, neighbours resolved
      const Adj x = incident[i];
      if (is_dead(x.e)) continue;
      const u32 n = find(x.n);
      incident[w++] = {n, x.e};
      cost_n += deg[n];
    }
    incident.resize(w);
    const bool marks = la.size() <= cost_n + w;
    if (marks) {
      w = 0;
      for (size_t i = 0; i < la.size(); ++i) {  // compacting: dead edges (b's among them) go
        const Adj x = la[i];
        if (is_dead(x.e)) continue;
        const u32 n = find(x.n);
        la[w++] = {n, x.e};
        mark[n] = x.e;
      }
      la.resize(w);
      for (const Adj &x : incident)  // the edges that will merge: their misses overlap
        if (mark[x.n] != kNone) {
          __builtin_prefetch(&ed[x.e]);
          __builtin_prefetch(&ed[mark[x.n]]);
        }
      if (!g.mean)  // ... and their histograms
        for (const Adj &x : incident)
          if (mark[x.n] != kNone) {
            __builtin_prefetch(g.pool.p + ed[x.e].hoff);
            __builtin_prefetch(g.pool.p + ed[mark[x.n]].hoff);
          }
    }
    for (const Adj &x : incident) {
      const u32 eb = x.e, n = x.n;
      u32 ea = kNone;
      if (marks) {
        ea = mark[n];
      } else {  // the edge of n that resolves to a, other than b's
        for (const Adj &y : adj[n])
          if (y.e != eb && !is_dead(y.e) && find(y.n) == a) {
            ea = y.e;
            break;
          }
      }
      if (ea == kNone) {  // move the edge to the surviving region, untouched
        la.push_back({n, eb});
        ++deg[a];
        continue;
      }
      Edge &xa = ed[ea], &xb = ed[eb];
      Edge *keep, *drop;
      u32 keep_id, drop_id;
      if (xb.score > xa.score || (xb.score == xa.score && xb.key > xa.key)) {
        keep = &xa; drop = &xb; keep_id = ea; drop_id = eb;  // keep the lower (score, key)
      } else {  // b's edge is kept and moved to a
        keep = &xb; drop = &xa; keep_id = eb; drop_id = ea;
        la.push_back({n, eb});
      }
      g.add_into(*keep, *drop);
      kill(drop_id);
      keep->meta |= kStale;
      if (drop->key < keep->key) {  // queue it by its new key at once
        keep->key = drop->key;
        heap.push({keep->score, ((u64)keep->key << 32) | keep_id});
      }
      --deg[n];
    }
    if (marks) {
      for (const Adj &x : la) mark[x.n] = kNone;  // every entry holds a resolved id here
    } else if (la.size() > 2 * (size_t)deg[a] + 16) {  // drop dead entries now and then
      w = 0;
      for (size_t i = 0; i < la.size(); ++i)
        if (!is_dead(la[i].e)) la[w++] = {find(la[i].n), la[i].e};
      la.resize(w);
    }
    deg[b] = 0;
  }
  auto out_i = [](const std::vector<i64> &v) {
    auto t = torch::empty({(i64)v.size()}, torch::kInt64);
    std::copy(v.begin(), v.end(), t.data_ptr<i64>());
    return t;
  };
  auto out_d = [](const std::vector<double> &v) {
    auto t = torch::empty({(i64)v.size()}, torch::kFloat64);
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t;
  };
  std::vector<i64> re, ru, rv, rk, rc, roff{0}, rcnt;
  std::vector<double> rs, rsum;
  std::vector<uint8_t> rst;
  std::vector<int32_t> rbin;
  if (!frozen.empty()) {
    for (i64 e = 0; e < E; ++e) {
      const Edge &x = ed[e];
      if (x.deleted()) continue;
      const u32 xu = std::min(find(x.u), find(x.v)), xv = std::max(find(x.u), find(x.v));
      if (!(frozen[xu] || frozen[xv])) continue;
      re.push_back(e); ru.push_back(xu); rv.push_back(xv);
      rk.push_back(korig.empty() ? (i64)x.key : korig[x.key]);
      rs.push_back(x.score); rst.push_back(x.stale() ? 1 : 0);
      if (g.mean) { rsum.push_back(x.sum); rc.push_back(x.count); continue; }
      for (u32 k = 0; k < x.hlen(); ++k) {
        const u64 w = g.pool.p[x.hoff + k];
        rbin.push_back((int32_t)(w >> kBinShift));
        rcnt.push_back((i64)(w & kCountMask));
      }
      roff.push_back((i64)rbin.size());
    }
  }
  auto st = torch::empty({(i64)rst.size()}, torch::kUInt8);
  std::copy(rst.begin(), rst.end(), st.data_ptr<uint8_t>());
  auto bn = torch::empty({(i64)rbin.size()}, torch::kInt32);
  std::copy(rbin.begin(), rbin.end(), bn.data_ptr<int32_t>());
  auto lev = out_d(ml);
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
