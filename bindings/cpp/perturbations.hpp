// perturbations.hpp: a header-only C++17 wrapper over the perturbations C API.
//
//   pert::Config config;
//   config.num_samples(10000).sigma(0.5).noise(pert::Noise::Gumbel);
//   pert::Op op(config, {5}, {5}, [](const float* x, std::size_t count, float* y) { ... });
//   auto [y, tape] = op.forward_with_tape(theta, batch);
//   std::vector<float> grad = tape.vjp(grad_y);
//
// - Move-only RAII classes own the C handles (std::unique_ptr with the C _free).
// - Errors throw pert::Error, carrying the status and the library's message.
// - Any callable is a solver: its exceptions are caught in a noexcept trampoline, the C
//   call fails, and the original exception is rethrown to the caller of forward().
//   A solver may take a `const pert_solve_info&` first (it then runs on the op's own
//   persistent workers), and Op::with_workers gives each worker an object of its own
//   (a model built once per worker): see pert_op_new_ex. Calls of one pert::Op with a
//   solver callable take turns (so that an exception reaches the call that raised it);
//   use one Op per thread to solve in parallel. A solver may call its own op: such a call
//   does not wait for its turn, and gets the C library's answer (a solver on the op's own
//   workers is refused with pert::Error, PERT_STATUS_INVALID_ARGUMENT). With threads > 1
//   a nested call that fails may report an exception another slice of the outer call
//   raised (both are that call's failures).
// - Destroying an Op waits for the calls already running on it (from other threads); it
//   must not be destroyed from inside its own solver, and a thread must not start a call
//   on an Op that another thread is destroying or moving (as for any C++ object).
// - Buffers are any contiguous range of float (std::vector, std::array, std::span, a braced
//   list) or a pointer and count. A View keeps its own copy of a temporary container or
//   list; it borrows a named container or a span, which must outlive it (as a std::span).
#ifndef PERTURBATIONS_HPP
#define PERTURBATIONS_HPP

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstdio>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if __has_include(<version>)
#include <version>
#endif
#if defined(__cpp_lib_span)
#include <span>
#endif
#if defined(__cpp_lib_ranges)
#include <ranges>
#endif

#include "perturbations.h"

namespace pert {

/// A library error: the status and the message of pert_last_error.
class Error : public std::runtime_error {
 public:
  Error(pert_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  pert_status status() const noexcept { return status_; }
  const char* status_name() const noexcept { return pert_status_name(status_); }

 private:
  pert_status status_;
};

namespace detail {
/// An Error whose message starts with the status name, as every error of this wrapper's.
inline Error error(pert_status status, const std::string& message) {
  return Error(status, std::string(pert_status_name(status)) + ": " + message);
}

inline std::string last_error() {
  std::string message(pert_last_error(nullptr, 0), '\0');
  if (!message.empty()) pert_last_error(&message[0], message.size() + 1);
  return message;
}

inline void check(pert_status status) {
  if (status != PERT_STATUS_OK) throw error(status, last_error());
}

template <class T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const noexcept { Free(p); }
};
}  // namespace detail

namespace detail {
/// Whether R is a contiguous range of float: `data()` gives `float*` or `const float*`,
/// `size()` the count (std::vector, std::array, std::span, ...).
template <class R, class = void>
struct is_float_range : std::false_type {};
template <class R>
struct is_float_range<R, std::void_t<decltype(std::declval<const R&>().data()), decltype(std::declval<const R&>().size())>>
    : std::bool_constant<std::is_same_v<std::remove_cv_t<std::remove_pointer_t<decltype(std::declval<const R&>().data())>>, float>> {};

/// Whether a temporary R still refers to floats that outlive it (a view such as std::span).
template <class R>
constexpr bool borrows() {
#if defined(__cpp_lib_ranges)
  return std::ranges::borrowed_range<R>;
#else
  return false;
#endif
}
}  // namespace detail

/// Caller floats passed to a call: pointer and count. From a named container (lvalue) or a
/// view such as std::span it borrows the floats, which must outlive the View; from a
/// temporary container or a braced list it keeps its own copy, so that
/// `View v = {0.1f, 2.0f};` or `View v = std::vector<float>{...};` never dangles.
/// Converts from any contiguous range of float: std::vector, std::array, std::span
/// (C++20), a braced list.
struct View {
  const float* data;
  std::size_t size;

  View(const float* d, std::size_t n) : data(d), size(n) {}
  View(std::initializer_list<float> v) : View(std::vector<float>(v)) {}  // NOLINT(implicit)
  View(std::vector<float>&& v)                                            // NOLINT(implicit)
      : data(nullptr), size(v.size()), owned_(std::make_shared<const std::vector<float>>(std::move(v))) {
    data = owned_->data();
  }
  template <class R, class Plain = std::remove_cv_t<std::remove_reference_t<R>>,
            std::enable_if_t<detail::is_float_range<Plain>::value && !std::is_same_v<Plain, View> &&
                                 !std::is_same_v<R, std::vector<float>>,  // a non-const temporary vector is moved
                             int> = 0>
  View(R&& range) : data(range.data()), size(range.size()) {  // NOLINT(implicit)
    if constexpr (!std::is_lvalue_reference_v<R> && !detail::borrows<Plain>()) {
      owned_ = std::make_shared<const std::vector<float>>(range.data(), range.data() + range.size());
      data = owned_->data();
    }
  }

 private:
  std::shared_ptr<const std::vector<float>> owned_;  // the copy of a temporary, if any
};

enum class Noise : uint32_t { Normal = PERT_NOISE_NORMAL, Gumbel = PERT_NOISE_GUMBEL, SumOfGamma = PERT_NOISE_SUM_OF_GAMMA };
enum class Perturbation : uint32_t { Additive = PERT_PERTURBATION_ADDITIVE, Multiplicative = PERT_PERTURBATION_MULTIPLICATIVE };
enum class Baseline : uint32_t { None = PERT_BASELINE_NONE, SampleMean = PERT_BASELINE_SAMPLE_MEAN, CleanInput = PERT_BASELINE_CLEAN_INPUT };
enum class Sense : uint32_t { Maximize = PERT_SENSE_MAXIMIZE, Minimize = PERT_SENSE_MINIMIZE };
enum class Builtin : uint32_t { Argmax = PERT_BUILTIN_ARGMAX, TopK = PERT_BUILTIN_TOPK, Ranks = PERT_BUILTIN_RANKS };

/// The library's version string.
inline std::string version() { return pert_version(); }

/// The number of CUDA devices libtorch sees (pert_cuda_device_count): 0 where it sees none
/// (no GPU or driver, a CPU-only libtorch, CUDA_VISIBLE_DEVICES="", a child forked after
/// its parent started CUDA).
inline int cuda_device_count() { return pert_cuda_device_count(); }

/// Throws pert::Error (PERT_STATUS_DEVICE_UNAVAILABLE) unless a call on CUDA device
/// `device` (0-based) can run on this thread now (pert_cuda_check_thread): the device
/// exists, its current stream here is not capturing a CUDA graph, and no CUDA context other
/// than a device's primary one is current here; PERT_STATUS_INVALID_ARGUMENT for a negative
/// `device`. Every call on a CUDA op checks this itself.
inline void cuda_check_thread(int device) { detail::check(pert_cuda_check_thread(device)); }

/// What this process found of CUDA and how each device draws its noise
/// (pert_device_report): one `name: value` line per item.
inline std::string device_report() {
  std::size_t len = 0;
  detail::check(pert_device_report(nullptr, &len));
  for (;;) {
    std::string text(len + 1, '\0');
    std::size_t room = text.size();
    len = room;
    detail::check(pert_device_report(&text[0], &len));
    if (len < room) {
      text.resize(len);
      return text;
    }
  }
}

/// Settings for ops, with fluent setters. Copied by each op made from it.
class Config {
 public:
  Config() {
    pert_config* c = nullptr;
    detail::check(pert_config_new(&c));
    handle_.reset(c);
  }
  Config& num_samples(std::uint64_t n) { return set(pert_config_set_num_samples(get(), n)); }
  Config& sigma(double s) { return set(pert_config_set_sigma(get(), s)); }
  Config& noise(Noise n) { return set(pert_config_set_noise(get(), static_cast<uint32_t>(n))); }
  /// Sum-of-Gamma noise with kappa and `terms` terms (pert_config_set_sum_of_gamma).
  Config& sum_of_gamma(double kappa, std::uint32_t terms) { return set(pert_config_set_sum_of_gamma(get(), kappa, terms)); }
  Config& seed(std::uint64_t s) { return set(pert_config_set_seed(get(), s)); }
  Config& device(const std::string& d) { return set(pert_config_set_device(get(), d.c_str())); }
  Config& threads(std::uint32_t t) { return set(pert_config_set_threads(get(), t)); }
  /// The most threads a call of an op made from this config runs at once (0: no cap).
  Config& max_threads(std::uint32_t t) { return set(pert_config_set_max_threads(get(), t)); }
  Config& perturbation(Perturbation p) { return set(pert_config_set_perturbation(get(), static_cast<uint32_t>(p))); }
  Config& baseline(Baseline b) { return set(pert_config_set_baseline(get(), static_cast<uint32_t>(b))); }
  Config& antithetic(bool a) { return set(pert_config_set_antithetic(get(), a)); }
  Config& sense(Sense s) {
    set(pert_config_set_sense(get(), static_cast<uint32_t>(s)));
    sense_ = s;
    return *this;
  }
  /// The sense set on this config (ops copy it when they are made).
  Sense sense() const noexcept { return sense_; }
  Config& chunk_bytes(std::uint64_t b) { return set(pert_config_set_chunk_bytes(get(), b)); }
  Config& max_tape_bytes(std::uint64_t b) { return set(pert_config_set_max_tape_bytes(get(), b)); }
  /// The share of a pooled op's samples that are solved, in [0, 1] (pert_config_set_solve_ratio).
  Config& solve_ratio(double r) { return set(pert_config_set_solve_ratio(get(), r)); }
  /// Declares the solver's objective linear, <x, y>, which a pool needs (pert_config_set_linear_objective).
  Config& linear_objective(bool l) { return set(pert_config_set_linear_objective(get(), l)); }
  pert_config* get() const noexcept { return handle_.get(); }

 private:
  Config& set(pert_status s) {
    detail::check(s);
    return *this;
  }
  std::unique_ptr<pert_config, detail::Deleter<pert_config, pert_config_free>> handle_;
  Sense sense_ = Sense::Maximize;
};

/// A pool of at most `capacity` distinct solutions of `output_shape` (pert_pool_new): first
/// in, first out; shared by the ops given it (Op::set_pool), which keep it alive, so a
/// Pool may be destroyed while ops use it. Movable; every member may be called from
/// several threads at once.
class Pool {
 public:
  Pool(std::vector<std::int64_t> output_shape, std::size_t capacity) {
    pert_pool* p = nullptr;
    detail::check(pert_pool_new(output_shape.data(), output_shape.size(), capacity, &p));
    handle_.reset(p);
    numel_ = 1;
    for (auto n : output_shape) numel_ *= static_cast<std::size_t>(n);
  }
  /// Adds `count` solutions (count * output_numel floats, finite): those not held, each
  /// once, join as the newest; then the oldest leave down to the capacity (pert_pool_add).
  Pool& add(View solutions, std::size_t count) {
    if (!handle_) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "the pool was moved from");
    if (solutions.size != count * numel_)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "solutions must hold count * output_numel = " +
                                                            std::to_string(count * numel_) + " floats, got " +
                                                            std::to_string(solutions.size));
    detail::check(pert_pool_add(get(), solutions.data, count));
    return *this;
  }
  /// The number of solutions held now (pert_pool_size).
  std::size_t size() const noexcept { return pert_pool_size(get()); }
  pert_pool* get() const noexcept { return handle_.get(); }

 private:
  std::unique_ptr<pert_pool, detail::Deleter<pert_pool, pert_pool_free>> handle_;
  std::size_t numel_ = 1;
};

/// The record of an I-MLE forward call (pert_imle): owned, movable.
class Imle {
 public:
  explicit Imle(pert_imle* record) noexcept : record_(record) {}
  std::size_t batch() const noexcept { return pert_imle_batch(record_.get()); }
  const pert_imle* get() const noexcept { return record_.get(); }

 private:
  std::unique_ptr<pert_imle, detail::Deleter<pert_imle, pert_imle_free>> record_;
};

/// The record of a forward call: gradients without further solver calls.
class Tape {
 public:
  explicit Tape(pert_tape* t, std::size_t d, std::size_t o) : handle_(t), d_(d), o_(o) {}
  std::size_t batch() const noexcept { return pert_tape_batch(get()); }
  /// J^T g per problem; g is [batch, output_numel].
  std::vector<float> vjp(View grad_output) const {
    expect(grad_output, o_, "grad_output");
    std::vector<float> out(batch() * d_);
    detail::check(pert_tape_vjp(get(), grad_output.data, out.data()));
    return out;
  }
  /// J t per problem; t is [batch, input_numel].
  std::vector<float> jvp(View tangent) const {
    expect(tangent, d_, "tangent_input");
    std::vector<float> out(batch() * o_);
    detail::check(pert_tape_jvp(get(), tangent.data, out.data()));
    return out;
  }
  /// [batch, output_numel, input_numel].
  std::vector<float> jacobian() const {
    std::vector<float> out(batch() * o_ * d_);
    detail::check(pert_tape_jacobian(get(), out.data()));
    return out;
  }
  /// F_sigma(theta) per problem (output shape = input shape).
  std::vector<float> objective() const {
    std::vector<float> out(batch());
    detail::check(pert_tape_objective(get(), out.data()));
    return out;
  }
  pert_tape* get() const noexcept { return handle_.get(); }

 private:
  void expect(View v, std::size_t per_problem, const char* name) const {
    if (v.size != batch() * per_problem)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, std::string(name) + " must hold " + std::to_string(batch() * per_problem) +
                                                    " floats, got " + std::to_string(v.size));
  }
  std::unique_ptr<pert_tape, detail::Deleter<pert_tape, pert_tape_free>> handle_;
  std::size_t d_, o_;
};

/// Output of a forward call with its tape.
struct Result {
  std::vector<float> output;
  Tape tape;
};

/// A perturbed optimizer.
class Op {
 public:
  /// A solver: any callable (const float* inputs, size_t count, float* outputs); it may
  /// throw, and the exception reaches the caller of forward() intact.
  using Solver = std::function<void(const float*, std::size_t, float*)>;
  /// A solver told where its rows sit (see pert_solve_info): it runs on the op's own
  /// persistent worker threads (pert_op_new_ex).
  using SolverWithInfo = std::function<void(const pert_solve_info&, const float*, std::size_t, float*)>;

  Op(const Config& config, std::vector<std::int64_t> input_shape, std::vector<std::int64_t> output_shape, Solver solver)
      : state_(new State), sense_(config.sense()) {
    state_->callbacks = true;
    state_->solve = std::move(solver);
    if (!state_->solve) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "solver is an empty std::function");
    pert_op* op = nullptr;
    detail::check(pert_op_new(config.get(), input_shape.data(), input_shape.size(), output_shape.data(), output_shape.size(),
                              &Op::trampoline, state_.get(), &op));
    handle_.reset(op);
  }

  /// An op over a solver that takes the solve info first: it runs on the op's persistent
  /// workers (worker info.worker is always the same thread), never on the caller's; with
  /// threads > 1 on several at once (it must then be thread-safe).
  Op(const Config& config, std::vector<std::int64_t> input_shape, std::vector<std::int64_t> output_shape,
     SolverWithInfo solver)
      : state_(new State), sense_(config.sense()) {
    state_->callbacks = true;
    state_->solve_ex = std::move(solver);
    if (!state_->solve_ex) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "solver is an empty std::function");
    make_ex(config, input_shape, output_shape, false);
  }

  /// An op whose workers each own an object made by `make_worker(worker)` (a model, a
  /// solver instance: built once per worker, on its thread, before its first solve, and
  /// destroyed there when the op is destroyed), passed to
  /// `solve(Worker&, const pert_solve_info&, const float* x, size_t count, float* y)`.
  /// Worker = the type make_worker returns (movable); make_worker and solve are copied
  /// into the op and called from several worker threads at once: they must be
  /// thread-safe (their own state included). An exception from make_worker fails that
  /// call (rethrown to the caller) and every later one: the op must be made again. The
  /// worker objects are destroyed on their threads when the op is closed or destroyed; an
  /// exception from a Worker destructor declared noexcept(false) is rethrown by close()
  /// (the destructor of Op, which cannot throw, writes it to stderr instead); a destructor
  /// that is noexcept, as destructors are by default, terminates the process if it throws,
  /// as anywhere in C++. (In a fork()ed child, where the workers do not exist, destroying
  /// the op destroys the worker objects on the destroying thread, where a destructor that
  /// throws terminates the process.)
  template <class Make, class Solve>
  static Op with_workers(const Config& config, std::vector<std::int64_t> input_shape,
                         std::vector<std::int64_t> output_shape, Make make_worker, Solve solve) {
    using Worker = std::decay_t<std::invoke_result_t<Make&, std::uint32_t>>;
    auto slots = std::make_shared<std::array<std::unique_ptr<Worker>, PERT_MAX_THREADS>>();
    Op op(config.sense());
    op.state_->init = [slots, make_worker](std::uint32_t w) mutable {
      (*slots)[w] = std::make_unique<Worker>(make_worker(w));
    };
    // (deleted outside unique_ptr::reset, which is noexcept: a destructor declared
    // noexcept(false) that throws reaches the fini trampoline, which keeps it for close())
    op.state_->fini = [slots](std::uint32_t w) { delete (*slots)[w].release(); };
    op.state_->solve_ex = [slots, solve](const pert_solve_info& info, const float* x, std::size_t count,
                                         float* y) mutable { solve(*(*slots)[info.worker], info, x, count, y); };
    op.make_ex(config, input_shape, output_shape, true);
    return op;
  }

  /// A solver that works where the op's data lives (pert_op_new_device): x and y are CUDA
  /// device pointers for a CUDA op (host pointers for a CPU op), `stream` the cudaStream_t
  /// to work on (nullptr: the default stream); called on the calling thread.
  using DeviceSolver = std::function<void(const pert_solve_info&, const float*, std::size_t, float*, void*)>;

  /// An op over a device solver: the rows never go to the host.
  static Op device(const Config& config, std::vector<std::int64_t> input_shape, std::vector<std::int64_t> output_shape,
                   DeviceSolver solver) {
    Op op(config.sense());
    op.state_->solve_device = std::move(solver);
    if (!op.state_->solve_device) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "solver is an empty std::function");
    pert_op* handle = nullptr;
    detail::check(pert_op_new_device(config.get(), input_shape.data(), input_shape.size(), output_shape.data(),
                                     output_shape.size(), &Op::trampoline_device, op.state_.get(), &handle));
    op.handle_.reset(handle);
    return op;
  }

  /// A null solver is refused at compile time.
  Op(const Config&, std::vector<std::int64_t>, std::vector<std::int64_t>, std::nullptr_t) = delete;

  /// An op over a built-in solver (k: for top-k).
  static Op builtin(const Config& config, Builtin which, std::vector<std::int64_t> input_shape, std::int64_t k = 0) {
    pert_op* op = nullptr;
    detail::check(pert_op_new_builtin(config.get(), static_cast<uint32_t>(which), k, input_shape.data(), input_shape.size(), &op));
    return Op(op, config.sense());
  }

  /// An op whose problems are solved elsewhere (two-phase API only).
  static Op external(const Config& config, std::vector<std::int64_t> input_shape, std::vector<std::int64_t> output_shape) {
    pert_op* op = nullptr;
    detail::check(pert_op_new_external(config.get(), input_shape.data(), input_shape.size(), output_shape.data(),
                                       output_shape.size(), &op));
    return Op(op, config.sense());
  }

  Op(Op&&) noexcept = default;
  /// Frees the old op (once its running calls have ended) before its callback state (the
  /// op may still refer to it).
  Op& operator=(Op&& other) noexcept {
    if (this != &other) {
      release(true);
      state_ = std::move(other.state_);
      handle_ = std::move(other.handle_);
      sense_ = other.sense_;
    }
    return *this;
  }
  /// Waits for the calls running on the op (on other threads), then frees it.
  ~Op() { release(true); }

  /// Waits for the calls running on the op, frees it now (its workers' objects destroyed
  /// on their threads), and rethrows the first exception a worker's fini or Worker
  /// destructor threw. The op is empty afterwards (as if moved from).
  void close() {
    std::exception_ptr error = release(false);
    if (error) std::rethrow_exception(error);
  }

  std::size_t input_numel() const noexcept { return pert_op_input_numel(get()); }
  std::size_t output_numel() const noexcept { return pert_op_output_numel(get()); }
  /// Stops the calls running on this op now, from any thread (pert_op_interrupt): each
  /// throws pert::Error with PERT_STATUS_INTERRUPTED at its next block of samples, having
  /// written nothing. Calls that start afterwards are not affected.
  void interrupt() const noexcept { pert_op_interrupt(get()); }
  /// The sense of the config the op was made from.
  /// The op's sense, as the library has it (also when it was set through the raw config
  /// handle, which the wrapper's own copy misses).
  Sense sense() const noexcept {
    std::uint32_t s = 0;
    if (get() && pert_op_sense(get(), &s) == PERT_STATUS_OK) return static_cast<Sense>(s);
    return sense_;
  }

  /// y_sigma(theta) for theta [batch, input_numel].
  std::vector<float> forward(View theta, std::size_t batch) {
    std::vector<float> out(checked(theta, batch) * output_numel());
    call([&] { return pert_forward(get(), theta.data, batch, out.data(), nullptr); });
    return out;
  }

  /// y*(x), the op's solver on each of `batch` problems of x [batch, input_numel] with no
  /// noise (pert_op_solve: its threads and workers, as a forward call's solves).
  std::vector<float> solve(View x, std::size_t batch) {
    std::vector<float> out(checked(x, batch, "x") * output_numel());
    call([&] { return pert_op_solve(get(), x.data, batch, out.data()); });
    return out;
  }

  /// y_sigma(theta) and the tape.
  Result forward_with_tape(View theta, std::size_t batch) {
    // (everything read of the op before the call: a destructor on another thread waits
    // for the call only)
    std::size_t d = input_numel(), o = output_numel();
    std::vector<float> out(checked(theta, batch) * o);
    pert_tape* tape = nullptr;
    call([&] { return pert_forward(get(), theta.data, batch, out.data(), &tape); });
    return Result{std::move(out), Tape(tape, d, o)};
  }

  /// The Fenchel-Young loss per problem and its gradient.
  std::pair<std::vector<float>, std::vector<float>> fenchel_young(View theta, View y_true, std::size_t batch) {
    std::size_t n = checked(theta, batch);
    if (y_true.size != theta.size) throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "y_true must have the size of theta");
    std::vector<float> loss(n), grad(theta.size);
    call([&] { return pert_fenchel_young(get(), theta.data, y_true.data, batch, loss.data(), grad.data()); });
    return {std::move(loss), std::move(grad)};
  }

  /// The SPO+ loss per problem [batch] of predicted costs against true costs, their
  /// optimal solutions and objectives (true_obj: batch floats), and its gradient with
  /// respect to the predicted costs (pert_spo_plus; PyEPO's signs per sense). The op's
  /// output shape must equal its input shape.
  std::pair<std::vector<float>, std::vector<float>> spo_plus(View pred_cost, View true_cost, View true_sol,
                                                             View true_obj, std::size_t batch) {
    std::size_t n = checked(pred_cost, batch, "pred_cost");
    checked(true_cost, batch, "true_cost");
    checked(true_sol, batch, "true_sol");
    if (true_obj.size != batch)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "true_obj must hold batch = " + std::to_string(batch) +
                                                            " floats, got " + std::to_string(true_obj.size));
    std::vector<float> loss(n), grad(pred_cost.size);
    call([&] {
      return pert_spo_plus(get(), pred_cost.data, true_cost.data, true_sol.data, true_obj.data, batch, loss.data(),
                           grad.data());
    });
    return {std::move(loss), std::move(grad)};
  }

  /// Gives the op a solution pool (pert_op_set_pool): each perturbed sample is then
  /// answered from it with probability 1 - solve_ratio (its best <x, y> in the op's sense),
  /// and every solve adds to it. The objective must be linear (a built-in, or
  /// Config::linear_objective).
  void set_pool(const Pool& pool) {
    if (!handle_) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "the op was moved from or closed");
    if (!pool.get()) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "the pool was moved from");
    detail::check(pert_op_set_pool(get(), pool.get()));
  }
  /// Takes the op's pool away.
  void clear_pool() { detail::check(pert_op_set_pool(get(), nullptr)); }
  /// The rows the op's solver has solved so far (pert_op_solver_calls).
  std::uint64_t solver_calls() const {
    std::uint64_t rows = 0;
    detail::check(pert_op_solver_calls(get(), &rows));
    return rows;
  }

  /// The losses over the op's pool, per problem, with their gradients with respect to
  /// pred_cost (PyEPO's NCE, CMAP, ptLTR, prLTR, lsLTR): `target` is the true solutions for
  /// nce and cmap, the true costs for the LTR losses. Each first solves the batch with
  /// probability solve_ratio (adding to the pool).
  std::pair<std::vector<float>, std::vector<float>> nce(View pred_cost, View true_sol, std::size_t batch) {
    return pool_loss(pert_nce, pred_cost, true_sol, batch, "true_sol");
  }
  std::pair<std::vector<float>, std::vector<float>> cmap(View pred_cost, View true_sol, std::size_t batch) {
    return pool_loss(pert_cmap, pred_cost, true_sol, batch, "true_sol");
  }
  std::pair<std::vector<float>, std::vector<float>> ltr_pointwise(View pred_cost, View true_cost, std::size_t batch) {
    return pool_loss(pert_ltr_pointwise, pred_cost, true_cost, batch, "true_cost");
  }
  std::pair<std::vector<float>, std::vector<float>> ltr_pairwise(View pred_cost, View true_cost, std::size_t batch) {
    return pool_loss(pert_ltr_pairwise, pred_cost, true_cost, batch, "true_cost");
  }
  std::pair<std::vector<float>, std::vector<float>> ltr_listwise(View pred_cost, View true_cost, std::size_t batch) {
    return pool_loss(pert_ltr_listwise, pred_cost, true_cost, batch, "true_cost");
  }

  /// DBB's backward (pert_blackbox_vjp): the gradient with respect to theta from y =
  /// solve(theta) and the gradient with respect to y, by one solve per problem at
  /// theta + s * lambda * grad_output (s = +1 minimizing, -1 maximizing).
  std::vector<float> blackbox_vjp(View theta, View y, View grad_output, std::size_t batch, double lambda) {
    checked(theta, batch);
    checked(y, batch, "y");
    checked(grad_output, batch, "grad_output");
    std::vector<float> out(theta.size);
    call([&] { return pert_blackbox_vjp(get(), theta.data, y.data, grad_output.data, batch, lambda, out.data()); });
    return out;
  }

  /// NID's backward (pert_negative_identity_vjp): -grad_output minimizing, grad_output
  /// maximizing.
  std::vector<float> negative_identity_vjp(View grad_output, std::size_t batch) {
    checked(grad_output, batch, "grad_output");
    std::vector<float> out(grad_output.size);
    call([&] { return pert_negative_identity_vjp(get(), grad_output.data, batch, out.data()); });
    return out;
  }

  /// The perturbation-gradient loss per problem and its gradient with respect to the
  /// predicted costs (pert_perturbation_gradient; central differences when two_sided).
  std::pair<std::vector<float>, std::vector<float>> perturbation_gradient(View pred_cost, View true_cost,
                                                                          std::size_t batch, double sigma,
                                                                          bool two_sided = true) {
    std::size_t n = checked(pred_cost, batch, "pred_cost");
    checked(true_cost, batch, "true_cost");
    std::vector<float> loss(n), grad(pred_cost.size);
    call([&] {
      return pert_perturbation_gradient(get(), pred_cost.data, true_cost.data, batch, sigma, two_sided ? 1 : 0,
                                        loss.data(), grad.data());
    });
    return {std::move(loss), std::move(grad)};
  }

  /// I-MLE's forward (pert_imle_forward): y_sigma(theta) and the record of its perturbed
  /// inputs and solutions, for imle_vjp / aimle_vjp on this op.
  std::pair<std::vector<float>, Imle> imle_forward(View theta, std::size_t batch) {
    std::vector<float> out(checked(theta, batch) * input_numel());
    pert_imle* record = nullptr;
    call([&] { return pert_imle_forward(get(), theta.data, batch, out.data(), &record); });
    return {std::move(out), Imle(record)};
  }

  /// I-MLE's backward (pert_imle_vjp): the gradient with respect to theta.
  std::vector<float> imle_vjp(const Imle& record, View grad_output, double lambda, bool two_sided = false) {
    std::size_t batch = record.batch();
    checked(grad_output, batch, "grad_output");
    std::vector<float> out(grad_output.size);
    call([&] { return pert_imle_vjp(get(), record.get(), grad_output.data, lambda, two_sided ? 1 : 0, out.data()); });
    return out;
  }

  /// AI-MLE's backward (pert_aimle_vjp): I-MLE's with the adaptive step; `state` is updated.
  std::vector<float> aimle_vjp(const Imle& record, View grad_output, pert_aimle_state& state, bool two_sided = false) {
    std::size_t batch = record.batch();
    checked(grad_output, batch, "grad_output");
    std::vector<float> out(grad_output.size);
    call([&] { return pert_aimle_vjp(get(), record.get(), grad_output.data, two_sided ? 1 : 0, &state, out.data()); });
    return out;
  }

  /// The gradient of the Fenchel-Young loss with respect to y_true, for an incoming
  /// gradient `grad_loss` [batch]: -grad_loss[b] * theta[b] (maximization) or
  /// +grad_loss[b] * theta[b] (minimization).
  std::vector<float> fenchel_young_grad_y_true(View theta, View grad_loss, std::size_t batch) const {
    std::size_t d = input_numel();
    checked(theta, batch);
    if (grad_loss.size != batch)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "grad_loss must hold batch = " + std::to_string(batch) + " floats, got " +
                                                    std::to_string(grad_loss.size));
    float sign = sense() == Sense::Maximize ? -1.0f : 1.0f;
    std::vector<float> out(theta.size);
    for (std::size_t b = 0; b < batch; b++)
      for (std::size_t i = 0; i < d; i++) out[b * d + i] = sign * grad_loss.data[b] * theta.data[b * d + i];
    return out;
  }

  pert_op* get() const noexcept { return handle_.get(); }

 private:
  friend class Draw;

  struct State {
    Solver solve;
    SolverWithInfo solve_ex;
    DeviceSolver solve_device;
    std::function<void(std::uint32_t)> init, fini;
    bool callbacks = false;  // the op calls code of the user's (else its calls run freely)
    std::mutex calls;  // calls of the op take turns: a stored exception is the running call's
    std::mutex mutex;
    std::exception_ptr error;
    std::mutex life;  // running calls, which destroying the op waits for
    std::condition_variable idle;
    std::size_t running = 0;
    void keep(std::exception_ptr e) {
      std::lock_guard<std::mutex> lock(mutex);
      if (!error) error = std::move(e);
    }
  };

  /// The states whose call or callback the current thread is inside (a solver calling its
  /// own op must not wait for the op's turn, which its caller holds).
  static std::vector<const State*>& inside() {
    thread_local std::vector<const State*> states;
    return states;
  }
  static bool is_inside(const State* state) {
    const auto& states = inside();
    return std::find(states.begin(), states.end(), state) != states.end();
  }
  /// Marks the current thread as inside a call or callback of `state` while it lives.
  struct Inside {
    explicit Inside(const State* state) { inside().push_back(state); }
    ~Inside() { inside().pop_back(); }
    Inside(const Inside&) = delete;
    Inside& operator=(const Inside&) = delete;
  };
  /// Counts a call as running while it lives.
  struct Running {
    explicit Running(State* s) : state(s) {
      std::lock_guard<std::mutex> lock(state->life);
      state->running++;
    }
    ~Running() {
      std::lock_guard<std::mutex> lock(state->life);
      if (--state->running == 0) state->idle.notify_all();
    }
    Running(const Running&) = delete;
    Running& operator=(const Running&) = delete;
    State* state;
  };

  /// Waits for the running calls, frees the op, then its state; returns the exception a
  /// fini kept (when `report`, it is written to stderr instead).
  std::exception_ptr release(bool report) noexcept {
    std::exception_ptr error;
    if (state_) {
      std::unique_lock<std::mutex> lock(state_->life);
      state_->idle.wait(lock, [this] { return state_->running == 0; });
    }
    handle_.reset();
    if (state_) {
      std::lock_guard<std::mutex> lock(state_->mutex);
      std::swap(error, state_->error);
    }
    state_.reset();
    if (error && report) {
      try {
        std::rethrow_exception(error);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "pert::Op: a worker's fini threw while the op was destroyed: %s\n", e.what());
      } catch (...) {
        std::fprintf(stderr, "pert::Op: a worker's fini threw while the op was destroyed\n");
      }
      error = nullptr;
    }
    return error;
  }

  Op(pert_op* op, Sense sense) : state_(new State), handle_(op), sense_(sense) {}
  explicit Op(Sense sense) : state_(new State), sense_(sense) { state_->callbacks = true; }

  void make_ex(const Config& config, std::vector<std::int64_t>& input_shape, std::vector<std::int64_t>& output_shape,
               bool hooks) {
    pert_op* op = nullptr;
    detail::check(pert_op_new_ex(config.get(), input_shape.data(), input_shape.size(), output_shape.data(),
                                 output_shape.size(), &Op::trampoline_ex, state_.get(), hooks ? &Op::init_trampoline : nullptr,
                                 hooks ? &Op::fini_trampoline : nullptr, &op));
    handle_.reset(op);
  }

  /// The library's message for a failed callback: the exception's what(), if any.
  static void set_message() noexcept {
    try {
      throw;
    } catch (const std::exception& e) {
      pert_solver_set_error(e.what());
    } catch (...) {
      pert_solver_set_error("a C++ exception that is not a std::exception");
    }
  }

  static int32_t trampoline_ex(void* user_data, const pert_solve_info* info, const float* inputs, std::size_t count,
                               float* outputs) noexcept {
    auto* state = static_cast<State*>(user_data);
    try {
      Inside inside(state);
      state->solve_ex(*info, inputs, count, outputs);
      return 0;
    } catch (...) {
      state->keep(std::current_exception());
      set_message();
      return 1;
    }
  }

  static int32_t trampoline_device(void* user_data, const pert_solve_info* info, const float* inputs, std::size_t count,
                                   float* outputs, void* stream) noexcept {
    auto* state = static_cast<State*>(user_data);
    try {
      Inside inside(state);
      state->solve_device(*info, inputs, count, outputs, stream);
      return 0;
    } catch (...) {
      state->keep(std::current_exception());
      set_message();
      return 1;
    }
  }

  static int32_t init_trampoline(void* user_data, std::uint32_t worker) noexcept {
    auto* state = static_cast<State*>(user_data);
    try {
      Inside inside(state);
      state->init(worker);
      return 0;
    } catch (...) {
      state->keep(std::current_exception());
      set_message();
      return 1;
    }
  }

  static void fini_trampoline(void* user_data, std::uint32_t worker) noexcept {
    auto* state = static_cast<State*>(user_data);
    try {
      Inside inside(state);
      state->fini(worker);
    } catch (...) {
      state->keep(std::current_exception());  // for close(), or stderr from ~Op
    }
  }

  static int32_t trampoline(void* user_data, const float* inputs, std::size_t count, float* outputs) noexcept {
    auto* state = static_cast<State*>(user_data);
    try {
      Inside inside(state);
      state->solve(inputs, count, outputs);
      return 0;
    } catch (...) {
      state->keep(std::current_exception());
      set_message();
      return 1;
    }
  }

  template <class F>
  void call(F&& f) {
    if (!state_) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "the op was moved from or closed");
    if (is_inside(state_.get())) {
      // a solver of this op calling it: its caller holds the turn (and the C library
      // refuses the call where it would wait for itself); an exception its own solver
      // raised is rethrown here, not left for the outer call
      pert_status s = f();
      if (s != PERT_STATUS_OK) rethrow_kept();
      detail::check(s);
      return;
    }
    Running running(state_.get());  // (declared first: ends last, after the turn)
    std::unique_lock<std::mutex> turn;
    if (state_->callbacks) turn = std::unique_lock<std::mutex>(state_->calls);
    Inside inside(state_.get());
    pert_status s = f();
    if (s != PERT_STATUS_OK) rethrow_kept();
    detail::check(s);
  }

  /// Rethrows (and forgets) the exception a callback of the op kept, if any.
  void rethrow_kept() {
    std::exception_ptr e;
    {
      std::lock_guard<std::mutex> lock(state_->mutex);
      std::swap(e, state_->error);
    }
    if (e) std::rethrow_exception(e);
  }

  using PoolLossFn = pert_status (*)(pert_op*, const float*, const float*, std::size_t, float*, float*);
  std::pair<std::vector<float>, std::vector<float>> pool_loss(PoolLossFn fn, View pred_cost, View target,
                                                              std::size_t batch, const char* target_name) {
    std::size_t n = checked(pred_cost, batch, "pred_cost");
    checked(target, batch, target_name);
    std::vector<float> loss(n), grad(pred_cost.size);
    call([&] { return fn(get(), pred_cost.data, target.data, batch, loss.data(), grad.data()); });
    return {std::move(loss), std::move(grad)};
  }

  std::size_t checked(View theta, std::size_t batch, const char* name = "theta") const {
    if (!handle_) throw detail::error(PERT_STATUS_NULL_ARGUMENT, "the op was moved from or closed");
    std::size_t widest = std::max(input_numel(), output_numel());
    if (widest != 0 && batch > SIZE_MAX / widest)  // (the results' rooms are made before the call)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "batch " + std::to_string(batch) + " times " +
                                                        std::to_string(widest) + " floats a problem overflows size_t");
    if (theta.size != batch * input_numel())
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, std::string(name) + " must hold batch * input_numel = " +
                                                        std::to_string(batch * input_numel()) + " floats, got " +
                                                        std::to_string(theta.size));
    return batch;
  }

  std::unique_ptr<State> state_;  // declared before handle_: the op is freed first
  std::unique_ptr<pert_op, detail::Deleter<pert_op, pert_op_free>> handle_;
  Sense sense_ = Sense::Maximize;
};

/// The two-phase API: draw the perturbed inputs, solve them anywhere, finish.
class Draw {
 public:
  Draw(Op& op, View theta, std::size_t batch) : o_(op.output_numel()), d_(op.input_numel()) {
    if (theta.size != batch * d_)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "theta must hold batch * input_numel = " + std::to_string(batch * d_) +
                                                    " floats, got " + std::to_string(theta.size));
    pert_draw* d = nullptr;
    // counted as a running call of the op: destroying or closing it waits for the draw
    op.call([&] { return pert_draw_new(op.get(), theta.data, batch, &d); });
    handle_.reset(d);
    batch_ = batch;
  }
  std::size_t count() const noexcept { return pert_draw_count(get()); }
  /// The perturbed inputs [count, input_numel], owned by the draw.
  const float* inputs() const noexcept { return pert_draw_inputs(get()); }
  std::vector<float> finish(View solutions) const {
    std::vector<float> out(batch_ * o_);
    expect(solutions);
    detail::check(pert_draw_finish(get(), solutions.data, out.data(), nullptr));
    return out;
  }
  Result finish_with_tape(View solutions) const {
    std::vector<float> out(batch_ * o_);
    expect(solutions);
    pert_tape* tape = nullptr;
    detail::check(pert_draw_finish(get(), solutions.data, out.data(), &tape));
    return Result{std::move(out), Tape(tape, d_, o_)};
  }
  /// The Fenchel-Young loss [batch] of the draw's theta against y_true [batch,
  /// input_numel] and its gradient with respect to theta, from the solutions (what
  /// Op::fenchel_young gives for the same seed and call count).
  std::pair<std::vector<float>, std::vector<float>> fenchel_young(View solutions, View y_true) const {
    expect(solutions);
    if (y_true.size != batch_ * d_)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "y_true must hold batch * input_numel = " + std::to_string(batch_ * d_) +
                                                    " floats, got " + std::to_string(y_true.size));
    std::vector<float> loss(batch_), grad(batch_ * d_);
    detail::check(pert_draw_fenchel_young(get(), solutions.data, y_true.data, loss.data(), grad.data()));
    return {std::move(loss), std::move(grad)};
  }
  pert_draw* get() const noexcept { return handle_.get(); }

 private:
  void expect(View s) const {
    if (s.size != count() * o_)
      throw detail::error(PERT_STATUS_INVALID_ARGUMENT, "solutions must hold count * output_numel = " + std::to_string(count() * o_) +
                                                    " floats, got " + std::to_string(s.size));
  }
  std::unique_ptr<pert_draw, detail::Deleter<pert_draw, pert_draw_free>> handle_;
  std::size_t o_, d_, batch_ = 0;
};

}  // namespace pert

#endif  // PERTURBATIONS_HPP
