// gradaudit._C: per-sample row/column statistics of G_b = Δ_bᵀ X_b on the CPU (DESIGN.md §3).
//
// Direct route: the work is cut into tasks (sample b, block of block_rows rows of G_b). A task builds
// G_b one block_rows × block_cols block at a time with a BLAS product into a buffer that stays in
// cache, and reduces it at once into the rows' statistics (complete inside the task) and the
// columns' partial sums (one slot per row block, summed in a fixed order at the end). So G_b is never
// held whole and every sum runs in a fixed order. Tasks run in parallel, each product
// on one thread; with fewer tasks than twice the threads they run in turn, each product on all.
// Gram route (norms only, short samples): r² = colsum((X Xᵀ Δ) ⊙ Δ), c² = colsum((Δ Δᵀ X) ⊙ X).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

namespace {


// Reduces one contiguous bm × bn block `c` of G_b (R's matching block at `r`, row stride ldr, or
// null) into row accumulators (bm) and column accumulators (bn).
template <bool kRef>
void reduce_block(const float* c, const float* r, int64_t ldr, int64_t bm, int64_t bn, float* row_sq,
                  float* row_dot, float* col_sq, float* col_dot) {
  for (int64_t i = 0; i < bm; ++i) {
    const float* ci = c + i * bn;
    float rs = 0.f, rd = 0.f;
    if constexpr (kRef) {
      const float* ri = r + i * ldr;
#pragma omp simd reduction(+ : rs, rd)
      for (int64_t j = 0; j < bn; ++j) {
        const float v = ci[j], p = v * ri[j];
        rs += v * v;
        rd += p;
        col_sq[j] += v * v;
        col_dot[j] += p;
      }
      row_dot[i] += rd;
    } else {
#pragma omp simd reduction(+ : rs)
      for (int64_t j = 0; j < bn; ++j) {
        const float v = ci[j];
        rs += v * v;
        col_sq[j] += v * v;
      }
    }
    row_sq[i] += rs;
  }
}

struct Task {
  int64_t sample;
  int64_t row_block;  // -1: the whole sample through the Gram route
};

}  // namespace

std::vector<at::Tensor> slice_stats_cpu(const at::Tensor& x_in, const at::Tensor& g_in,
                                        const std::vector<int64_t>& bounds,
                                        const c10::optional<at::Tensor>& ref_in,
                                        const std::vector<bool>& gram, int64_t block_rows,
                                        int64_t block_cols) {
  TORCH_CHECK(block_rows > 0 && block_cols > 0, "gradaudit._C: block sizes must be positive");
  TORCH_CHECK(x_in.device().is_cpu() && g_in.device().is_cpu(), "gradaudit._C: CPU tensors only");
  TORCH_CHECK(x_in.dim() == 2 && g_in.dim() == 2 && x_in.size(0) == g_in.size(0),
              "gradaudit._C: x (N, d_in) and grad_out (N, d_out) expected");
  const int64_t n_samples = static_cast<int64_t>(bounds.size()) - 1;
  TORCH_CHECK(n_samples >= 0 && static_cast<int64_t>(gram.size()) == n_samples,
              "gradaudit._C: bounds must have B+1 entries and gram B");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor g = g_in.to(at::kFloat).contiguous();
  const bool has_ref = ref_in.has_value();
  const at::Tensor ref = has_ref ? ref_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t d_in = x.size(1), d_out = g.size(1);
  const int64_t n_row_blocks = (d_out + block_rows - 1) / block_rows;

  const auto f32 = x.options();
  at::Tensor row_sq = at::zeros({n_samples, d_out}, f32);
  at::Tensor row_dot = at::zeros({has_ref ? n_samples : 0, d_out}, f32);
  // Column partial sums, one slot per row block, summed in order at the end.
  at::Tensor col_sq_part = at::zeros({n_samples, n_row_blocks, d_in}, f32);
  at::Tensor col_dot_part = at::zeros({has_ref ? n_samples : 0, n_row_blocks, d_in}, f32);

  std::vector<Task> tasks;
  for (int64_t b = 0; b < n_samples; ++b) {
    if (bounds[b + 1] == bounds[b]) continue;
    if (gram[b] && !has_ref) {
      tasks.push_back({b, -1});
    } else {
      for (int64_t rb = 0; rb < n_row_blocks; ++rb) tasks.push_back({b, rb});
    }
  }

  // One task: a Gram sample, or one row block of a direct sample reduced block by block.
  auto run_task = [&](const Task& task, at::Tensor& block) {
    const int64_t b = task.sample, start = bounds[b], n_tok = bounds[b + 1] - bounds[b];
    const at::Tensor xb = x.narrow(0, start, n_tok), gb = g.narrow(0, start, n_tok);
    if (task.row_block < 0) {
      row_sq[b].copy_((at::mm(at::mm(xb, xb.t()), gb) * gb).sum(0));
      col_sq_part[b][0].copy_((at::mm(at::mm(gb, gb.t()), xb) * xb).sum(0));
      return;
    }
    const int64_t i0 = task.row_block * block_rows, bm = std::min(block_rows, d_out - i0);
    const at::Tensor g_t = gb.narrow(1, i0, bm).t();  // (bm, T)
    float* rsq = row_sq.data_ptr<float>() + b * d_out + i0;
    float* rdot = has_ref ? row_dot.data_ptr<float>() + b * d_out + i0 : nullptr;
    const int64_t slot = (b * n_row_blocks + task.row_block) * d_in;
    float* csq = col_sq_part.data_ptr<float>() + slot;
    float* cdot = has_ref ? col_dot_part.data_ptr<float>() + slot : nullptr;
    for (int64_t j0 = 0; j0 < d_in; j0 += block_cols) {
      const int64_t bn = std::min(block_cols, d_in - j0);
      at::Tensor c = block.narrow(0, 0, bm * bn).view({bm, bn});
      at::mm_out(c, g_t, xb.narrow(1, j0, bn));
      const float* cp = c.data_ptr<float>();
      if (has_ref) {
        const float* rp = ref.data_ptr<float>() + i0 * d_in + j0;
        reduce_block<true>(cp, rp, d_in, bm, bn, rsq, rdot, csq + j0, cdot + j0);
      } else {
        reduce_block<false>(cp, nullptr, 0, bm, bn, rsq, nullptr, csq + j0, nullptr);
      }
    }
  };
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  const int64_t block_numel = block_rows * std::min(block_cols, d_in);
  if (n_tasks < 2 * at::get_num_threads()) {
    // Too few tasks to share out: run them in turn and let each BLAS product use every thread.
    at::Tensor block = at::empty({block_numel}, f32);
    for (const Task& task : tasks) run_task(task, block);
  } else {
    at::parallel_for(0, n_tasks, 1, [&](int64_t lo, int64_t hi) {
      at::Tensor block = at::empty({block_numel}, f32);  // one G_b block, kept in cache
      for (int64_t t = lo; t < hi; ++t) run_task(tasks[t], block);
    });
  }

  at::Tensor col_sq = col_sq_part.sum(1);
  if (!has_ref) return {row_sq, col_sq};
  return {row_sq, col_sq, row_dot, col_dot_part.sum(1)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "GradAudit CPU kernels: per-sample slice statistics without materialising G_b";
  m.def("slice_stats", &slice_stats_cpu, "row_sq, col_sq[, row_dot, col_dot] of G_b = grad_outᵀ x per sample",
        pybind11::arg("x"), pybind11::arg("grad_out"), pybind11::arg("bounds"), pybind11::arg("ref"),
        pybind11::arg("gram"), pybind11::arg("block_rows") = 256, pybind11::arg("block_cols") = 1024);
}
