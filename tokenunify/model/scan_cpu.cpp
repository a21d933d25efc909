// Fused CPU selective scan (forward and backward) for tokenunify.model.scan.
//
// Shapes: u, delta, z (B, D, L); A (D, N); Bt, Ct (B, L, N); Dskip, bias (D,); float32,
// contiguous; z, Dskip and bias may be empty (absent). Per row (b, d), along l:
//   dt[l]  = softplus(delta[l] + bias)          (or delta[l] + bias without softplus)
//   h[l]   = exp(dt[l] * A) * h[l-1] + dt[l] * B[l] * u[l]
//   y[l]   = <h[l], C[l]> + Dskip * u[l]
//   out[l] = y[l] * silu(z[l])                   (if z is given)
// Everything above runs in one pass per row, so no (B, D, L) temporaries are made for the
// softplus, the skip or the gate. The forward keeps only the state at the start of every chunk
// of K positions (B, D, ceil(L/K), N), K times less memory than all states; the backward
// recomputes a chunk's states into a small buffer that stays in L1 cache, then walks the chunk
// backwards. Rows are spread over ATen's own thread pool (at::parallel_for), so the kernel
// shares threads with the rest of PyTorch instead of starting a second pool. The loops are
// written so that the compiler vectorises them over N (and over positions for the softplus and
// gate); scan.py builds one copy per instruction set (AVX-512, AVX2, generic).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t K = 64;     // positions per checkpoint chunk
constexpr int64_t NMAX = 64;  // largest state size handled here (Mamba uses 16)

const float *opt(const torch::Tensor &t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

struct Scan {  // pointers into the contiguous inputs; nullptr for absent z, Dskip, bias
  const float *u, *delta, *A, *B, *C, *D, *z, *bias;
  int64_t Bn, Dn, L, N, nck;
  bool softplus;
};

// Positions l0 .. l0+nl-1 of row `row`: v = delta + bias, dt = softplus(v) (torch's threshold
// of 20), sz = sigmoid(z). Separate loops without branches, so they vectorise (libmvec exp/log1p).
inline void prep_chunk(const Scan &s, int64_t row, int64_t l0, int64_t nl, float bd, float *v,
                       float *dt, float *sz) {
  for (int64_t j = 0; j < nl; ++j) v[j] = s.delta[row + l0 + j] + bd;
  if (s.softplus) {
    for (int64_t j = 0; j < nl; ++j) {
      const float sp = std::log1p(std::exp(std::min(v[j], 20.f)));
      dt[j] = v[j] > 20.f ? v[j] : sp;
    }
  } else {
    for (int64_t j = 0; j < nl; ++j) dt[j] = v[j];
  }
  if (s.z)
    for (int64_t j = 0; j < nl; ++j) sz[j] = 1.f / (1.f + std::exp(-s.z[row + l0 + j]));
}

void forward_row(const Scan &s, int64_t r, float *out, float *H) {
  const int64_t b = r / s.Dn, d = r % s.Dn, row = r * s.L, N = s.N;
  const float *Ad = s.A + d * N;
  const float Dd = s.D ? s.D[d] : 0.f, bd = s.bias ? s.bias[d] : 0.f;
  float h[NMAX] = {0.f}, a[NMAX], v[K], dts[K], sz[K];
  for (int64_t l0 = 0; l0 < s.L; l0 += K) {
    const int64_t nl = std::min(K, s.L - l0);
    std::copy(h, h + N, H + (r * s.nck + l0 / K) * N);  // checkpoint: state before the chunk
    prep_chunk(s, row, l0, nl, bd, v, dts, sz);
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t l = l0 + j;
      const float dt = dts[j], x = s.u[row + l], dx = dt * x;
      const float *Bl = s.B + (b * s.L + l) * N, *Cl = s.C + (b * s.L + l) * N;
      for (int64_t n = 0; n < N; ++n) a[n] = std::exp(dt * Ad[n]);
      float acc = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        h[n] = a[n] * h[n] + dx * Bl[n];
        acc += h[n] * Cl[n];
      }
      const float y = acc + Dd * x;
      out[row + l] = s.z ? y * s.z[row + l] * sz[j] : y;
    }
  }
}

struct Grads {  // outputs of the backward pass; dA, dB, dC, dD, dbias have a slot per thread
  float *du, *ddelta, *dz, *dA, *dB, *dC, *dD, *dbias;
};

struct RowState {  // what a row carries from one chunk to the one before it, backwards
  float g[NMAX];    // adjoint flowing from position l+1 into the state at l
  float dA[NMAX];   // running sums for this row's dA, dD and dbias
  float dD, dbias;
};

// Chunk c of row r, backwards: recompute the chunk's states from its checkpoint into hs
// (K x N, in L1), then walk it backwards.
void backward_chunk(const Scan &s, int64_t r, int64_t c, int64_t tid, const float *gout,
                    const float *H, const Grads &gr, RowState &st, float *hs, float *as) {
  const int64_t b = r / s.Dn, d = r % s.Dn, row = r * s.L, N = s.N, L = s.L;
  const float *Ad = s.A + d * N;
  const float Dd = s.D ? s.D[d] : 0.f, bd = s.bias ? s.bias[d] : 0.f;
  float g[NMAX], dA_loc[NMAX], dD_acc = st.dD, dbias_acc = st.dbias;
  std::copy(st.g, st.g + N, g);  // local copies the compiler can keep in registers
  std::copy(st.dA, st.dA + N, dA_loc);
  float vs[K], dts[K], ys[K], sz[K], gys[K];
  {
    const int64_t l0 = c * K, nl = std::min(K, L - l0);
    const float *h0 = H + (r * s.nck + c) * N;  // state before the chunk
    // 1. recompute the chunk's decays and states from its checkpoint
    prep_chunk(s, row, l0, nl, bd, vs, dts, sz);
    for (int64_t j = 0; j < nl; ++j) vs[j] = 1.f - std::exp(-dts[j]);  // sigmoid(v) = d dt / d v
    const float *hp = h0;
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t l = l0 + j;
      const float dt = dts[j], dx = dt * s.u[row + l];
      const float *Bl = s.B + (b * L + l) * N, *Cl = s.C + (b * L + l) * N;
      float *aj = as + j * N, *hj = hs + j * N;
      for (int64_t n = 0; n < N; ++n) aj[n] = std::exp(dt * Ad[n]);
      float acc = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        hj[n] = aj[n] * hp[n] + dx * Bl[n];
        acc += hj[n] * Cl[n];
      }
      ys[j] = acc;
      hp = hj;
    }
    // 2. the output gate and the skip, for the whole chunk at once (vectorised)
    for (int64_t j = 0; j < nl; ++j) {
      const int64_t l = l0 + j;
      float gy = gout[row + l];
      if (s.z) {
        const float zz = s.z[row + l], sg = sz[j];
        gr.dz[row + l] = gy * (ys[j] + Dd * s.u[row + l]) * sg * (1.f + zz * (1.f - sg));
        gy *= zz * sg;
      }
      gys[j] = gy;
      dD_acc += gy * s.u[row + l];
    }
    // 3. walk the chunk backwards
    for (int64_t j = nl - 1; j >= 0; --j) {
      const int64_t l = l0 + j;
      const float x = s.u[row + l], dt = dts[j], gy = gys[j], dtx = dt * x;
      const float *__restrict__ Bl = s.B + (b * L + l) * N;
      const float *__restrict__ Cl = s.C + (b * L + l) * N;
      const float *__restrict__ aj = as + j * N;
      const float *__restrict__ hj = hs + j * N;
      const float *__restrict__ hprev = j > 0 ? hs + (j - 1) * N : h0;
      float *__restrict__ dBl = gr.dB + ((tid * s.Bn + b) * L + l) * N;
      float *__restrict__ dCl = gr.dC + ((tid * s.Bn + b) * L + l) * N;
      float ddt = 0.f, dx = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float ghn = g[n] + gy * Cl[n];  // dL/dh[l]
        const float ahp = aj[n] * hprev[n];
        dCl[n] += gy * hj[n];
        dBl[n] += ghn * dtx;
        dx += ghn * Bl[n];
        ddt += ghn * (Bl[n] * x + Ad[n] * ahp);
        dA_loc[n] += ghn * dt * ahp;
        g[n] = ghn * aj[n];
      }
      const float dv = s.softplus ? ddt * vs[j] : ddt;
      dbias_acc += dv;
      gr.du[row + l] = dx * dt + gy * Dd;
      gr.ddelta[row + l] = dv;
    }
  }
  std::copy(g, g + N, st.g);
  std::copy(dA_loc, dA_loc + N, st.dA);
  st.dD = dD_acc, st.dbias = dbias_acc;
}

Scan make_scan(const torch::Tensor &u, const torch::Tensor &delta, const torch::Tensor &A,
               const torch::Tensor &Bt, const torch::Tensor &Ct, const torch::Tensor &Dskip,
               const torch::Tensor &z, const torch::Tensor &bias, bool use_softplus) {
  const int64_t L = u.size(2), N = A.size(1);
  TORCH_CHECK(N <= NMAX, "fused scan handles d_state <= ", NMAX);
  return {u.data_ptr<float>(), delta.data_ptr<float>(), A.data_ptr<float>(),
          Bt.data_ptr<float>(), Ct.data_ptr<float>(), opt(Dskip), opt(z), opt(bias),
          u.size(0), u.size(1), L, N, (L + K - 1) / K, use_softplus};
}

}  // namespace

std::vector<torch::Tensor> scan_forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                        torch::Tensor Bt, torch::Tensor Ct, torch::Tensor Dskip,
                                        torch::Tensor z, torch::Tensor bias, bool use_softplus) {
  const Scan s = make_scan(u, delta, A, Bt, Ct, Dskip, z, bias, use_softplus);
  auto out = torch::empty_like(u);
  auto Hc = torch::empty({s.Bn, s.Dn, s.nck, s.N}, u.options());
  float *po = out.data_ptr<float>(), *pH = Hc.data_ptr<float>();
  at::parallel_for(0, s.Bn * s.Dn, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) forward_row(s, r, po, pH);
  });
  return {out, Hc};
}

std::vector<torch::Tensor> scan_backward(torch::Tensor gout, torch::Tensor u, torch::Tensor delta,
                                         torch::Tensor A, torch::Tensor Bt, torch::Tensor Ct,
                                         torch::Tensor Dskip, torch::Tensor z, torch::Tensor bias,
                                         bool use_softplus, torch::Tensor Hc) {
  const Scan s = make_scan(u, delta, A, Bt, Ct, Dskip, z, bias, use_softplus);
  const int64_t T = at::get_num_threads(), D = s.Dn, N = s.N;
  auto du = torch::empty_like(u), ddelta = torch::empty_like(delta);
  auto dz = z.numel() ? torch::empty_like(z) : torch::empty({0}, u.options());
  // per-thread accumulators for what several rows add into, summed at the end
  auto dA_t = torch::zeros({T, D, N}, A.options());
  auto dB_t = torch::zeros({T, s.Bn, s.L, N}, Bt.options());
  auto dC_t = torch::zeros({T, s.Bn, s.L, N}, Ct.options());
  auto dD_t = torch::zeros({T, D}, u.options()), dbias_t = torch::zeros({T, D}, u.options());
  const Grads gr{du.data_ptr<float>(), ddelta.data_ptr<float>(),
                 dz.numel() ? dz.data_ptr<float>() : nullptr, dA_t.data_ptr<float>(),
                 dB_t.data_ptr<float>(), dC_t.data_ptr<float>(), dD_t.data_ptr<float>(),
                 dbias_t.data_ptr<float>()};
  const float *pg = gout.data_ptr<float>(), *pH = Hc.data_ptr<float>();
  at::parallel_for(0, s.Bn * D, 1, [&](int64_t r0, int64_t r1) {
    const int64_t tid = at::get_thread_num();
    std::vector<float> hs(K * N), as(K * N);
    RowState st;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t d = r % D;
      st = RowState{};
      for (int64_t c = s.nck - 1; c >= 0; --c)
        backward_chunk(s, r, c, tid, pg, pH, gr, st, hs.data(), as.data());
      for (int64_t n = 0; n < N; ++n) gr.dA[(tid * D + d) * N + n] += st.dA[n];
      gr.dD[tid * D + d] += st.dD;
      gr.dbias[tid * D + d] += st.dbias;
    }
  });
  return {du, ddelta, dA_t.sum(0), dB_t.sum(0), dC_t.sum(0), dD_t.sum(0), dz, dbias_t.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "selective scan forward (CPU, fused)");
  m.def("backward", &scan_backward, "selective scan backward (CPU, fused)");
}
