// The C++ wrapper: every class and method, errors as exceptions, a throwing solver whose
// exception reaches the caller intact, the two-phase API and move-only ownership.
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "expect.hpp"
#include "perturbations.hpp"

int pert_tu_b_forward();  // defined in test_cpp_tu_b.cpp: the header in a second TU

namespace {

void argmax(const float* x, std::size_t count, float* y) {
  for (std::size_t r = 0; r < count; r++) {
    std::size_t best = 0;
    for (std::size_t i = 1; i < 3; i++)
      if (x[3 * r + i] > x[3 * r + best]) best = i;
    for (std::size_t i = 0; i < 3; i++) y[3 * r + i] = i == best ? 1.0f : 0.0f;
  }
}

struct SolverError : std::runtime_error {
  int code;
  explicit SolverError(int c) : std::runtime_error("infeasible"), code(c) {}
};

void test_config_errors() {
  pert::Config c;
  try {
    c.sigma(-1.0);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
    EXPECT(std::string(e.what()).find("sigma must be finite and > 0, got -1") != std::string::npos);
    EXPECT(std::string(e.status_name()) == "PERT_STATUS_INVALID_ARGUMENT");
  }
  try {
    c.device("gpu");
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
  c.num_samples(100).seed(3).threads(2).device("cpu").noise(pert::Noise::Gumbel).baseline(pert::Baseline::CleanInput)
      .perturbation(pert::Perturbation::Additive).antithetic(false).sense(pert::Sense::Maximize).chunk_bytes(0).max_tape_bytes(0);
  EXPECT(c.get() != nullptr);
  EXPECT(!pert::version().empty());
  std::string report = pert::device_report();
  EXPECT(report.rfind("perturbations: " + pert::version() + "\n", 0) == 0);
  EXPECT(report.find("noise on the CPU: ") != std::string::npos && report.back() == '\n');
}

// pert::cuda_check_thread: no exception for each device, DEVICE_UNAVAILABLE beyond them,
// INVALID_ARGUMENT for a negative ordinal (on any machine, with or without a GPU)
void test_cuda_check_thread() {
  int count = pert::cuda_device_count();
  for (int d = 0; d < count; d++) pert::cuda_check_thread(d);
  try {
    pert::cuda_check_thread(count);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_DEVICE_UNAVAILABLE);
    EXPECT(std::string(e.what()).find("does not exist") != std::string::npos);
  }
  try {
    pert::cuda_check_thread(-1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
    EXPECT(std::string(e.what()).find("got -1") != std::string::npos);
  }
}

void test_forward_tape_and_loss() {
  pert::Config c;
  c.num_samples(20000).sigma(0.5).noise(pert::Noise::Gumbel).device("cpu");
  pert::Op op(c, {3}, {3}, argmax);  // a plain function
  EXPECT(op.input_numel() == 3 && op.output_numel() == 3);
  std::vector<float> theta = {0.5f, 1.0f, 0.2f, 0.0f, 0.0f, 0.0f};
  auto result = op.forward_with_tape(theta, 2);
  double z = std::exp(1.0) + std::exp(2.0) + std::exp(0.4);
  EXPECT(std::fabs(result.output[1] - std::exp(2.0) / z) < 5 * 0.5 / std::sqrt(20000.0));
  EXPECT(std::fabs(result.output[3] - 1.0 / 3) < 5 * 0.5 / std::sqrt(20000.0));
  EXPECT(result.tape.batch() == 2);
  auto j = result.tape.jacobian();
  EXPECT(j.size() == 18);
  auto g = result.tape.vjp({1, 0, 0, 0, 1, 0});
  auto t = result.tape.jvp({1, 0, 0, 0, 1, 0});
  EXPECT(g.size() == 6 && t.size() == 6);
  EXPECT(std::fabs(g[0] - j[0]) < 1e-5 && std::fabs(t[0] - j[0]) < 1e-5);
  EXPECT(result.tape.objective().size() == 2);
  try {
    result.tape.vjp({1, 2});
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
  auto loss = op.fenchel_young(theta, {0, 1, 0, 1, 0, 0}, 2);
  EXPECT(loss.first.size() == 2 && loss.second.size() == 6);
  EXPECT(loss.first[0] > 0.0f);
  std::vector<float> y = op.forward(theta, 2);
  EXPECT(y.size() == 6);
  // a batch whose batch * input_numel wraps size_t to the buffer's size: a pert::Error
  // (not std::length_error from a result room of batch floats)
  {
    std::size_t wrapping = (std::size_t(1) << 62) + 1;  // * 4 floats == 4 mod 2^64
    pert::Op four = pert::Op::builtin(pert::Config(), pert::Builtin::Argmax, {4});
    std::vector<float> th4 = {1, 2, 3, 4};
    for (int which = 0; which < 2; which++) {
      try {
        if (which == 0) four.fenchel_young(th4, th4, wrapping);
        else four.forward(th4, wrapping);
        EXPECT(false);
      } catch (const pert::Error& e) {
        EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT &&
               std::string(e.what()).find("overflows size_t") != std::string::npos);
      }
    }
  }
  try {
    op.forward({1.0f, NAN, 0.0f}, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_NON_FINITE_INPUT);
  }
}

void test_throwing_solver_reaches_the_caller_intact() {
  pert::Config c;
  c.num_samples(100).device("cpu");
  int calls = 0;
  pert::Op op(c, {3}, {3}, [&](const float*, std::size_t, float*) {
    ++calls;
    throw SolverError(42);
  });
  try {
    op.forward({0, 1, 2}, 1);
    EXPECT(false);
  } catch (const SolverError& e) {
    EXPECT(e.code == 42);  // the very exception, not a copy into a library error
  } catch (...) {
    EXPECT(false);
  }
  EXPECT(calls >= 1);
  // the op keeps working after a throwing call
  int n = 0;
  pert::Op ok(c, {3}, {3}, [&](const float* x, std::size_t count, float* y) {
    ++n;
    argmax(x, count, y);
  });
  EXPECT(ok.forward({0, 1, 2}, 1).size() == 3 && n >= 1);
}

void test_member_functions_and_functors() {
  struct Scaled {
    float factor;
    void solve(const float* x, std::size_t count, float* y) const {
      for (std::size_t i = 0; i < count * 3; i++) y[i] = factor * x[i];
    }
  } scaled{2.0f};
  pert::Config c;
  c.num_samples(1000).sigma(0.01).device("cpu").baseline(pert::Baseline::None);
  using namespace std::placeholders;
  pert::Op op(c, {3}, {3}, std::bind(&Scaled::solve, &scaled, _1, _2, _3));
  auto y = op.forward({1, 2, 3}, 1);
  EXPECT(std::fabs(y[2] - 6.0f) < 5 * 2 * 0.01 / std::sqrt(1000.0) + 1e-5);
}

void test_interrupt_from_another_thread() {
  pert::Config c;
  c.num_samples(std::uint64_t(1) << 31).device("cpu");
  pert::Op op = pert::Op::builtin(c, pert::Builtin::Argmax, {64});
  std::atomic<bool> done{false};
  std::thread stopper([&] {
    while (!done.load()) {  // until the call has ended: it may not have started yet
      op.interrupt();
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  pert_status status = PERT_STATUS_OK;
  try {
    op.forward(std::vector<float>(64, 0.0f), 1);
  } catch (const pert::Error& e) {
    status = e.status();
  }
  done.store(true);
  stopper.join();
  EXPECT(status == PERT_STATUS_INTERRUPTED);
  EXPECT(op.forward({}, 0).empty());  // the op still works
}

void test_builtin_two_phase_and_moves() {
  static_assert(!std::is_copy_constructible<pert::Op>::value, "ops are move-only");
  static_assert(!std::is_copy_constructible<pert::Config>::value, "configs are move-only");
  static_assert(std::is_move_constructible<pert::Op>::value, "ops move");
  pert::Config c;
  c.num_samples(2000).sigma(0.5).noise(pert::Noise::Gumbel).device("cpu");
  pert::Op builtin = pert::Op::builtin(c, pert::Builtin::TopK, {3}, 2);
  pert::Op moved = std::move(builtin);
  auto y = moved.forward({0, 1, 2}, 1);
  EXPECT(std::fabs(y[0] + y[1] + y[2] - 2.0f) < 1e-4);  // two of three chosen in every sample

  pert::Op callback(c, {3}, {3}, argmax);
  pert::Op external = pert::Op::external(c, {3}, {3});
  pert::Draw draw(external, {0.5f, 1.0f, 0.2f}, 1);
  EXPECT(draw.count() == 2000);
  std::vector<float> solutions(draw.count() * 3);
  argmax(draw.inputs(), draw.count(), solutions.data());
  auto two_phase = draw.finish_with_tape(solutions);
  auto direct = callback.forward_with_tape({0.5f, 1.0f, 0.2f}, 1);
  EXPECT(two_phase.output == direct.output);
  EXPECT(two_phase.tape.jacobian() == direct.tape.jacobian());
  EXPECT(draw.finish(solutions) == direct.output);
  // the two-phase Fenchel-Young loss: what a callback op's gives for the same draws
  pert::Op fy_callback(c, {3}, {3}, argmax);
  pert::Op fy_external = pert::Op::external(c, {3}, {3});
  pert::Draw fy_draw(fy_external, {0.5f, 1.0f, 0.2f}, 1);
  std::vector<float> fy_solutions(fy_draw.count() * 3);
  argmax(fy_draw.inputs(), fy_draw.count(), fy_solutions.data());
  auto two_phase_fy = fy_draw.fenchel_young(fy_solutions, {0, 1, 0});
  auto direct_fy = fy_callback.fenchel_young({0.5f, 1.0f, 0.2f}, {0, 1, 0}, 1);
  EXPECT(two_phase_fy == direct_fy);
  try {
    external.forward({0, 1, 2}, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
}
}  // namespace

pert::Config small_config() {
  pert::Config c;
  c.num_samples(50).sigma(0.5).device("cpu").seed(2);
  return c;
}

// Views kept past the statement that made them own a copy of temporaries (under ASan this
// was a stack-use-after-scope and a heap-use-after-free); lvalues are borrowed.
void test_views_never_dangle() {
  pert::Op op(small_config(), {3}, {3}, argmax);
  pert::Op twin(small_config(), {3}, {3}, argmax);
  pert::View braced = {0.1f, 2.0f, 0.3f};
  pert::View moved = std::vector<float>{0.1f, 2.0f, 0.3f};
  std::vector<float> named = {0.1f, 2.0f, 0.3f};
  pert::View borrowed = named;
  EXPECT(borrowed.data == named.data());
  auto a = op.forward(braced, 1);
  auto b = twin.forward(moved, 1);
  EXPECT(a == b);
  EXPECT(braced.data[1] == 2.0f && moved.data[2] == 0.3f && borrowed.size == 3);
  pert::View copy = braced;  // copies share the owned floats
  EXPECT(copy.data == braced.data);
  const std::vector<float> fixed = {0.1f, 2.0f, 0.3f};
  EXPECT(op.forward(std::move(fixed), 1).size() == 3);  // a const rvalue: copied  // NOLINT
}

// Every entry point checks sizes: a draw with theta of the wrong size throws (it read past
// the buffer), as forward does.
void test_sizes_are_checked_everywhere() {
  pert::Op op(small_config(), {3}, {3}, argmax);
  std::vector<float> two = {0.1f, 0.2f};
  try {
    pert::Draw draw(op, two, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
  try {
    op.forward(two, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
    // the wrapper's own checks name the status as the library's errors do
    EXPECT(std::string(e.what()).rfind("PERT_STATUS_INVALID_ARGUMENT: theta must hold", 0) == 0);
  }
}

// An empty std::function is refused when the op is made, not at the first forward.
void test_empty_solver_is_refused() {
  pert::Op::Solver none;
  try {
    pert::Op op(small_config(), {3}, {3}, none);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_NULL_ARGUMENT);
  }
}

// Move assignment frees the old op, then takes the other's op and state.
void test_move_assignment() {
  int calls_a = 0, calls_b = 0;
  pert::Op a(small_config(), {3}, {3}, [&](const float* x, std::size_t n, float* y) {
    ++calls_a;
    argmax(x, n, y);
  });
  pert::Op b(small_config(), {3}, {3}, [&](const float* x, std::size_t n, float* y) {
    ++calls_b;
    argmax(x, n, y);
  });
  a = std::move(b);
  auto y = a.forward({0.1f, 2.0f, 0.3f}, 1);
  EXPECT(y.size() == 3 && calls_a == 0 && calls_b > 0);
}

// Batch 0: a valid empty tape whose products succeed and are empty.
void test_batch_zero_gives_an_empty_tape() {
  pert::Op op(small_config(), {3}, {3}, argmax);
  std::vector<float> none;
  auto result = op.forward_with_tape(none, 0);
  EXPECT(result.output.empty());
  EXPECT(result.tape.get() != nullptr && result.tape.batch() == 0);
  EXPECT(result.tape.vjp(none).empty());
  EXPECT(result.tape.jvp(none).empty());
  EXPECT(result.tape.jacobian().empty());
  EXPECT(result.tape.objective().empty());
  auto loss = op.fenchel_young(none, none, 0);
  EXPECT(loss.first.empty() && loss.second.empty());
}

// The gradient of the Fenchel-Young loss with respect to y_true: -theta (maximization),
// +theta (minimization), times the incoming gradient.
void test_fenchel_young_gradient_of_the_target() {
  std::vector<float> theta = {0.5f, 1.0f, 0.2f, 0.0f, -1.0f, 2.0f};
  pert::Op max_op(small_config(), {3}, {3}, argmax);
  auto g = max_op.fenchel_young_grad_y_true(theta, {1.0f, 2.0f}, 2);
  EXPECT(g[0] == -0.5f && g[1] == -1.0f && g[4] == 2.0f && g[5] == -4.0f);
  pert::Config c = small_config();
  c.sense(pert::Sense::Minimize);
  EXPECT(c.sense() == pert::Sense::Minimize);
  pert::Op min_op(c, {3}, {3}, argmax);
  EXPECT(min_op.sense() == pert::Sense::Minimize);
  g = min_op.fenchel_young_grad_y_true(theta, {1.0f, 2.0f}, 2);
  EXPECT(g[0] == 0.5f && g[5] == 4.0f);
}

// Solvers from real codebases: a solver taking the solve info, and per-worker objects made
// once per worker on its thread and destroyed there when the op goes.
struct Model {
  static std::atomic<int> made, destroyed;
  std::thread::id thread = std::this_thread::get_id();
  std::uint32_t worker;
  int solves = 0;
  explicit Model(std::uint32_t w) : worker(w) { ++made; }
  Model(Model&& other) noexcept : thread(other.thread), worker(other.worker), solves(other.solves) { other.worker = 999; }
  Model(const Model&) = delete;
  ~Model() {
    if (worker != 999) ++destroyed;
  }
};
std::atomic<int> Model::made{0}, Model::destroyed{0};

void test_solvers_with_info_and_worker_objects() {
  pert::Config c;
  c.num_samples(40).sigma(0.5).device("cpu").threads(2).seed(7);
  std::atomic<int> rows{0}, bad{0};
  pert::Op with_info(c, {3}, {3}, [&](const pert_solve_info& info, const float* x, std::size_t count, float* y) {
    if (info.num_samples != 40 || info.batch != 5 || info.worker >= 2 || info.clean) ++bad;
    rows += static_cast<int>(count);
    argmax(x, count, y);
  });
  std::vector<float> theta = {0.1f, 0.5f, 0.2f, 0.3f, 0.1f, 0.0f, 0.2f, 0.2f, 0.9f, 0.4f, 0.4f, 0.1f, 0.0f, 0.0f, 0.0f};
  pert::Op plain(c, {3}, {3}, argmax);
  EXPECT(with_info.forward(theta, 5) == plain.forward(theta, 5));  // the same draws, bit for bit
  EXPECT(rows == 200 && bad == 0);

  std::atomic<int> wrong_thread{0};
  {
    pert::Op op = pert::Op::with_workers(
        c, {3}, {3}, [](std::uint32_t w) { return Model(w); },
        [&](Model& m, const pert_solve_info& info, const float* x, std::size_t count, float* y) {
          if (m.worker != info.worker || m.thread != std::this_thread::get_id()) ++wrong_thread;
          ++m.solves;
          argmax(x, count, y);
        });
    for (int k = 0; k < 3; k++) op.forward(theta, 5);
    EXPECT(Model::made >= 1 && Model::made <= 2);  // once per worker over three calls
    EXPECT(Model::destroyed == 0);
  }
  EXPECT(Model::destroyed == Model::made);  // destroyed with the op
  EXPECT(wrong_thread == 0);

  // an exception from the worker factory reaches the caller; the op then fails every call
  pert::Op broken = pert::Op::with_workers(
      c, {3}, {3}, [](std::uint32_t) -> Model { throw SolverError(5); },
      [](Model&, const pert_solve_info&, const float* x, std::size_t count, float* y) { argmax(x, count, y); });
  try {
    broken.forward(theta, 5);
    EXPECT(false);
  } catch (const SolverError& e) {
    EXPECT(e.code == 5);
  }
  try {
    broken.forward(theta, 5);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_SOLVER_FAILED);
    EXPECT(std::string(e.what()).find("infeasible") != std::string::npos);  // what() became the message
  }
  // a device solver on a CPU op: host pointers, no stream; its exception reaches the caller
  pert::Config gumbel;
  gumbel.num_samples(20000).sigma(0.5).noise(pert::Noise::Gumbel).device("cpu");
  bool stream_null = true;
  pert::Op on_device = pert::Op::device(gumbel, {3}, {3},
                                        [&](const pert_solve_info&, const float* x, std::size_t n, float* y, void* stream) {
                                          stream_null = stream_null && stream == nullptr;
                                          argmax(x, n, y);
                                        });
  auto p = on_device.forward({0.5f, 1.0f, 0.2f}, 1);
  double z = std::exp(1.0) + std::exp(2.0) + std::exp(0.4);
  EXPECT(stream_null && std::fabs(p[1] - std::exp(2.0) / z) < 5 * 0.5 / std::sqrt(20000.0));
  pert::Op failing_device = pert::Op::device(gumbel, {3}, {3}, [](const pert_solve_info&, const float*, std::size_t, float*,
                                                                  void*) { throw SolverError(9); });
  try {
    failing_device.forward({0.5f, 1.0f, 0.2f}, 1);
    EXPECT(false);
  } catch (const SolverError& e) {
    EXPECT(e.code == 9);
  }
  // max_threads below threads is refused
  pert::Config capped;
  capped.threads(2).max_threads(1);
  try {
    pert::Op op(capped, {3}, {3}, [](const pert_solve_info&, const float* x, std::size_t n, float* y) { argmax(x, n, y); });
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
}

// A solver that calls its own op neither hangs nor takes the op's lock twice: a plain
// solver's call goes through (the C library runs it), a solver on the op's own workers gets
// pert::Error (it would wait for itself), which reaches the outer caller.
void test_a_solver_calling_its_own_op() {
  std::vector<float> theta = {0.1f, 0.5f, 0.2f, 0.3f, 0.1f, 0.0f};
  pert::Config c;
  c.num_samples(8).device("cpu").seed(2);
  pert::Op* self = nullptr;
  int nested = 0;
  pert::Op plain(c, {3}, {3}, [&](const float* x, std::size_t count, float* y) {
    if (nested++ == 0) {
      auto inner = self->forward({0.3f, 0.2f, 0.1f}, 1);  // on the same thread, inside the call
      EXPECT(inner.size() == 3);
    }
    argmax(x, count, y);
  });
  self = &plain;
  EXPECT(plain.forward(theta, 2).size() == 6);
  EXPECT(nested >= 2);

  // the nested call's own solver throws: the nested call rethrows it (the outer solver
  // catches it), and nothing is left for the outer call or close()
  int calls = 0;
  pert::Op* again = nullptr;
  pert::Op catching(c, {3}, {3}, [&](const float* x, std::size_t count, float* y) {
    if (calls++ == 0) {
      try {
        again->forward({0.3f, 0.2f, 0.1f}, 1);
        EXPECT(false);
      } catch (const SolverError& e) {
        EXPECT(e.code == 4);
      }
    } else if (calls == 2) {
      throw SolverError(4);  // the nested call's solver
    }
    argmax(x, count, y);
  });
  again = &catching;
  EXPECT(catching.forward(theta, 2).size() == 6);
  bool closed = true;
  try {
    catching.close();
  } catch (...) {
    closed = false;
  }
  EXPECT(closed);

  pert::Config two;
  two.num_samples(8).device("cpu").threads(2).seed(2);
  pert::Op* own = nullptr;
  pert::Op on_workers(two, {3}, {3}, [&](const pert_solve_info&, const float* x, std::size_t count, float* y) {
    own->forward({0.3f, 0.2f, 0.1f}, 1);  // refused: it would wait for its own workers
    argmax(x, count, y);
  });
  own = &on_workers;
  try {
    on_workers.forward(theta, 2);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
}

// A Worker destructor that throws (declared noexcept(false)) does not terminate the
// process: close() rethrows it, the destructor of Op reports it on stderr.
struct ThrowingWorker {
  bool armed = false;
  ThrowingWorker() = default;
  ThrowingWorker(ThrowingWorker&& other) noexcept : armed(other.armed) { other.armed = false; }
  ~ThrowingWorker() noexcept(false) {
    if (armed) throw std::runtime_error("cannot close the model");
  }
};

void test_a_throwing_worker_destructor_is_reported() {
  std::vector<float> theta = {0.1f, 0.5f, 0.2f};
  pert::Config c;
  c.num_samples(4).device("cpu");
  auto make = [](std::uint32_t) {
    ThrowingWorker w;
    w.armed = true;
    return w;
  };
  auto solve = [](ThrowingWorker&, const pert_solve_info&, const float* x, std::size_t count, float* y) {
    argmax(x, count, y);
  };
  pert::Op closed = pert::Op::with_workers(c, {3}, {3}, make, solve);
  closed.forward(theta, 1);
  try {
    closed.close();
    EXPECT(false);
  } catch (const std::runtime_error& e) {
    EXPECT(std::string(e.what()) == "cannot close the model");
  }
  try {
    closed.forward(theta, 1);  // an empty op
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_NULL_ARGUMENT);
  }
  {
    pert::Op destroyed = pert::Op::with_workers(c, {3}, {3}, make, solve);
    destroyed.forward(theta, 1);
  }  // reported on stderr, the process goes on
}

// Destroying an Op waits for a call running on another thread.
void test_destroying_an_op_waits_for_running_calls() {
  pert::Config c;
  c.num_samples(4).device("cpu");
  std::atomic<int> started{0}, solved{0};
  std::atomic<bool> finished{false};
  auto* op = new pert::Op(c, {3}, {3}, [&](const float* x, std::size_t count, float* y) {
    started = 1;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    argmax(x, count, y);
    solved = 1;
  });
  std::thread caller([&] {
    op->forward({0.1f, 0.5f, 0.2f}, 1);
    finished = true;
  });
  while (!started) std::this_thread::yield();
  delete op;            // waits for the call (ASan sees any use after free)
  EXPECT(solved == 1);  // the call had ended
  caller.join();
  EXPECT(finished);
}

// Op::solve (pert_op_solve): y*(x) with no noise; a wrong size names x and its status.
void test_plain_solve() {
  pert::Config config;
  config.num_samples(50).device("cpu");
  pert::Op op(config, {3}, {3}, argmax);
  std::vector<float> y = op.solve({0.5f, 1.0f, 0.2f, 3.0f, -1.0f, 2.0f}, 2);
  EXPECT((y == std::vector<float>{0, 1, 0, 1, 0, 0}));
  try {
    op.solve({0.5f, 1.0f}, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(std::string(e.what()).rfind("PERT_STATUS_INVALID_ARGUMENT: x must hold", 0) == 0);
  }
}

// Solution pools: Pool, Op::set_pool, solver_calls and the pool losses (NCE by hand).
void test_pools() {
  pert::Config c;
  c.device("cpu").num_samples(200).sigma(0.5).seed(3).solve_ratio(0.3).linear_objective(true);
  pert::Op op(c, {3}, {3}, argmax);
  pert::Pool pool({3}, 10);
  pool.add(std::vector<float>{1, 0, 0, 0, 1, 0, 0, 0, 1}, 3);
  EXPECT(pool.size() == 3);
  op.set_pool(pool);
  auto y = op.forward({0.5f, 1.0f, 0.2f}, 1);
  EXPECT(y.size() == 3 && op.solver_calls() < 200);
  // NCE maximizing: pred (0.5, 1, 0.2), w* = e1: -(1 - (0.5 + 1 + 0.2) / 3)
  auto nce = op.nce({0.5f, 1.0f, 0.2f}, {0, 1, 0}, 1);
  EXPECT(std::fabs(nce.first[0] + (1.0f - 1.7f / 3)) < 1e-6f);
  try {
    pool.add({1, 0}, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(e.status() == PERT_STATUS_INVALID_ARGUMENT);
  }
  try {
    pert::Op plain(pert::Config().device("cpu"), {3}, {3}, argmax);
    plain.set_pool(pool);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(std::string(e.what()).find("linear") != std::string::npos);
  }
  op.clear_pool();
  try {
    op.cmap({0.5f, 1.0f, 0.2f}, {0, 1, 0}, 1);
    EXPECT(false);
  } catch (const pert::Error& e) {
    EXPECT(std::string(e.what()).find("solution pool") != std::string::npos);
  }
}

int main() {
  test_pools();
  test_plain_solve();
  test_interrupt_from_another_thread();
  test_a_solver_calling_its_own_op();
  test_a_throwing_worker_destructor_is_reported();
  test_destroying_an_op_waits_for_running_calls();
  test_views_never_dangle();
  test_sizes_are_checked_everywhere();
  test_empty_solver_is_refused();
  test_move_assignment();
  test_batch_zero_gives_an_empty_tape();
  test_fenchel_young_gradient_of_the_target();
  test_config_errors();
  test_cuda_check_thread();
  test_forward_tape_and_loss();
  test_throwing_solver_reaches_the_caller_intact();
  test_member_functions_and_functors();
  test_builtin_two_phase_and_moves();
  test_solvers_with_info_and_worker_objects();
  EXPECT(pert_tu_b_forward() == 3);
  return expect_report();
}
