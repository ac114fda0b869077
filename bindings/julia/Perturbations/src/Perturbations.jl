"""
    Perturbations

Differentiable perturbed optimizers (Berthet et al., NeurIPS 2020) through the C API of
libperturbations. A solver is any Julia function taking a `d × count` `Matrix{Float32}`
of perturbed problems (one column per problem) and returning their `o × count`
solutions. `forward(op, θ)` gives y_σ(θ) for a `d × batch` matrix θ; `rrule`s make
`forward` and `fenchel_young` differentiable with Zygote/Flux.

The library is found when the package is loaded (in `__init__`, so a precompiled package
follows the environment of each session): `ENV["PERTURBATIONS_LIB"]` (a path) when set,
else the build tree's `target/release/libperturbations.<dlext>` when the package sits in
its source tree, else `libperturbations` on the system's library path. Its version must
have the major.minor this package was written for (checked when it loads).

Handles (`Config`, `Op`, `Tape`, `Draw`) own memory of the library that Julia's garbage
collector does not see (a tape can hold megabytes): free them early with `close(x)` (or
`free!(x)`), or use the do-block forms `forward_with_tape(op, θ) do y, tape ... end` and
`Draw(op, θ) do draw ... end`; finalizers free whatever is left. Handles cannot be copied
(`deepcopy` throws). An `Op` may be used from several tasks: its calls take turns.

Shapes: Julia arrays are column-major, so a `d × batch` matrix has the memory of a C
`[batch, d]` array; a built-in solver acts along the first Julia dimension of a problem
(the last C dimension).
"""
module Perturbations

using ChainRulesCore
using Libdl

export Config, Op, Tape, Draw, PerturbationsError, SolveInfo
export forward, forward_with_tape, vjp, jvp, jacobian, objective, fenchel_young, fenchel_young_with_bound, inputs, finish, free!, interrupt!
export spo_plus, spo_plus_with_grad, perturbation_gradient, perturbation_gradient_with_grad, blackbox, blackbox_vjp
export negative_identity, negative_identity_vjp, imle, aimle, imle_forward, imle_vjp, aimle_vjp, ImleRecord, AimleState
export Pool, add!, set_pool!, solver_calls, pool_best, nce, cmap, ltr_pointwise, ltr_pairwise, ltr_listwise, pool_loss_with_grad
export NOISE_NORMAL, NOISE_GUMBEL, NOISE_SUM_OF_GAMMA, PERTURBATION_ADDITIVE, PERTURBATION_MULTIPLICATIVE
export BASELINE_NONE, BASELINE_SAMPLE_MEAN, BASELINE_CLEAN_INPUT, SENSE_MAXIMIZE, SENSE_MINIMIZE
export BUILTIN_ARGMAX, BUILTIN_TOPK, BUILTIN_RANKS

# The library's path, resolved at load time by `__init__` (never at precompile time): a
# global, not a `const`, so that @ccall looks it up when it runs.
libperturbations = "libperturbations"

"""The major.minor of the library this package was written for."""
const LIBRARY_VERSION = (0, 1)

"""The library path to use: see the module's documentation."""
function find_library()
    from_env = get(ENV, "PERTURBATIONS_LIB", "")
    isempty(from_env) || return from_env
    in_tree = normpath(joinpath(@__DIR__, "..", "..", "..", "..", "target", "release", "libperturbations." * Libdl.dlext))
    isfile(in_tree) && return in_tree
    return "libperturbations"
end

const NOISE_NORMAL = UInt32(0)
const NOISE_GUMBEL = UInt32(1)
const NOISE_SUM_OF_GAMMA = UInt32(2)
const PERTURBATION_ADDITIVE = UInt32(0)
const PERTURBATION_MULTIPLICATIVE = UInt32(1)
const BASELINE_NONE = UInt32(0)
const BASELINE_SAMPLE_MEAN = UInt32(1)
const BASELINE_CLEAN_INPUT = UInt32(2)
const SENSE_MAXIMIZE = UInt32(0)
const SENSE_MINIMIZE = UInt32(1)
const BUILTIN_ARGMAX = UInt32(0)
const BUILTIN_TOPK = UInt32(1)
const BUILTIN_RANKS = UInt32(2)
const STATUS_OK = UInt32(0)
const STATUS_SOLVER_FAILED = UInt32(4)

"""
An error of the library: its status number, the status name and the message.

The message is the C library's, which counts from 0 in C's layout: `theta[p][j]` (or
"problem p, sample s") names problem p + 1, which is column p + 1 here, and its entry
j + 1 in that column's linear order: θ[j + 1, p + 1] for a matrix θ.
"""
struct PerturbationsError <: Exception
    status::UInt32
    name::String
    message::String
end

Base.showerror(io::IO, e::PerturbationsError) = print(io, e.name, ": ", e.message)

version() = unsafe_string(@ccall libperturbations.pert_version()::Cstring)
status_name(status::UInt32) = unsafe_string(@ccall libperturbations.pert_status_name(status::UInt32)::Cstring)
cuda_device_count() = Int(@ccall libperturbations.pert_cuda_device_count()::Int32)

"""
    device_report() -> String

What this process found of CUDA and how each device draws its noise
(`pert_device_report`): one `name: value` line per item (the CUDA driver and runtime, the
devices libtorch sees and why fewer than the driver, NVRTC, and for each CUDA device
`fused kernel` or `libtorch operations (the slow path)` and why).
"""
function device_report()
    len = Ref{Csize_t}(0)
    check(@ccall libperturbations.pert_device_report(C_NULL::Ptr{UInt8}, len::Ref{Csize_t})::UInt32)
    while true
        room = len[] + 1
        buf = Vector{UInt8}(undef, room)
        len[] = room
        check(@ccall libperturbations.pert_device_report(buf::Ptr{UInt8}, len::Ref{Csize_t})::UInt32)
        len[] < room && return String(buf[1:len[]])
    end
end

"""
    cuda_check_thread(device::Integer)

Throws `PerturbationsError` (`DEVICE_UNAVAILABLE`) unless a call on CUDA device `device`
(0-based, as the library counts) can run on this thread now (`pert_cuda_check_thread`):
the device exists, this is not a child forked after CUDA started, libtorch's current
stream of it on this thread is not capturing a CUDA graph, and no CUDA context other than
a device's primary one (PyCUDA's, a torch green context; CUDA.jl uses the primary
contexts) is current here. Every call on a CUDA op checks this itself.
"""
cuda_check_thread(device::Integer) = check(@ccall libperturbations.pert_cuda_check_thread(Int32(device)::Int32)::UInt32)

function last_error()
    n = @ccall libperturbations.pert_last_error(C_NULL::Ptr{UInt8}, 0::Csize_t)::Csize_t
    buf = Vector{UInt8}(undef, n + 1)
    @ccall libperturbations.pert_last_error(buf::Ptr{UInt8}, (n + 1)::Csize_t)::Csize_t
    return String(buf[1:n])
end

function check(status::UInt32)
    status == STATUS_OK || throw(PerturbationsError(status, status_name(status), last_error()))
    return nothing
end

# ---- Config ------------------------------------------------------------------------

"""
    Config(; num_samples, sigma, noise, seed, device, threads, max_threads, perturbation, baseline,
             antithetic, sense, chunk_bytes, max_tape_bytes, solve_ratio, linear_objective,
             remote_timeout)

Settings for ops; an op copies them when it is made. Unset keywords keep the library's
defaults (1000 samples, σ 0.05, Normal noise, seed 0, device "auto", 1 thread, ...).
`device` is a string or a Symbol (`:cpu`, `:cuda`, `Symbol("cuda:1")`); `noise`,
`perturbation`, `baseline` and `sense` take the constants (`NOISE_GUMBEL`, ...) or Symbols
(`:gumbel`, `:multiplicative`, `:clean_input`, `:minimize`, ...).
"""
mutable struct Config
    handle::Ptr{Cvoid}
    threads::UInt32
    # a config around a handle the library made (`copy`), which it then owns
    Config(handle::Ptr{Cvoid}, threads::UInt32) = finalizer(free!, new(handle, threads))
    function Config(; kwargs...)
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(@ccall libperturbations.pert_config_new(out::Ref{Ptr{Cvoid}})::UInt32)
        c = finalizer(free!, new(out[], UInt32(1)))
        for (key, value) in kwargs
            set!(c, Val(key), value)
        end
        return c
    end
end

function free!(c::Config)
    c.handle == C_NULL || @ccall libperturbations.pert_config_free(c.handle::Ptr{Cvoid})::Cvoid
    c.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, c::Config) = c.handle

set!(c::Config, ::Val{:num_samples}, v) = check(@ccall libperturbations.pert_config_set_num_samples(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:sigma}, v) = check(@ccall libperturbations.pert_config_set_sigma(c::Ptr{Cvoid}, Float64(v)::Cdouble)::UInt32)
set!(c::Config, ::Val{:noise}, v) = check(@ccall libperturbations.pert_config_set_noise(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
# `sum_of_gamma = (κ, terms)`: Sum-of-Gamma noise with those parameters
function set!(c::Config, ::Val{:sum_of_gamma}, v::Tuple{Real,Real})
    kappa, terms = v
    (isinteger(terms) && 1 <= terms <= typemax(UInt32)) ||
        throw(ArgumentError("the Sum-of-Gamma number of terms must be a whole number >= 1, got $terms"))
    check(@ccall libperturbations.pert_config_set_sum_of_gamma(c::Ptr{Cvoid}, Cdouble(kappa)::Cdouble,
        UInt32(terms)::UInt32)::UInt32)
end
set!(c::Config, ::Val{:seed}, v) = check(@ccall libperturbations.pert_config_set_seed(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:device}, v::AbstractString) = check(@ccall libperturbations.pert_config_set_device(c::Ptr{Cvoid}, v::Cstring)::UInt32)
set!(c::Config, ::Val{:device}, v::Symbol) = set!(c, Val(:device), String(v))
function set!(c::Config, ::Val{:threads}, v)
    check(@ccall libperturbations.pert_config_set_threads(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
    c.threads = UInt32(v)
end
set!(c::Config, ::Val{:max_threads}, v) = check(@ccall libperturbations.pert_config_set_max_threads(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:perturbation}, v) = check(@ccall libperturbations.pert_config_set_perturbation(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:baseline}, v) = check(@ccall libperturbations.pert_config_set_baseline(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:antithetic}, v) = check(@ccall libperturbations.pert_config_set_antithetic(c::Ptr{Cvoid}, Bool(v)::Bool)::UInt32)
set!(c::Config, ::Val{:sense}, v) = check(@ccall libperturbations.pert_config_set_sense(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)

# Symbols for the enumerated settings
const SYMBOLS = Dict(
    :noise => Dict(:normal => NOISE_NORMAL, :gumbel => NOISE_GUMBEL, :sum_of_gamma => NOISE_SUM_OF_GAMMA),
    :perturbation => Dict(:additive => PERTURBATION_ADDITIVE, :multiplicative => PERTURBATION_MULTIPLICATIVE),
    :baseline => Dict(:none => BASELINE_NONE, :sample_mean => BASELINE_SAMPLE_MEAN, :clean_input => BASELINE_CLEAN_INPUT),
    :sense => Dict(:maximize => SENSE_MAXIMIZE, :minimize => SENSE_MINIMIZE),
)
function symbol_setting(key::Symbol, v::Symbol)
    values = SYMBOLS[key]
    haskey(values, v) || throw(ArgumentError("unknown $key :$v; one of :" * join(sort(collect(keys(values))), ", :")))
    return values[v]
end
set!(c::Config, ::Val{:noise}, v::Symbol) = set!(c, Val(:noise), symbol_setting(:noise, v))
set!(c::Config, ::Val{:perturbation}, v::Symbol) = set!(c, Val(:perturbation), symbol_setting(:perturbation, v))
set!(c::Config, ::Val{:baseline}, v::Symbol) = set!(c, Val(:baseline), symbol_setting(:baseline, v))
set!(c::Config, ::Val{:sense}, v::Symbol) = set!(c, Val(:sense), symbol_setting(:sense, v))
set!(c::Config, ::Val{:chunk_bytes}, v) = check(@ccall libperturbations.pert_config_set_chunk_bytes(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:solve_ratio}, v) = check(@ccall libperturbations.pert_config_set_solve_ratio(c::Ptr{Cvoid}, Float64(v)::Cdouble)::UInt32)
set!(c::Config, ::Val{:linear_objective}, v) = check(@ccall libperturbations.pert_config_set_linear_objective(c::Ptr{Cvoid}, Bool(v)::Bool)::UInt32)
set!(c::Config, ::Val{:max_tape_bytes}, v) = check(@ccall libperturbations.pert_config_set_max_tape_bytes(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:remote_timeout}, v) = check(@ccall libperturbations.pert_config_set_remote_timeout(c::Ptr{Cvoid}, Float64(v)::Cdouble)::UInt32)
set!(::Config, ::Val{K}, _) where {K} = throw(ArgumentError("unknown Config setting $K"))

"""`copy(c::Config)`: a new config with every setting of `c` (`pert_config_clone`)."""
function Base.copy(c::Config)
    out = Ref{Ptr{Cvoid}}(C_NULL)
    check(@ccall libperturbations.pert_config_clone(c::Ptr{Cvoid}, out::Ref{Ptr{Cvoid}})::UInt32)
    return Config(out[], c.threads)
end

"""`describe(c::Config)`: every setting as `name=value` lines (`pert_config_describe`); two
configs hold the same settings exactly when their descriptions are equal."""
function describe(c::Config)
    n = @ccall libperturbations.pert_config_describe(c::Ptr{Cvoid}, C_NULL::Ptr{UInt8}, 0::Csize_t)::Csize_t
    buf = Vector{UInt8}(undef, n + 1)
    @ccall libperturbations.pert_config_describe(c::Ptr{Cvoid}, buf::Ptr{UInt8}, (n + 1)::Csize_t)::Csize_t
    return String(buf[1:n])
end
Base.show(io::IO, ::MIME"text/plain", c::Config) = print(io, "Config:\n", describe(c))

"""`set_last_error(status, message)`: records `message` as this thread's last error of the
library (`pert_set_last_error`) and returns `status`: for Julia code that calls C
components built on the library and reports their errors the library's way."""
set_last_error(status::UInt32, message::AbstractString) =
    @ccall libperturbations.pert_set_last_error(status::UInt32, message::Cstring)::UInt32

# ---- Tape --------------------------------------------------------------------------

"""
    AimleState(alpha=1.0, grad_norm_avg=1.0, step=1e-3)

The state of AI-MLE's adaptive step (`pert_aimle_state`): λ = α‖θ‖/‖ḡ‖, α moved by
`step` after each backward pass. A `Ref` of it is passed to [`aimle_vjp`](@ref) and
[`aimle`](@ref), which update it.
"""
struct AimleState
    alpha::Cdouble
    grad_norm_avg::Cdouble
    step::Cdouble
end
"""`AimleState()`: the library's defaults (`pert_aimle_state_default`: α 1, average 1, step 0.001)."""
AimleState() = @ccall libperturbations.pert_aimle_state_default()::AimleState

"""
The record of an I-MLE forward call ([`imle_forward`](@ref)): its perturbed inputs and
solutions, for [`imle_vjp`](@ref) and [`aimle_vjp`](@ref) with the same op.
"""
mutable struct ImleRecord
    handle::Ptr{Cvoid}
    d::Int
    batch::Int
    function ImleRecord(handle::Ptr{Cvoid}, d, batch)
        return finalizer(free!, new(handle, d, batch))
    end
end

function free!(r::ImleRecord)
    r.handle == C_NULL || @ccall libperturbations.pert_imle_free(r.handle::Ptr{Cvoid})::Cvoid
    r.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, r::ImleRecord) = r.handle

"""`batch(record)`: the number of problems of the I-MLE forward call that made the record."""
batch(r::ImleRecord) = Int(@ccall libperturbations.pert_imle_batch(r::Ptr{Cvoid})::Csize_t)

"""What a forward call keeps for its gradients; valid after its op is freed."""
mutable struct Tape
    handle::Ptr{Cvoid}
    d::Int
    o::Int
    batch::Int
    function Tape(handle::Ptr{Cvoid}, d, o, batch)
        return finalizer(free!, new(handle, d, o, batch))
    end
end

function free!(t::Tape)
    t.handle == C_NULL || @ccall libperturbations.pert_tape_free(t.handle::Ptr{Cvoid})::Cvoid
    t.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, t::Tape) = t.handle

"""`batch(tape)`: the number of problems of the forward call that made the tape."""
batch(t::Tape) = Int(@ccall libperturbations.pert_tape_batch(t::Ptr{Cvoid})::Csize_t)

"""`vjp(tape, g)`: Jᵀg per problem, for `g` of size `o × batch`; returns `d × batch`."""
function vjp(t::Tape, g::AbstractMatrix)
    gc = Matrix{Float32}(g)
    size(gc) == (t.o, t.batch) || throw(DimensionMismatch("grad_output must be $(t.o) × $(t.batch), got $(size(gc))"))
    out = Matrix{Float32}(undef, t.d, t.batch)
    check(@ccall libperturbations.pert_tape_vjp(t::Ptr{Cvoid}, gc::Ptr{Float32}, out::Ptr{Float32})::UInt32)
    return out
end

"""`jvp(tape, v)`: J v per problem, for `v` of size `d × batch`; returns `o × batch`."""
function jvp(t::Tape, v::AbstractMatrix)
    vc = Matrix{Float32}(v)
    size(vc) == (t.d, t.batch) || throw(DimensionMismatch("tangent must be $(t.d) × $(t.batch), got $(size(vc))"))
    out = Matrix{Float32}(undef, t.o, t.batch)
    check(@ccall libperturbations.pert_tape_jvp(t::Ptr{Cvoid}, vc::Ptr{Float32}, out::Ptr{Float32})::UInt32)
    return out
end

"""`jacobian(tape)`: an `o × d × batch` array; `J[:, :, b]` is problem b's Jacobian."""
function jacobian(t::Tape)
    raw = Array{Float32}(undef, t.d, t.o, t.batch)  # C [batch, o, d]
    check(@ccall libperturbations.pert_tape_jacobian(t::Ptr{Cvoid}, raw::Ptr{Float32})::UInt32)
    return permutedims(raw, (2, 1, 3))
end

"""`objective(tape)`: F_σ(θ) per problem (output shape = input shape)."""
function objective(t::Tape)
    out = Vector{Float32}(undef, t.batch)
    check(@ccall libperturbations.pert_tape_objective(t::Ptr{Cvoid}, out::Ptr{Float32})::UInt32)
    return out
end

# ---- Op ----------------------------------------------------------------------------

"""
    Op(solver, config, input_shape, output_shape)
    Op(solver, config, input_shape, output_shape; info=true, init=nothing, fini=nothing)
    Op(config, builtin; k, input_shape)      # a built-in solver (BUILTIN_ARGMAX, ...)
    Op(config, input_shape, output_shape; external=true)   # solved elsewhere (see Draw)

A perturbed optimizer. `solver(x::Matrix{Float32})` receives `d × count` perturbed
problems and returns `o × count` solutions; it runs on the calling thread (the config
must have `threads = 1`). `x` wraps the library's own buffer: it is read-only (writing
into it, as `sort!(x)` or `x .= -x` would, corrupts the call's estimates and, with the
clean-input baseline, may write into the caller's θ) and valid only during the call
(`copy(x)` to keep it). Its exceptions are rethrown by the call that ran it, with the
solver's backtrace kept on the exception stack (`current_exceptions()`, shown as
"caused by"). A built-in solver acts along the first Julia dimension of a problem.

With `device=true` the solver works where the op's data lives (see C
`pert_op_new_device`): it is called on the calling thread as `solver(info, x::Ptr{Float32},
count, y::Ptr{Float32}, stream::Ptr{Cvoid})` with raw pointers to `d × count` inputs and
`o × count` outputs (CUDA device memory of device `info.device` for a CUDA op, e.g.
`unsafe_wrap(CuArray, CuPtr{Float32}(UInt(x)), (d, count))` with CUDA.jl; host memory for a
CPU op, `info.device == -1`) and `stream == C_NULL`. The library synchronizes the device
before and after the call, so CUDA.jl's task-local stream is fine: queue the work there
(or synchronize) before returning.

With `info=true` the solver is called as `solver(info::SolveInfo, x)` (see
[`SolveInfo`](@ref): which problems and samples the columns are) on the op's own
persistent worker threads (the config's `threads`; worker w is always the same thread),
never on the calling thread: `init(worker)` runs on worker `worker` (0-based) once, before
its first solve, and `fini(worker)` there when the op is freed (for each worker whose
init ran). With `threads` > 1 the solver and hooks run on several threads at once and
must be thread-safe; they must not yield (no I/O waits, `sleep`, `fetch`, contended
locks), nor call or free their own op. On a worker `Threads.threadid()` is outside
`1:nthreads()`: index per-worker data by `info.worker + 1`. This needs Julia ≥ 1.9
(threads started outside Julia may call Julia code); the calling thread waits for the
workers in a GC-safe region, so collections the workers start go ahead. Julia adopts each
worker thread the first time it runs a solver or hook, and may keep the adopted thread's
slot after the op is freed and its threads end: make ops with info once and reuse them
(not one per iteration of a loop); a warning is printed once a process has adopted over
256 worker threads.

A plain solver (and a device solver) runs on the calling thread inside the C call; it may
yield (I/O, `sleep`): the calling task stays on its OS thread for the call (other tasks
may run on that thread meanwhile). An op with a
`fini` hook that the garbage collector finalizes is freed by a task that finalizer
schedules (a finalizer must not wait for Julia code on other threads): `free!` it.

An op may be used from several tasks: its calls take turns (a lock per op; the C op runs
one call at a time). A plain solver may call back into other ops.
"""
mutable struct Op
    handle::Ptr{Cvoid}
    solver::Any
    error::Any                 # the running call's solver exception (calls take turns)
    lock::ReentrantLock
    busy::Bool                 # a call runs (a solver may not call its own op)
    d::Int
    o::Int
    workers::Bool              # made with info=true: solves run on the op's worker threads
    init::Any
    fini::Any
    errlock::Threads.SpinLock  # workers store the first exception under it
    function Op(solver, config::Config, input_shape, output_shape; info::Bool=false, init=nothing, fini=nothing,
                device::Bool=false)
        (info || init === nothing && fini === nothing) ||
            throw(ArgumentError("init and fini hooks are for solvers with info (info=true)"))
        device && info && throw(ArgumentError("a solver is either a device solver or one with info"))
        info && VERSION < v"1.9" && throw(ArgumentError("solvers with info run on the op's worker threads, " *
            "which call Julia code from threads started outside Julia: that needs Julia ≥ 1.9, this is $VERSION"))
        info || device || config.threads == 1 ||
            throw(ArgumentError("Julia solvers run on one thread: the config must have threads = 1 (or use info=true)"))
        op = new(C_NULL, solver, nothing, ReentrantLock(), false, prod(input_shape; init=1), prod(output_shape; init=1),
            info, init, fini, Threads.SpinLock())
        ins = Int64[reverse(collect(input_shape))...]    # Julia column-major = C row-major reversed
        outs = Int64[reverse(collect(output_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        GC.@preserve ins outs begin
            if device
                # called on the calling thread, with the rows where the op's data lives
                check(@ccall libperturbations.pert_op_new_device(config::Ptr{Cvoid}, ins::Ptr{Int64},
                    length(ins)::Csize_t, outs::Ptr{Int64}, length(outs)::Csize_t, DEVICE_TRAMPOLINE[]::Ptr{Cvoid},
                    pointer_from_objref(op)::Ptr{Cvoid}, out::Ref{Ptr{Cvoid}})::UInt32)
            elseif info
                count_adopted(config.threads)
                check(@ccall libperturbations.pert_op_new_ex(config::Ptr{Cvoid}, ins::Ptr{Int64}, length(ins)::Csize_t,
                    outs::Ptr{Int64}, length(outs)::Csize_t, TRAMPOLINE_EX[]::Ptr{Cvoid},
                    pointer_from_objref(op)::Ptr{Cvoid}, (init === nothing ? C_NULL : INIT_TRAMPOLINE[])::Ptr{Cvoid},
                    (fini === nothing ? C_NULL : FINI_TRAMPOLINE[])::Ptr{Cvoid}, out::Ref{Ptr{Cvoid}})::UInt32)
            else
                check(@ccall libperturbations.pert_op_new(config::Ptr{Cvoid}, ins::Ptr{Int64}, length(ins)::Csize_t,
                    outs::Ptr{Int64}, length(outs)::Csize_t, TRAMPOLINE[]::Ptr{Cvoid},
                    pointer_from_objref(op)::Ptr{Cvoid}, out::Ref{Ptr{Cvoid}})::UInt32)
            end
        end
        op.handle = out[]
        return finalizer(release!, op)
    end
    function Op(config::Config, input_shape, output_shape; external::Bool)
        external || throw(ArgumentError("give a solver, or external=true for the two-phase API"))
        ins = Int64[reverse(collect(input_shape))...]
        outs = Int64[reverse(collect(output_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(@ccall libperturbations.pert_op_new_external(config::Ptr{Cvoid}, ins::Ptr{Int64}, length(ins)::Csize_t,
            outs::Ptr{Int64}, length(outs)::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        return finalizer(release!, new(out[], nothing, nothing, ReentrantLock(), false, prod(input_shape; init=1),
            prod(output_shape; init=1), false, nothing, nothing, Threads.SpinLock()))
    end
    function Op(config::Config, builtin::UInt32; input_shape, k::Integer=0)
        ins = Int64[reverse(collect(input_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(@ccall libperturbations.pert_op_new_builtin(config::Ptr{Cvoid}, builtin::UInt32, Int64(k)::Int64,
            ins::Ptr{Int64}, length(ins)::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        n = prod(input_shape; init=1)
        return finalizer(release!, new(out[], nothing, nothing, ReentrantLock(), false, n, n, false, nothing,
            nothing, Threads.SpinLock()))
    end
end

# Worker threads of ops with info made so far (Julia adopts each one that runs a callback).
const ADOPTION_WARNING = 256
const WORKER_THREADS_MADE = Threads.Atomic{Int}(0)

function count_adopted(threads::Integer)
    # (threads = 0: one per core)
    n = threads == 0 ? Sys.CPU_THREADS : Int(threads)
    before = Threads.atomic_add!(WORKER_THREADS_MADE, n)
    before <= ADOPTION_WARNING < before + n &&
        @warn "Perturbations: ops with info have started $(before + n) worker threads in this process; Julia adopts " *
              "each and may not reuse their slots after the ops are freed: make such ops once and reuse them"
    return nothing
end

# The finalizer: no lock (finalizers may not wait), and no call can be running. Freeing an
# op with info runs its workers' fini hooks (Julia code on other threads) and waits for
# them: a finalizer must not wait on other threads' Julia code (it may run while its task
# holds a lock a hook takes), so such an op is freed by a task scheduled from here.
function release!(op::Op)
    op.handle == C_NULL && return nothing
    if op.workers && op.fini !== nothing
        errormonitor(@async free!(op))
        return nothing
    end
    free_now!(op)
end

function free_now!(op::Op)
    handle = op.handle
    handle == C_NULL && return nothing
    op.handle = C_NULL
    if op.workers
        # the workers run Julia code (fini hooks) while this thread waits in C
        gc_safe_op_free(handle)
    else
        @ccall libperturbations.pert_op_free(handle::Ptr{Cvoid})::Cvoid
    end
    return nothing
end

# ---- calls that wait in C for Julia code on the op's worker threads -----------------------
# While a call of an op with info waits in C, its workers run Julia code (threads adopted
# by Julia), and a garbage collection they start must not wait for this thread: these calls
# enter a GC-safe region around the C call (`jl_gc_safe_enter`), with every argument
# converted to a raw pointer or number before, so that no Julia code runs inside it. The C
# functions are looked up once, when the package loads (`PERT_*` below); their types are
# checked against the header by tests/julia_binding.rs like the @ccalls.

const PERT_FORWARD = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_FENCHEL_YOUNG_WITH_BOUND = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_OP_SOLVE = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_OP_FREE = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_SPO_PLUS = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_BLACKBOX_VJP = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_PERTURBATION_GRADIENT = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_IMLE_FORWARD = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_IMLE_VJP = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_AIMLE_VJP = Ref{Ptr{Cvoid}}(C_NULL)
# the five pool-based losses share one prototype, and one GC-safe caller (`gc_safe_pool_loss`)
const PERT_NCE = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_CMAP = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_LTR_POINTWISE = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_LTR_PAIRWISE = Ref{Ptr{Cvoid}}(C_NULL)
const PERT_LTR_LISTWISE = Ref{Ptr{Cvoid}}(C_NULL)

function gc_safe_pool_loss(which::Ref{Ptr{Cvoid}}, op::Ptr{Cvoid}, pred::Ptr{Float32}, target::Ptr{Float32},
                           batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    fn = which[]  # one of the PERT_NCE ... PERT_LTR_LISTWISE above
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Float32}),
        op, pred, target, batch, loss, grad)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_forward(op::Ptr{Cvoid}, theta::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
                         tape::Ptr{Ptr{Cvoid}})::UInt32
    fn = PERT_FORWARD[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Ptr{Cvoid}}), op, theta, batch, out, tape)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_solve(op::Ptr{Cvoid}, x::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32})::UInt32
    fn = PERT_OP_SOLVE[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}), op, x, batch, out)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_fenchel_young(op::Ptr{Cvoid}, theta::Ptr{Float32}, y_true::Ptr{Float32}, batch::Csize_t,
                               loss::Ptr{Float32}, grad::Ptr{Float32}, bound::Ptr{Float32})::UInt32
    fn = PERT_FENCHEL_YOUNG_WITH_BOUND[]  # the bound may be C_NULL
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Float32},
        Ptr{Float32}), op, theta, y_true, batch, loss, grad, bound)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_spo_plus(op::Ptr{Cvoid}, pred::Ptr{Float32}, cost::Ptr{Float32}, sol::Ptr{Float32},
                          obj::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    fn = PERT_SPO_PLUS[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Ptr{Float32}, Ptr{Float32}, Ptr{Float32}, Csize_t,
        Ptr{Float32}, Ptr{Float32}), op, pred, cost, sol, obj, batch, loss, grad)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_blackbox_vjp(op::Ptr{Cvoid}, theta::Ptr{Float32}, y::Ptr{Float32}, g::Ptr{Float32},
                              batch::Csize_t, lambda::Cdouble, out::Ptr{Float32})::UInt32
    fn = PERT_BLACKBOX_VJP[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Ptr{Float32}, Ptr{Float32}, Csize_t, Cdouble,
        Ptr{Float32}), op, theta, y, g, batch, lambda, out)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_perturbation_gradient(op::Ptr{Cvoid}, pred::Ptr{Float32}, cost::Ptr{Float32}, batch::Csize_t,
                                       sigma::Cdouble, two_sided::Int32, loss::Ptr{Float32},
                                       grad::Ptr{Float32})::UInt32
    fn = PERT_PERTURBATION_GRADIENT[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Ptr{Float32}, Csize_t, Cdouble, Int32, Ptr{Float32},
        Ptr{Float32}), op, pred, cost, batch, sigma, two_sided, loss, grad)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_imle_forward(op::Ptr{Cvoid}, theta::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
                              record::Ptr{Ptr{Cvoid}})::UInt32
    fn = PERT_IMLE_FORWARD[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Ptr{Cvoid}}), op, theta, batch,
        out, record)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_imle_vjp(op::Ptr{Cvoid}, record::Ptr{Cvoid}, g::Ptr{Float32}, lambda::Cdouble, two::Int32,
                          out::Ptr{Float32})::UInt32
    fn = PERT_IMLE_VJP[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Float32}, Cdouble, Int32, Ptr{Float32}), op, record, g,
        lambda, two, out)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_aimle_vjp(op::Ptr{Cvoid}, record::Ptr{Cvoid}, g::Ptr{Float32}, two::Int32, st::Ptr{AimleState},
                           out::Ptr{Float32})::UInt32
    fn = PERT_AIMLE_VJP[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    status = ccall(fn, UInt32, (Ptr{Cvoid}, Ptr{Cvoid}, Ptr{Float32}, Int32, Ptr{AimleState}, Ptr{Float32}), op,
        record, g, two, st, out)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return status
end

function gc_safe_op_free(op::Ptr{Cvoid})
    fn = PERT_OP_FREE[]
    state = ccall(:jl_gc_safe_enter, Int8, ())
    ccall(fn, Cvoid, (Ptr{Cvoid},), op)
    ccall(:jl_gc_safe_leave, Cvoid, (Int8,), state)
    return nothing
end

# The op whose worker callback runs on this thread (its objectid; 0: none): a solver or
# hook calling its own op would wait for itself. No reference to the op is kept.
solving_op() = get(task_local_storage(), :perturbations_solving, UInt(0))::UInt

function in_callback(f, op::Op)
    task_local_storage(:perturbations_solving, objectid(op))
    try
        return f()
    finally
        task_local_storage(:perturbations_solving, UInt(0))
    end
end

function refuse_own_call(op::Op)
    op.workers && solving_op() == objectid(op) &&
        throw(ArgumentError("a solver or hook cannot call or free its own op (it would wait for itself)"))
end

"""`free!(op)`: frees the op now (waiting for a call of another task to end). A solver or
hook cannot free its own op (`ArgumentError`): its call still runs."""
function free!(op::Op)
    refuse_own_call(op)
    lock(op.lock) do
        # (the lock is reentrant: a plain or device solver runs on the task that holds it)
        op.busy && throw(ArgumentError("a solver cannot free its own op while the op runs its call"))
        free_now!(op)
    end
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, op::Op) = op.handle

"""
    interrupt!(op::Op)

Stops the calls running on `op` now, from any task or thread: each throws a
`PerturbationsError` with status `PERT_STATUS_INTERRUPTED` (8) at its next block of
samples (a solver call that runs is not cut short), having written nothing. Calls that
start afterwards are not affected. A freed op is ignored.
"""
function interrupt!(op::Op)
    h = op.handle
    h == C_NULL || @ccall libperturbations.pert_op_interrupt(h::Ptr{Cvoid})::Cvoid
    return nothing
end

"""
`on_free!(op, hook, data)`: C function `hook` (a `Ptr{Cvoid}`, e.g. from `@cfunction`,
taking one `Ptr{Cvoid}`) runs with `data` once when the op's handle is freed, after its
workers stopped (`pert_op_on_free`): for C code that keeps state with an op. The hook runs
on the thread that frees the op, possibly a finalizer's: it must not call Julia.
"""
function on_free!(op::Op, hook::Ptr{Cvoid}, data::Ptr{Cvoid})
    lock(op.lock) do   # (free! frees the handle under it)
        op.handle == C_NULL && throw(ArgumentError("the op was freed"))
        check(@ccall libperturbations.pert_op_on_free(op::Ptr{Cvoid}, hook::Ptr{Cvoid}, data::Ptr{Cvoid})::UInt32)
    end
    return nothing
end

"""`solver_threads(op)`: the threads that call the op's solver (its workers; `pert_op_solver_threads`)."""
solver_threads(op::Op) = Int(@ccall libperturbations.pert_op_solver_threads(op::Ptr{Cvoid})::Csize_t)

"""Elements of one problem's input and output, as the library reports them."""
input_numel(op::Op) = Int(@ccall libperturbations.pert_op_input_numel(op::Ptr{Cvoid})::Csize_t)
output_numel(op::Op) = Int(@ccall libperturbations.pert_op_output_numel(op::Ptr{Cvoid})::Csize_t)

"""`sense(op)`: the op's sense as the library has it, `:maximize` or `:minimize` (`pert_op_sense`)."""
function sense(op::Op)
    s = Ref{UInt32}(0)
    check(@ccall libperturbations.pert_op_sense(op::Ptr{Cvoid}, s::Ref{UInt32})::UInt32)
    return s[] == SENSE_MINIMIZE ? :minimize : :maximize
end

# The C callback: recovers the Op from user_data, runs its solver on the columns, and
# stashes any exception (returning non-zero) so that it is rethrown after the C call.
function trampoline(user_data::Ptr{Cvoid}, inputs::Ptr{Float32}, count::Csize_t, outputs::Ptr{Float32})::Int32
    op = unsafe_pointer_to_objref(user_data)::Op
    try
        x = unsafe_wrap(Matrix{Float32}, inputs, (op.d, Int(count)))
        y = op.solver(x)
        size(y) == (op.o, Int(count)) || throw(DimensionMismatch("the solver returned $(size(y)), expected $((op.o, Int(count)))"))
        unsafe_wrap(Matrix{Float32}, outputs, (op.o, Int(count))) .= y
        return Int32(0)
    catch err
        op.error = CapturedException(err, catch_backtrace())
        solver_message(err)  # the C status's message names the rows and carries this text
        return Int32(1)
    end
end

const TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)
const TRAMPOLINE_EX = Ref{Ptr{Cvoid}}(C_NULL)
const INIT_TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)
const FINI_TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)
const DEVICE_TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)

# The C `pert_solve_info`, field for field (what the library passes to a solver with info).
struct CSolveInfo
    struct_size::UInt32
    worker::UInt32
    clean::UInt32
    reserved::UInt32
    first_row::UInt64
    num_samples::UInt64
    batch::Csize_t
    device::Int32
    pool_best::Ptr{Cvoid}
    pool::Ptr{Cvoid}
end

# The solver call an info belongs to: `pool_best` reads the library's state of that call,
# which is gone once the call has returned. The trampoline clears `running` (under the lock,
# so after any `pool_best` still reading) as the solver returns. A spin lock: solvers on the
# op's workers must not yield.
mutable struct SolverCall
    running::Bool
    lock::Threads.SpinLock
end

# The call of infos that offer no pool (`pool_best` gives `nothing` without looking).
const NO_POOL_CALL = SolverCall(false, Threads.SpinLock())

"""
    SolveInfo

Where the columns of one solver call sit in the forward call (C `pert_solve_info`), the
first argument of a solver of an op made with `info=true`. Its properties are the C
struct's, numbers 0-based as in C: `worker` (the worker running the call: always the same
thread), `clean` (1: the columns are the unperturbed θ of problems `first_row ...`, for
the clean-input baseline), `first_row` (column r, 1-based, is global row
`first_row + r - 1`: problem `(first_row + r - 1) ÷ num_samples`, sample
`(first_row + r - 1) % num_samples`), `num_samples`, `batch`, `device` (-1: host memory;
N: CUDA device N, for device solvers of CUDA ops), and for warm starts `pool_best` and
`pool` (see [`pool_best`](@ref)).
"""
struct SolveInfo
    c::CSolveInfo
    call::SolverCall
end

Base.getproperty(info::SolveInfo, name::Symbol) =
    name === :c || name === :call ? getfield(info, name) : getfield(getfield(info, :c), name)
Base.propertynames(::SolveInfo, private::Bool=false) =
    private ? (fieldnames(CSolveInfo)..., :c, :call) : fieldnames(CSolveInfo)

function Base.show(io::IO, info::SolveInfo)
    print(io, "SolveInfo(worker=", Int(info.worker), ", clean=", Int(info.clean), ", first_row=",
          Int(info.first_row), ", num_samples=", Int(info.num_samples), ", batch=", Int(info.batch),
          ", device=", Int(info.device), ")")
end

"""
`pool_best(info, x)`: for warm starts, inside a solver given `info` (a pooled op's call):
the op's pool's solution of best ⟨x, y⟩ for input row `x` (one column: the input's size)
in the op's sense, or `nothing` when the call has no pool, the pool is empty or `x` is
not one row (`pert_solve_info.pool_best`). Only during the solver call that got `info`:
an `info` kept past its call gives `nothing` (the library's state of that call is gone).
"""
function pool_best(info::SolveInfo, x::AbstractVector{<:Real})
    c, call = getfield(info, :c), getfield(info, :call)
    c.pool_best == C_NULL && return nothing
    xs = Vector{Float32}(x)
    out = similar(xs)
    lock(call.lock)
    got = try
        # (`running` is cleared under this lock as the call returns: the state is alive here)
        call.running ? ccall(c.pool_best, Int32, (Ref{CSolveInfo}, Ptr{Float32}, Csize_t, Ptr{Float32}), c, xs,
                             length(xs), out) : Int32(0)
    finally
        unlock(call.lock)
    end
    return got == 1 ? out : nothing
end

# The solve info at `info`, checked: a library whose struct is smaller than this package's
# (an older one) would be read past its end.
function load_info(info::Ptr{CSolveInfo})
    size = unsafe_load(Ptr{UInt32}(info))
    size >= sizeof(CSolveInfo) || throw(ErrorException("the library's pert_solve_info has $size bytes, " *
        "this package reads $(sizeof(CSolveInfo)): use the library this package was made for"))
    return unsafe_load(info)
end

# Runs `f(info::SolveInfo)` for the solver call at `info`; an info that offers the pool
# stops offering it when `f` returns (or throws), also to copies kept past the call.
function with_info(f, info::Ptr{CSolveInfo})
    c = load_info(info)
    c.pool_best == C_NULL && return f(SolveInfo(c, NO_POOL_CALL))
    call = SolverCall(true, Threads.SpinLock())
    try
        return f(SolveInfo(c, call))
    finally
        lock(call.lock)
        call.running = false
        unlock(call.lock)
    end
end

# Keeps the first exception of the workers of a call.
function keep_error!(op::Op, err, backtrace)
    lock(op.errlock)
    try
        op.error === nothing && (op.error = CapturedException(err, backtrace))
    finally
        unlock(op.errlock)
    end
    return nothing
end

# The solver's exception as the C status's message (on the thread that returns non-zero).
function solver_message(err)
    text = replace(first(sprint(showerror, err), 512), '\0' => ' ')
    @ccall libperturbations.pert_solver_set_error(text::Cstring)::Cvoid
end

# The C callback of a solver with info, on a worker thread.
function trampoline_ex(user_data::Ptr{Cvoid}, info::Ptr{CSolveInfo}, inputs::Ptr{Float32}, count::Csize_t,
                       outputs::Ptr{Float32})::Int32
    op = unsafe_pointer_to_objref(user_data)::Op
    try
        in_callback(op) do
            x = unsafe_wrap(Matrix{Float32}, inputs, (op.d, Int(count)))
            y = with_info(i -> op.solver(i, x), info)
            size(y) == (op.o, Int(count)) || throw(DimensionMismatch("the solver returned $(size(y)), expected $((op.o, Int(count)))"))
            unsafe_wrap(Matrix{Float32}, outputs, (op.o, Int(count))) .= y
        end
        return Int32(0)
    catch err
        keep_error!(op, err, catch_backtrace())
        solver_message(err)
        return Int32(1)
    end
end

# The C callback of a device solver, on the calling thread: raw pointers where the op's data
# lives (CUDA device memory for a CUDA op: wrap them with CUDA.jl), and the stream.
function device_trampoline(user_data::Ptr{Cvoid}, info::Ptr{CSolveInfo}, inputs::Ptr{Float32}, count::Csize_t,
                           outputs::Ptr{Float32}, stream::Ptr{Cvoid})::Int32
    op = unsafe_pointer_to_objref(user_data)::Op
    try
        with_info(i -> op.solver(i, inputs, Int(count), outputs, stream), info)
        return Int32(0)
    catch err
        op.error = CapturedException(err, catch_backtrace())
        solver_message(err)
        return Int32(1)
    end
end

function init_trampoline(user_data::Ptr{Cvoid}, worker::UInt32)::Int32
    op = unsafe_pointer_to_objref(user_data)::Op
    try
        in_callback(() -> op.init(Int(worker)), op)
        return Int32(0)
    catch err
        keep_error!(op, err, catch_backtrace())
        solver_message(err)
        return Int32(1)
    end
end

function fini_trampoline(user_data::Ptr{Cvoid}, worker::UInt32)::Cvoid
    op = unsafe_pointer_to_objref(user_data)::Op
    try
        in_callback(() -> op.fini(Int(worker)), op)
    catch err
        # at pert_op_free there is no caller to give it to: reported, as Julia reports an
        # error in a finalizer
        try
            Core.println("Perturbations: fini($(Int(worker))) threw: ", sprint(showerror, err))
        catch
        end
    end
    return nothing
end

function __init__()
    global libperturbations = find_library()
    if Libdl.dlopen(libperturbations; throw_error=false) === nothing
        error("Perturbations: cannot load the library \"$libperturbations\": set ENV[\"PERTURBATIONS_LIB\"] to the path of " *
              "libperturbations.$(Libdl.dlext) (built by `make build`, or installed by `make install`)")
    end
    v = version()
    major, minor = parse.(Int, split(v, ".")[1:2])
    (major, minor) == LIBRARY_VERSION || error("Perturbations: the library \"$libperturbations\" is version $v; " *
        "this package needs $(LIBRARY_VERSION[1]).$(LIBRARY_VERSION[2]).x")
    handle = Libdl.dlopen(libperturbations)
    PERT_FORWARD[] = Libdl.dlsym(handle, :pert_forward)
    PERT_FENCHEL_YOUNG_WITH_BOUND[] = Libdl.dlsym(handle, :pert_fenchel_young_with_bound)
    PERT_OP_SOLVE[] = Libdl.dlsym(handle, :pert_op_solve)
    PERT_OP_FREE[] = Libdl.dlsym(handle, :pert_op_free)
    PERT_SPO_PLUS[] = Libdl.dlsym(handle, :pert_spo_plus)
    PERT_BLACKBOX_VJP[] = Libdl.dlsym(handle, :pert_blackbox_vjp)
    PERT_PERTURBATION_GRADIENT[] = Libdl.dlsym(handle, :pert_perturbation_gradient)
    PERT_IMLE_FORWARD[] = Libdl.dlsym(handle, :pert_imle_forward)
    PERT_IMLE_VJP[] = Libdl.dlsym(handle, :pert_imle_vjp)
    PERT_AIMLE_VJP[] = Libdl.dlsym(handle, :pert_aimle_vjp)
    PERT_NCE[] = Libdl.dlsym(handle, :pert_nce)
    PERT_CMAP[] = Libdl.dlsym(handle, :pert_cmap)
    PERT_LTR_POINTWISE[] = Libdl.dlsym(handle, :pert_ltr_pointwise)
    PERT_LTR_PAIRWISE[] = Libdl.dlsym(handle, :pert_ltr_pairwise)
    PERT_LTR_LISTWISE[] = Libdl.dlsym(handle, :pert_ltr_listwise)
    TRAMPOLINE[] = @cfunction(trampoline, Int32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}))
    TRAMPOLINE_EX[] = @cfunction(trampoline_ex, Int32, (Ptr{Cvoid}, Ptr{CSolveInfo}, Ptr{Float32}, Csize_t, Ptr{Float32}))
    INIT_TRAMPOLINE[] = @cfunction(init_trampoline, Int32, (Ptr{Cvoid}, UInt32))
    FINI_TRAMPOLINE[] = @cfunction(fini_trampoline, Cvoid, (Ptr{Cvoid}, UInt32))
    DEVICE_TRAMPOLINE[] = @cfunction(device_trampoline, Int32,
        (Ptr{Cvoid}, Ptr{CSolveInfo}, Ptr{Float32}, Csize_t, Ptr{Float32}, Ptr{Cvoid}))
    return nothing
end

# Runs a C call on `op` (calls of one op take turns), rethrowing the solver's exception if
# it raised one: the original exception, thrown while the captured one (with the solver's
# backtrace) is being handled, so that the exception stack keeps both.
function call(f, op::Op)
    # a worker of this op's running call would wait for the lock its caller holds
    refuse_own_call(op)
    captured = lock(op.lock) do
        op.busy && throw(ArgumentError("a solver cannot call its own op (the op runs one call at a time)"))
        op.busy = true
        op.error = nothing
        try
            status = GC.@preserve op on_this_thread(f)
            err = op.error
            err === nothing && check(status)
            err
        finally
            op.error = nothing
            op.busy = false
        end
    end
    captured === nothing && return nothing
    try
        throw(captured)
    catch
        throw(captured.ex)
    end
end

# Runs `f` (a C call) with the current task kept on its OS thread: a plain or device solver
# runs inside the C call on this task, and if it yields (I/O, `sleep`, a contended lock)
# the scheduler must resume it on the same thread, where the library's frames and
# per-thread state are (a migrated task would continue them on another OS thread). Other
# tasks may run on the thread meanwhile.
function on_this_thread(f)
    task = current_task()
    sticky = task.sticky
    task.sticky = true
    try
        return f()
    finally
        task.sticky = sticky
    end
end

function batch_of(op::Op, theta::AbstractMatrix)
    size(theta, 1) == op.d || throw(DimensionMismatch("θ must have $(op.d) rows (one column per problem), got $(size(theta, 1))"))
    return size(theta, 2)
end

"""`forward(op, θ)`: y_σ(θ), an `o × batch` matrix, for θ of size `d × batch`."""
function forward(op::Op, theta::AbstractMatrix)
    batch = batch_of(op, theta)
    th = Matrix{Float32}(theta)
    out = Matrix{Float32}(undef, op.o, batch)
    call(op) do
        op.workers && return GC.@preserve th out gc_safe_forward(op.handle, pointer(th), Csize_t(batch), pointer(out),
            Ptr{Ptr{Cvoid}}(C_NULL))
        @ccall libperturbations.pert_forward(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
            C_NULL::Ptr{Ptr{Cvoid}})::UInt32
    end
    return out
end

"""`Perturbations.solve(op, x)`: y*(x), the op's solver on each column of `x` (`d × batch`)
with no noise, an `o × batch` matrix (`pert_op_solve`). Not exported: `solve` is
CommonSolve's (SciML) name, so call it qualified."""
function solve(op::Op, x::AbstractMatrix)
    batch = batch_of(op, x)
    xs = Matrix{Float32}(x)
    out = Matrix{Float32}(undef, op.o, batch)
    call(op) do
        op.workers && return GC.@preserve xs out gc_safe_solve(op.handle, pointer(xs), Csize_t(batch), pointer(out))
        @ccall libperturbations.pert_op_solve(op::Ptr{Cvoid}, xs::Ptr{Float32}, batch::Csize_t,
            out::Ptr{Float32})::UInt32
    end
    return out
end

"""`forward_with_tape(op, θ)`: y_σ(θ) and the [`Tape`](@ref) for its gradients."""
function forward_with_tape(op::Op, theta::AbstractMatrix)
    batch = batch_of(op, theta)
    th = Matrix{Float32}(theta)
    out = Matrix{Float32}(undef, op.o, batch)
    tape = Ref{Ptr{Cvoid}}(C_NULL)
    call(op) do
        op.workers && return GC.@preserve th out tape gc_safe_forward(op.handle, pointer(th), Csize_t(batch),
            pointer(out), Base.unsafe_convert(Ptr{Ptr{Cvoid}}, tape))
        @ccall libperturbations.pert_forward(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
            tape::Ref{Ptr{Cvoid}})::UInt32
    end
    return out, Tape(tape[], op.d, op.o, batch)
end

"""
    forward_with_tape(f, op, θ)

The do-block form: `forward_with_tape(op, θ) do y, tape ... end` runs `f(y, tape)` and
frees the tape when it returns (or throws); returns `f`'s value.
"""
function forward_with_tape(f::Function, op::Op, theta::AbstractMatrix)
    y, tape = forward_with_tape(op, theta)
    try
        return f(y, tape)
    finally
        free!(tape)
    end
end

"""
`fenchel_young(op, θ, y)`: the Fenchel-Young loss per problem (a vector of length batch)
of θ against targets `y` (both `d × batch`); its gradient comes with the `rrule`.
"""
fenchel_young(op::Op, theta::AbstractMatrix, y_true::AbstractMatrix) = fenchel_young_with_grad(op, theta, y_true)[1]

function fenchel_young_with_grad(op::Op, theta::AbstractMatrix, y_true::AbstractMatrix)
    batch = batch_of(op, theta)
    size(y_true) == size(theta) || throw(DimensionMismatch("y_true must be $(size(theta)), got $(size(y_true))"))
    th, yt = Matrix{Float32}(theta), Matrix{Float32}(y_true)
    loss = Vector{Float32}(undef, batch)
    grad = Matrix{Float32}(undef, op.d, batch)
    call(op) do
        op.workers && return GC.@preserve th yt loss grad gc_safe_fenchel_young(op.handle, pointer(th), pointer(yt),
            Csize_t(batch), pointer(loss), pointer(grad), Ptr{Float32}(C_NULL))
        @ccall libperturbations.pert_fenchel_young(op::Ptr{Cvoid}, th::Ptr{Float32}, yt::Ptr{Float32}, batch::Csize_t,
            loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    end
    return loss, grad
end

"""
    fenchel_young_with_bound(op, θ, y_true) -> (loss, grad, bound)

The loss and its gradient as `fenchel_young_with_grad`, and the lower bound of each
problem's loss (length batch) that the call's own draws give for an exact solver and a
feasible target: sign ⋅ ⟨mean perturbed input − θ, y_true⟩ (see
`pert_fenchel_young_with_bound`). A loss below it, beyond rounding, means the sense is
wrong, the solver is not exact, or `y_true` is not feasible.
"""
function fenchel_young_with_bound(op::Op, theta::AbstractMatrix, y_true::AbstractMatrix)
    batch = batch_of(op, theta)
    size(y_true) == size(theta) || throw(DimensionMismatch("y_true must be $(size(theta)), got $(size(y_true))"))
    th, yt = Matrix{Float32}(theta), Matrix{Float32}(y_true)
    loss = Vector{Float32}(undef, batch)
    grad = Matrix{Float32}(undef, op.d, batch)
    bound = Vector{Float32}(undef, batch)
    call(op) do
        op.workers && return GC.@preserve th yt loss grad bound gc_safe_fenchel_young(op.handle, pointer(th),
            pointer(yt), Csize_t(batch), pointer(loss), pointer(grad), pointer(bound))
        @ccall libperturbations.pert_fenchel_young_with_bound(op::Ptr{Cvoid}, th::Ptr{Float32}, yt::Ptr{Float32},
            batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32}, bound::Ptr{Float32})::UInt32
    end
    return loss, grad, bound
end

function ChainRulesCore.rrule(::typeof(forward), op::Op, theta::AbstractMatrix)
    y, tape = forward_with_tape(op, theta)
    project = ProjectTo(theta)
    function forward_pullback(ȳ)
        g = unthunk(ȳ)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent())
        return (NoTangent(), NoTangent(), project(vjp(tape, g)))
    end
    return y, forward_pullback
end

function ChainRulesCore.frule((_, _, Δθ), ::typeof(forward), op::Op, theta::AbstractMatrix)
    y, tape = forward_with_tape(op, theta)
    Δ = unthunk(Δθ)
    Δ isa AbstractZero && return y, ZeroTangent()
    return y, jvp(tape, Δ)
end

function ChainRulesCore.rrule(::typeof(fenchel_young), op::Op, theta::AbstractMatrix, y_true::AbstractMatrix)
    loss, grad = fenchel_young_with_grad(op, theta, y_true)
    project_theta, project_y = ProjectTo(theta), ProjectTo(y_true)
    # d loss / d y_true: -θ when maximizing, +θ when minimizing
    # (the library's sense: also one set through the raw config handle)
    sign = sense(op) === :maximize ? -1.0f0 : 1.0f0
    theta_value = Matrix{Float32}(theta)
    function fenchel_young_pullback(l̄)
        g = unthunk(l̄)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent(), ZeroTangent())
        per_problem = reshape(g, 1, :)
        return (NoTangent(), NoTangent(), project_theta(grad .* per_problem),
                project_y(sign .* theta_value .* per_problem))
    end
    return loss, fenchel_young_pullback
end

# ---- decision-focused methods over the exact solver ----------------------------------
# SPO+, the differentiable black box (DBB), the negative identity (NID) and the
# perturbation gradient (PG), with PyEPO's signs per sense; each needs an op whose output
# size equals its input size (a linear objective). Matrices are `d × batch`, one column per
# problem; results come per problem.

function same_size(first::AbstractMatrix, x::AbstractMatrix, name)
    size(x) == size(first) || throw(DimensionMismatch("$name must be $(size(first)), got $(size(x))"))
    return Matrix{Float32}(x)
end

"""
    spo_plus(op, ĉ, c, w, z)

The SPO+ loss per problem (a vector of length batch) of predicted costs `ĉ` against true
costs `c`, their optimal solutions `w` (all `d × batch`) and objectives `z` (length batch):
one solve per problem at `2ĉ - c` (`pert_spo_plus`). Minimizing: `-⟨q, y*(q)⟩ + 2⟨ĉ, w⟩ - z`
with gradient `2(w - y*(q))`; maximizing: the negation of the loss's terms and
`2(y*(q) - w)`. Its gradient in `ĉ` comes with the `rrule` (the other arguments have none).
"""
spo_plus(op::Op, pred::AbstractMatrix, cost::AbstractMatrix, sol::AbstractMatrix, obj::AbstractVector) =
    spo_plus_with_grad(op, pred, cost, sol, obj)[1]

"""`spo_plus_with_grad(op, ĉ, c, w, z)`: the SPO+ loss per problem and its gradient in `ĉ` (`d × batch`)."""
function spo_plus_with_grad(op::Op, pred::AbstractMatrix, cost::AbstractMatrix, sol::AbstractMatrix,
                            obj::AbstractVector)
    batch = batch_of(op, pred)
    p, c, w = Matrix{Float32}(pred), same_size(pred, cost, "true_cost"), same_size(pred, sol, "true_sol")
    length(obj) == batch || throw(DimensionMismatch("true_obj must have length $batch, got $(length(obj))"))
    z = Vector{Float32}(obj)
    loss = Vector{Float32}(undef, batch)
    grad = Matrix{Float32}(undef, op.d, batch)
    call(op) do
        op.workers && return GC.@preserve p c w z loss grad gc_safe_spo_plus(op.handle, pointer(p), pointer(c),
            pointer(w), pointer(z), Csize_t(batch), pointer(loss), pointer(grad))
        @ccall libperturbations.pert_spo_plus(op::Ptr{Cvoid}, p::Ptr{Float32}, c::Ptr{Float32}, w::Ptr{Float32},
            z::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    end
    return loss, grad
end

"""
    perturbation_gradient(op, ĉ, c, σ; two_sided=true)

The perturbation-gradient loss per problem of predicted costs `ĉ` along true costs `c`
(both `d × batch`), a finite difference of width `σ` of the optimal value that approximates
the true cost of the predicted decision (`pert_perturbation_gradient`): two solves per
problem. Its gradient in `ĉ` comes with the `rrule`.
"""
perturbation_gradient(op::Op, pred::AbstractMatrix, cost::AbstractMatrix, sigma::Real; two_sided::Bool=true) =
    perturbation_gradient_with_grad(op, pred, cost, sigma; two_sided)[1]

"""`perturbation_gradient_with_grad(op, ĉ, c, σ; two_sided=true)`: the PG loss per problem and its gradient in `ĉ`."""
function perturbation_gradient_with_grad(op::Op, pred::AbstractMatrix, cost::AbstractMatrix, sigma::Real;
                                         two_sided::Bool=true)
    batch = batch_of(op, pred)
    p, c = Matrix{Float32}(pred), same_size(pred, cost, "true_cost")
    s, two = Cdouble(sigma), Int32(two_sided)
    loss = Vector{Float32}(undef, batch)
    grad = Matrix{Float32}(undef, op.d, batch)
    call(op) do
        op.workers && return GC.@preserve p c loss grad gc_safe_perturbation_gradient(op.handle, pointer(p),
            pointer(c), Csize_t(batch), s, two, pointer(loss), pointer(grad))
        @ccall libperturbations.pert_perturbation_gradient(op::Ptr{Cvoid}, p::Ptr{Float32}, c::Ptr{Float32},
            batch::Csize_t, s::Cdouble, two::Int32, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    end
    return loss, grad
end

"""
    blackbox_vjp(op, θ, y, ȳ, λ)

The differentiable black box's gradient in `θ` (`pert_blackbox_vjp`): from `y =
Perturbations.solve(op, θ)` and the gradient `ȳ` in `y` (all `d × batch`), one solve per
problem at `θ + sλȳ`, giving `s(y*(θ + sλȳ) - y) / λ` (s = +1 minimizing, -1 maximizing).
"""
function blackbox_vjp(op::Op, theta::AbstractMatrix, y::AbstractMatrix, ybar::AbstractMatrix, lambda::Real)
    batch = batch_of(op, theta)
    th, ys, g = Matrix{Float32}(theta), same_size(theta, y, "y"), same_size(theta, ybar, "grad_output")
    l = Cdouble(lambda)
    out = Matrix{Float32}(undef, op.d, batch)
    call(op) do
        op.workers && return GC.@preserve th ys g out gc_safe_blackbox_vjp(op.handle, pointer(th), pointer(ys),
            pointer(g), Csize_t(batch), l, pointer(out))
        @ccall libperturbations.pert_blackbox_vjp(op::Ptr{Cvoid}, th::Ptr{Float32}, ys::Ptr{Float32},
            g::Ptr{Float32}, batch::Csize_t, l::Cdouble, out::Ptr{Float32})::UInt32
    end
    return out
end

"""`negative_identity_vjp(op, ȳ)`: the negative identity's gradient, `-ȳ` minimizing, `ȳ` maximizing (`pert_negative_identity_vjp`)."""
function negative_identity_vjp(op::Op, ybar::AbstractMatrix)
    batch = batch_of(op, ybar)
    g = Matrix{Float32}(ybar)
    out = Matrix{Float32}(undef, op.d, batch)
    call(op) do  # no solve: no worker runs
        @ccall libperturbations.pert_negative_identity_vjp(op::Ptr{Cvoid}, g::Ptr{Float32}, batch::Csize_t,
            out::Ptr{Float32})::UInt32
    end
    return out
end

"""`blackbox(op, θ, λ)`: y*(θ) (`Perturbations.solve`), differentiable by DBB through its `rrule` ([`blackbox_vjp`](@ref))."""
function blackbox(op::Op, theta::AbstractMatrix, lambda::Real)
    (isfinite(lambda) && lambda > 0) || throw(ArgumentError("λ must be finite and > 0, got $lambda"))
    return solve(op, theta)
end

"""`negative_identity(op, θ)`: y*(θ) (`Perturbations.solve`), differentiable by NID through its `rrule`."""
negative_identity(op::Op, theta::AbstractMatrix) = solve(op, theta)

# the losses' rules: the gradient in the predicted costs comes with the loss
function loss_pullback(grad, project, others::Int)
    function pullback(l̄)
        g = unthunk(l̄)
        rest = ntuple(_ -> @not_implemented("the losses are differentiated in the predicted costs only"), others)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent(), rest...)
        return (NoTangent(), NoTangent(), project(grad .* reshape(g, 1, :)), rest...)
    end
    return pullback
end

function ChainRulesCore.rrule(::typeof(spo_plus), op::Op, pred::AbstractMatrix, cost::AbstractMatrix,
                              sol::AbstractMatrix, obj::AbstractVector)
    loss, grad = spo_plus_with_grad(op, pred, cost, sol, obj)
    return loss, loss_pullback(grad, ProjectTo(pred), 3)
end

function ChainRulesCore.rrule(::typeof(perturbation_gradient), op::Op, pred::AbstractMatrix, cost::AbstractMatrix,
                              sigma::Real; two_sided::Bool=true)
    loss, grad = perturbation_gradient_with_grad(op, pred, cost, sigma; two_sided)
    return loss, loss_pullback(grad, ProjectTo(pred), 2)
end

function ChainRulesCore.rrule(::typeof(blackbox), op::Op, theta::AbstractMatrix, lambda::Real)
    y = blackbox(op, theta, lambda)
    project = ProjectTo(theta)
    theta_value = Matrix{Float32}(theta)
    function blackbox_pullback(ȳ)
        g = unthunk(ȳ)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent(), NoTangent())
        return (NoTangent(), NoTangent(), project(blackbox_vjp(op, theta_value, y, g, lambda)), NoTangent())
    end
    return y, blackbox_pullback
end

function ChainRulesCore.rrule(::typeof(negative_identity), op::Op, theta::AbstractMatrix)
    y = negative_identity(op, theta)
    project = ProjectTo(theta)
    function negative_identity_pullback(ȳ)
        g = unthunk(ȳ)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent())
        return (NoTangent(), NoTangent(), project(negative_identity_vjp(op, g)))
    end
    return y, negative_identity_pullback
end

# ---- I-MLE and AI-MLE ----------------------------------------------------------------

"""`imle_forward(op, θ)`: y_σ(θ) (`d × batch`, the op's noise; Sum-of-Gamma is I-MLE's) and the [`ImleRecord`](@ref) of its perturbed inputs and solutions (`pert_imle_forward`)."""
function imle_forward(op::Op, theta::AbstractMatrix)
    batch = batch_of(op, theta)
    op.d == op.o || throw(DimensionMismatch("I-MLE needs an op whose output size equals its input size"))
    th = Matrix{Float32}(theta)
    out = Matrix{Float32}(undef, op.d, batch)
    record = Ref{Ptr{Cvoid}}(C_NULL)
    call(op) do
        op.workers && return GC.@preserve th out record gc_safe_imle_forward(op.handle, pointer(th), Csize_t(batch),
            pointer(out), Base.unsafe_convert(Ptr{Ptr{Cvoid}}, record))
        @ccall libperturbations.pert_imle_forward(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
            record::Ref{Ptr{Cvoid}})::UInt32
    end
    return out, ImleRecord(record[], op.d, batch)
end

function record_grad(r::ImleRecord, ybar::AbstractMatrix)
    r.handle == C_NULL && throw(ArgumentError("the I-MLE record was freed"))
    size(ybar) == (r.d, r.batch) || throw(DimensionMismatch("grad_output must be $((r.d, r.batch)), got $(size(ybar))"))
    return Matrix{Float32}(ybar)
end

"""`imle_vjp(op, record, ȳ, λ; two_sided=false)`: I-MLE's gradient in θ (`pert_imle_vjp`): s·mean(y*(x + sλȳ) − y*(x))/λ over the forward's perturbed inputs x (s = +1 minimizing, −1 maximizing), or the central difference."""
function imle_vjp(op::Op, r::ImleRecord, ybar::AbstractMatrix, lambda::Real; two_sided::Bool=false)
    g = record_grad(r, ybar)
    out = Matrix{Float32}(undef, r.d, r.batch)
    l, two = Cdouble(lambda), Int32(two_sided)
    call(op) do
        op.workers && return GC.@preserve r g out gc_safe_imle_vjp(op.handle, r.handle, pointer(g), l, two,
            pointer(out))
        @ccall libperturbations.pert_imle_vjp(op::Ptr{Cvoid}, r::Ptr{Cvoid}, g::Ptr{Float32}, l::Cdouble, two::Int32,
            out::Ptr{Float32})::UInt32
    end
    return out
end

"""`aimle_vjp(op, record, ȳ, state::Ref{AimleState}; two_sided=false)`: AI-MLE's gradient (`pert_aimle_vjp`), λ = α‖θ‖/‖ȳ‖; `state[]` is updated."""
function aimle_vjp(op::Op, r::ImleRecord, ybar::AbstractMatrix, state::Ref{AimleState}; two_sided::Bool=false)
    g = record_grad(r, ybar)
    out = Matrix{Float32}(undef, r.d, r.batch)
    two = Int32(two_sided)
    call(op) do
        op.workers && return GC.@preserve r g out state gc_safe_aimle_vjp(op.handle, r.handle, pointer(g), two,
            Base.unsafe_convert(Ptr{AimleState}, state), pointer(out))
        @ccall libperturbations.pert_aimle_vjp(op::Ptr{Cvoid}, r::Ptr{Cvoid}, g::Ptr{Float32}, two::Int32,
            state::Ref{AimleState}, out::Ptr{Float32})::UInt32
    end
    return out
end

"""`imle(op, θ, λ; two_sided=false)`: y_σ(θ), differentiable by I-MLE through its `rrule` ([`imle_vjp`](@ref))."""
imle(op::Op, theta::AbstractMatrix, lambda::Real; two_sided::Bool=false) = forward(op, theta)

"""`aimle(op, θ, state::Ref{AimleState}; two_sided=false)`: y_σ(θ), differentiable by AI-MLE through its `rrule`; `state[]` adapts."""
aimle(op::Op, theta::AbstractMatrix, state::Ref{AimleState}; two_sided::Bool=false) = forward(op, theta)

function ChainRulesCore.rrule(::typeof(imle), op::Op, theta::AbstractMatrix, lambda::Real; two_sided::Bool=false)
    (isfinite(lambda) && lambda > 0) || throw(ArgumentError("λ must be finite and > 0, got $lambda"))
    y, record = imle_forward(op, theta)
    project = ProjectTo(theta)
    function imle_pullback(ȳ)
        g = unthunk(ȳ)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent(), NoTangent())
        return (NoTangent(), NoTangent(), project(imle_vjp(op, record, g, lambda; two_sided)), NoTangent())
    end
    return y, imle_pullback
end

function ChainRulesCore.rrule(::typeof(aimle), op::Op, theta::AbstractMatrix, state::Ref{AimleState};
                              two_sided::Bool=false)
    y, record = imle_forward(op, theta)
    project = ProjectTo(theta)
    function aimle_pullback(ȳ)
        g = unthunk(ȳ)
        g isa AbstractZero && return (NoTangent(), NoTangent(), ZeroTangent(), NoTangent())
        return (NoTangent(), NoTangent(), project(aimle_vjp(op, record, g, state; two_sided)), NoTangent())
    end
    return y, aimle_pullback
end

# ---- two-phase API -----------------------------------------------------------------

"""
    Draw(op, θ)

The perturbed inputs of one call (`inputs(draw)`, a `d × count` matrix), to be solved
anywhere; `finish(draw, solutions)` (an `o × count` matrix) gives y_σ(θ) and a tape
(`finish(draw, solutions; tape=false)`: y_σ(θ) and `nothing`, for Sum-of-Gamma noise,
which has no tape, or when no gradient is needed).
"""
mutable struct Draw
    handle::Ptr{Cvoid}
    d::Int
    o::Int
    batch::Int
    function Draw(op::Op, theta::AbstractMatrix)
        batch = batch_of(op, theta)
        th = Matrix{Float32}(theta)
        out = Ref{Ptr{Cvoid}}(C_NULL)
        call(op) do   # a draw counts as one call of the op: it takes its turn
            @ccall libperturbations.pert_draw_new(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32
        end
        return finalizer(free!, new(out[], op.d, op.o, batch))
    end
end

"""
    Draw(f, op, θ)

The do-block form: `Draw(op, θ) do draw ... end` runs `f(draw)` and frees the draw (its
perturbed inputs) when it returns or throws; returns `f`'s value.
"""
function Draw(f::Function, op::Op, theta::AbstractMatrix)
    draw = Draw(op, theta)
    try
        return f(draw)
    finally
        free!(draw)
    end
end

function free!(d::Draw)
    d.handle == C_NULL || @ccall libperturbations.pert_draw_free(d.handle::Ptr{Cvoid})::Cvoid
    d.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, d::Draw) = d.handle

draw_count(d::Draw) = Int(@ccall libperturbations.pert_draw_count(d::Ptr{Cvoid})::Csize_t)

"""`inputs(draw)`: a copy of the perturbed inputs, a `d × count` matrix."""
function inputs(d::Draw)
    # the draw owns these floats: it must stay alive (not finalized) until they are copied
    GC.@preserve d begin
        p = @ccall libperturbations.pert_draw_inputs(d::Ptr{Cvoid})::Ptr{Float32}
        p == C_NULL && throw(ArgumentError("the draw was freed"))
        return copy(unsafe_wrap(Matrix{Float32}, p, (d.d, draw_count(d))))
    end
end

function finish(d::Draw, solutions::AbstractMatrix; tape::Bool=true)
    s = Matrix{Float32}(solutions)
    size(s) == (d.o, draw_count(d)) || throw(DimensionMismatch("solutions must be $((d.o, draw_count(d))), got $(size(s))"))
    out = Matrix{Float32}(undef, d.o, d.batch)
    if !tape
        check(@ccall libperturbations.pert_draw_finish(d::Ptr{Cvoid}, s::Ptr{Float32}, out::Ptr{Float32},
            C_NULL::Ptr{Ptr{Cvoid}})::UInt32)
        return out, nothing
    end
    made = Ref{Ptr{Cvoid}}(C_NULL)
    check(@ccall libperturbations.pert_draw_finish(d::Ptr{Cvoid}, s::Ptr{Float32}, out::Ptr{Float32}, made::Ref{Ptr{Cvoid}})::UInt32)
    return out, Tape(made[], d.d, d.o, d.batch)
end

# The checked inputs (Float32 copies) and the output buffers of a draw's Fenchel-Young call.
function draw_loss_buffers(d::Draw, solutions::AbstractMatrix, y_true::AbstractMatrix)
    s = Matrix{Float32}(solutions)
    y = Matrix{Float32}(y_true)
    size(s) == (d.o, draw_count(d)) || throw(DimensionMismatch("solutions must be $((d.o, draw_count(d))), got $(size(s))"))
    size(y) == (d.d, d.batch) || throw(DimensionMismatch("y_true must be $((d.d, d.batch)), got $(size(y))"))
    return s, y, Vector{Float32}(undef, d.batch), Matrix{Float32}(undef, d.d, d.batch)
end

"""
    fenchel_young_with_grad(draw, solutions, y_true) -> (loss, grad)

The Fenchel-Young loss per problem (length batch) of the draw's θ against `y_true`
(`d × batch`) and its gradient with respect to θ (`d × batch`), from the solutions
(`o × count`, o = d): what `fenchel_young_with_grad(op, θ, y_true)` gives for the same
seed and call count (the gradient comes with the loss, as for an op).
"""
function fenchel_young_with_grad(d::Draw, solutions::AbstractMatrix, y_true::AbstractMatrix)
    s, y, loss, grad = draw_loss_buffers(d, solutions, y_true)
    check(@ccall libperturbations.pert_draw_fenchel_young(d::Ptr{Cvoid}, s::Ptr{Float32}, y::Ptr{Float32},
        loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32)
    return loss, grad
end

"""
    fenchel_young_with_bound(draw, solutions, y_true) -> (loss, grad, bound)

`fenchel_young_with_grad(draw, solutions, y_true)` and the lower bound of each problem's
loss for optimal solutions and feasible targets (see `fenchel_young_with_bound(op, ...)`).
"""
function fenchel_young_with_bound(d::Draw, solutions::AbstractMatrix, y_true::AbstractMatrix)
    s, y, loss, grad = draw_loss_buffers(d, solutions, y_true)
    bound = Vector{Float32}(undef, d.batch)
    check(@ccall libperturbations.pert_draw_fenchel_young_with_bound(d::Ptr{Cvoid}, s::Ptr{Float32},
        y::Ptr{Float32}, loss::Ptr{Float32}, grad::Ptr{Float32}, bound::Ptr{Float32})::UInt32)
    return loss, grad, bound
end

# ---- solution pools ----------------------------------------------------------------

"""
    Pool(output_shape, capacity)

A pool of at most `capacity` distinct solutions of `output_shape` (`pert_pool_new`), for
ops whose solver is expensive ([`set_pool!`](@ref)). Memory is bounded by the capacity;
first in, first out: a solution the pool holds already is not added again, and when
additions take it beyond its capacity its oldest solutions leave first. Pools may be
shared by ops and tasks; an op given a pool keeps it alive, so the `Pool` may be freed
while ops use it.
"""
mutable struct Pool
    handle::Ptr{Cvoid}
    o::Int
    lock::ReentrantLock        # close/free! waits for a call that uses the handle
    function Pool(output_shape, capacity::Integer)
        capacity >= 1 || throw(ArgumentError("a pool's capacity must be >= 1, got $capacity"))
        outs = Int64[reverse(collect(output_shape))...]    # Julia column-major = C row-major reversed
        out = Ref{Ptr{Cvoid}}(C_NULL)
        GC.@preserve outs check(@ccall libperturbations.pert_pool_new(outs::Ptr{Int64}, length(outs)::Csize_t,
            Csize_t(capacity)::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        return finalizer(release!, new(out[], prod(output_shape; init=1), ReentrantLock()))
    end
end

# The finalizer: no lock (finalizers may not wait), and no call can be running.
function release!(p::Pool)
    p.handle == C_NULL || @ccall libperturbations.pert_pool_free(p.handle::Ptr{Cvoid})::Cvoid
    p.handle = C_NULL
    return nothing
end

"""`free!(pool)`: frees the pool's handle now (ops given the pool keep it)."""
free!(p::Pool) = lock(() -> release!(p), p.lock)

# The pool's handle for a call made under its lock.
function pool_handle(p::Pool)
    p.handle == C_NULL && throw(ArgumentError("the pool was freed"))
    return p.handle
end

"""`length(pool)`: the number of solutions the pool holds now (`pert_pool_size`)."""
Base.length(p::Pool) = lock(p.lock) do
    Int(@ccall libperturbations.pert_pool_size(pool_handle(p)::Ptr{Cvoid})::Csize_t)
end

"""
    add!(pool, solutions)

Adds the columns of `solutions` (`o × count`, or any array of `o · count` values whose
columns are solutions; finite) to the pool (`pert_pool_add`): those it does not hold join
as its newest members, each once, in the order of their last occurrence; then its oldest
leave down to its capacity.
All or nothing.
"""
function add!(p::Pool, solutions::AbstractArray{<:Real})
    ys = Array{Float32}(solutions)
    length(ys) % p.o == 0 ||
        throw(DimensionMismatch("solutions must be whole columns of $(p.o) values, got $(length(ys)) values"))
    lock(p.lock) do
        GC.@preserve ys check(@ccall libperturbations.pert_pool_add(pool_handle(p)::Ptr{Cvoid}, ys::Ptr{Float32},
            Csize_t(length(ys) ÷ p.o)::Csize_t)::UInt32)
    end
    return p
end

"""
    set_pool!(op, pool)
    set_pool!(op, nothing)

Gives `op` a solution pool, or takes it away (`pert_op_set_pool`). Its forward and
Fenchel-Young calls, and I-MLE's and AI-MLE's samples (forward and backward), then answer
each perturbed sample from the pool with probability
1 − `solve_ratio` (a `Config` setting, default 1): the pool's solution y of best ⟨x, y⟩ for
the sample x in the op's sense, exact whenever the pool holds x's optimum; the others are
solved, and every solve adds its solution to the pool. The objective must be linear: a
built-in, or a solver declared with `Config(linear_objective=true)`.
"""
function set_pool!(op::Op, pool::Union{Pool,Nothing})
    refuse_own_call(op)
    lock(op.lock) do   # the op's lock, then the pool's: the order every task takes them in
        if pool === nothing
            check(@ccall libperturbations.pert_op_set_pool(op::Ptr{Cvoid}, C_NULL::Ptr{Cvoid})::UInt32)
        else
            lock(pool.lock) do
                check(@ccall libperturbations.pert_op_set_pool(op::Ptr{Cvoid}, pool_handle(pool)::Ptr{Cvoid})::UInt32)
            end
        end
    end
    return op
end

"""`solver_calls(op)`: the rows the op's solver has solved so far (`pert_op_solver_calls`)."""
function solver_calls(op::Op)
    rows = Ref{UInt64}(0)
    lock(op.lock) do   # (free! frees the handle under it)
        check(@ccall libperturbations.pert_op_solver_calls(op::Ptr{Cvoid}, rows::Ref{UInt64})::UInt32)
    end
    return rows[]
end

# ---- losses over the op's solution pool ---------------------------------------------------

# The @ccall of each pool-based loss (all of one prototype).
pool_loss_ccall(::Val{:nce}, op, p, t, batch, loss, grad) = @ccall libperturbations.pert_nce(op::Ptr{Cvoid},
    p::Ptr{Float32}, t::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
pool_loss_ccall(::Val{:cmap}, op, p, t, batch, loss, grad) = @ccall libperturbations.pert_cmap(op::Ptr{Cvoid},
    p::Ptr{Float32}, t::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
pool_loss_ccall(::Val{:ltr_pointwise}, op, p, t, batch, loss, grad) = @ccall libperturbations.pert_ltr_pointwise(
    op::Ptr{Cvoid}, p::Ptr{Float32}, t::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
pool_loss_ccall(::Val{:ltr_pairwise}, op, p, t, batch, loss, grad) = @ccall libperturbations.pert_ltr_pairwise(
    op::Ptr{Cvoid}, p::Ptr{Float32}, t::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
pool_loss_ccall(::Val{:ltr_listwise}, op, p, t, batch, loss, grad) = @ccall libperturbations.pert_ltr_listwise(
    op::Ptr{Cvoid}, p::Ptr{Float32}, t::Ptr{Float32}, batch::Csize_t, loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32

const POOL_LOSS_POINTERS = Dict(:nce => PERT_NCE, :cmap => PERT_CMAP, :ltr_pointwise => PERT_LTR_POINTWISE,
    :ltr_pairwise => PERT_LTR_PAIRWISE, :ltr_listwise => PERT_LTR_LISTWISE)

"""
    pool_loss_with_grad(op, kind, ĉ, target)

The pool-based loss `kind` (`:nce`, `:cmap`, `:ltr_pointwise`, `:ltr_pairwise`,
`:ltr_listwise`) per problem of predicted costs `ĉ` against `target` (the true solutions
for NCE and CMAP, the true costs for the LTR losses; both `d × batch`) over the op's
solution pool ([`set_pool!`](@ref)), and its gradient in `ĉ`: `pert_nce`, `pert_cmap`,
`pert_ltr_pointwise`, `pert_ltr_pairwise`, `pert_ltr_listwise` (PyEPO's NCE, CMAP, ptLTR,
prLTR, lsLTR). With probability `solve_ratio` the batch is solved first, which adds to the pool.
"""
function pool_loss_with_grad(op::Op, kind::Symbol, pred::AbstractMatrix, target::AbstractMatrix)
    haskey(POOL_LOSS_POINTERS, kind) ||
        throw(ArgumentError("unknown pool loss :$kind; one of :" * join(sort(collect(keys(POOL_LOSS_POINTERS))), ", :")))
    batch = batch_of(op, pred)
    p = Matrix{Float32}(pred)
    t = same_size(pred, target, kind in (:nce, :cmap) ? "true_sol" : "true_cost")
    loss = Vector{Float32}(undef, batch)
    grad = Matrix{Float32}(undef, op.d, batch)
    call(op) do
        op.workers && return GC.@preserve p t loss grad gc_safe_pool_loss(POOL_LOSS_POINTERS[kind], op.handle,
            pointer(p), pointer(t), Csize_t(batch), pointer(loss), pointer(grad))
        GC.@preserve p t loss grad pool_loss_ccall(Val(kind), op.handle, pointer(p), pointer(t), Csize_t(batch),
            pointer(loss), pointer(grad))
    end
    return loss, grad
end

"""`nce(op, ĉ, w)`: the NCE loss per problem over the op's pool (see [`pool_loss_with_grad`](@ref)); differentiable in `ĉ`."""
nce(op::Op, pred::AbstractMatrix, sol::AbstractMatrix) = pool_loss_with_grad(op, :nce, pred, sol)[1]
"""`cmap(op, ĉ, w)`: the CMAP loss per problem over the op's pool; differentiable in `ĉ`."""
cmap(op::Op, pred::AbstractMatrix, sol::AbstractMatrix) = pool_loss_with_grad(op, :cmap, pred, sol)[1]
"""`ltr_pointwise(op, ĉ, c)`: the pointwise learning-to-rank loss per problem over the op's pool."""
ltr_pointwise(op::Op, pred::AbstractMatrix, cost::AbstractMatrix) = pool_loss_with_grad(op, :ltr_pointwise, pred, cost)[1]
"""`ltr_pairwise(op, ĉ, c)`: the pairwise learning-to-rank loss per problem over the op's pool."""
ltr_pairwise(op::Op, pred::AbstractMatrix, cost::AbstractMatrix) = pool_loss_with_grad(op, :ltr_pairwise, pred, cost)[1]
"""`ltr_listwise(op, ĉ, c)`: the listwise learning-to-rank loss per problem over the op's pool."""
ltr_listwise(op::Op, pred::AbstractMatrix, cost::AbstractMatrix) = pool_loss_with_grad(op, :ltr_listwise, pred, cost)[1]

function ChainRulesCore.rrule(::typeof(nce), op::Op, pred::AbstractMatrix, sol::AbstractMatrix)
    loss, grad = pool_loss_with_grad(op, :nce, pred, sol)
    return loss, loss_pullback(grad, ProjectTo(pred), 1)
end

function ChainRulesCore.rrule(::typeof(cmap), op::Op, pred::AbstractMatrix, sol::AbstractMatrix)
    loss, grad = pool_loss_with_grad(op, :cmap, pred, sol)
    return loss, loss_pullback(grad, ProjectTo(pred), 1)
end

function ChainRulesCore.rrule(::typeof(ltr_pointwise), op::Op, pred::AbstractMatrix, cost::AbstractMatrix)
    loss, grad = pool_loss_with_grad(op, :ltr_pointwise, pred, cost)
    return loss, loss_pullback(grad, ProjectTo(pred), 1)
end

function ChainRulesCore.rrule(::typeof(ltr_pairwise), op::Op, pred::AbstractMatrix, cost::AbstractMatrix)
    loss, grad = pool_loss_with_grad(op, :ltr_pairwise, pred, cost)
    return loss, loss_pullback(grad, ProjectTo(pred), 1)
end

function ChainRulesCore.rrule(::typeof(ltr_listwise), op::Op, pred::AbstractMatrix, cost::AbstractMatrix)
    loss, grad = pool_loss_with_grad(op, :ltr_listwise, pred, cost)
    return loss, loss_pullback(grad, ProjectTo(pred), 1)
end

# ---- ownership ---------------------------------------------------------------------

const Handle = Union{Config, Op, Tape, Draw, ImleRecord, Pool}

"""
    close(x)

Frees the library memory of a handle (`Config`, `Op`, `Tape`, `Draw`, `ImleRecord`, `Pool`) now, instead of when
the garbage collector finalizes it; the same as `free!(x)`. Using a freed handle is an
error (PERT_STATUS_NULL_ARGUMENT); freeing twice is harmless.
"""
Base.close(x::Handle) = free!(x)

# A copy would share the C handle (freed twice, or a callback state freed under it).
Base.deepcopy_internal(x::Handle, ::IdDict) =
    throw(ArgumentError("a $(nameof(typeof(x))) owns a handle of the library and cannot be copied; make a new one"))

end # module
