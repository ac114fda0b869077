"""
    Perturbations

Differentiable perturbed optimizers (Berthet et al., NeurIPS 2020) through the C API of
libperturbations. A solver is any Julia function taking a `d × count` `Matrix{Float32}`
of perturbed problems (one column per problem) and returning their `o × count`
solutions. `forward(op, θ)` gives y_σ(θ) for a `d × batch` matrix θ; `rrule`s make
`forward` and `fenchel_young` differentiable with Zygote/Flux.

The library is `ENV["PERTURBATIONS_LIB"]` when set, else the build tree's
`target/release/libperturbations.so`.
"""
module Perturbations

using ChainRulesCore
using Libdl

export Config, Op, Tape, Draw, PerturbationsError
export forward, forward_with_tape, vjp, jvp, jacobian, objective, fenchel_young, inputs, finish
export NOISE_NORMAL, NOISE_GUMBEL, PERTURBATION_ADDITIVE, PERTURBATION_MULTIPLICATIVE
export BASELINE_NONE, BASELINE_SAMPLE_MEAN, BASELINE_CLEAN_INPUT, SENSE_MAXIMIZE, SENSE_MINIMIZE
export BUILTIN_ARGMAX, BUILTIN_TOPK, BUILTIN_RANKS

const libperturbations = get(ENV, "PERTURBATIONS_LIB",
    normpath(joinpath(@__DIR__, "..", "..", "..", "..", "target", "release", "libperturbations.so")))

const NOISE_NORMAL = UInt32(0)
const NOISE_GUMBEL = UInt32(1)
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

"""An error of the library: its status number, the status name and the message."""
struct PerturbationsError <: Exception
    status::UInt32
    name::String
    message::String
end

Base.showerror(io::IO, e::PerturbationsError) = print(io, e.name, ": ", e.message)

version() = unsafe_string(@ccall libperturbations.pert_version()::Cstring)
status_name(status::UInt32) = unsafe_string(@ccall libperturbations.pert_status_name(status::UInt32)::Cstring)
cuda_device_count() = Int(@ccall libperturbations.pert_cuda_device_count()::Int32)

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
    Config(; num_samples, sigma, noise, seed, device, threads, perturbation, baseline,
             antithetic, sense, chunk_bytes, max_tape_bytes)

Settings for ops; an op copies them when it is made. Unset keywords keep the library's
defaults (1000 samples, σ 0.05, Normal noise, seed 0, device "auto", 1 thread, ...).
"""
mutable struct Config
    handle::Ptr{Cvoid}
    threads::UInt32
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
set!(c::Config, ::Val{:seed}, v) = check(@ccall libperturbations.pert_config_set_seed(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:device}, v::AbstractString) = check(@ccall libperturbations.pert_config_set_device(c::Ptr{Cvoid}, v::Cstring)::UInt32)
function set!(c::Config, ::Val{:threads}, v)
    check(@ccall libperturbations.pert_config_set_threads(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
    c.threads = UInt32(v)
end
set!(c::Config, ::Val{:perturbation}, v) = check(@ccall libperturbations.pert_config_set_perturbation(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:baseline}, v) = check(@ccall libperturbations.pert_config_set_baseline(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:antithetic}, v) = check(@ccall libperturbations.pert_config_set_antithetic(c::Ptr{Cvoid}, Bool(v)::Bool)::UInt32)
set!(c::Config, ::Val{:sense}, v) = check(@ccall libperturbations.pert_config_set_sense(c::Ptr{Cvoid}, UInt32(v)::UInt32)::UInt32)
set!(c::Config, ::Val{:chunk_bytes}, v) = check(@ccall libperturbations.pert_config_set_chunk_bytes(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(c::Config, ::Val{:max_tape_bytes}, v) = check(@ccall libperturbations.pert_config_set_max_tape_bytes(c::Ptr{Cvoid}, UInt64(v)::UInt64)::UInt32)
set!(::Config, ::Val{K}, _) where {K} = throw(ArgumentError("unknown Config setting $K"))

# ---- Tape --------------------------------------------------------------------------

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
    Op(config, builtin; k, input_shape)      # a built-in solver (BUILTIN_ARGMAX, ...)
    Op(config, input_shape, output_shape; external=true)   # solved elsewhere (see Draw)

A perturbed optimizer. `solver(x::Matrix{Float32})` receives `d × count` perturbed
problems and returns `o × count` solutions; it runs on the calling thread (the config
must have `threads = 1`). Its exceptions are rethrown by the call that ran it.
"""
mutable struct Op
    handle::Ptr{Cvoid}
    solver::Any
    error::Any
    d::Int
    o::Int
    function Op(solver, config::Config, input_shape, output_shape)
        config.threads == 1 || throw(ArgumentError("Julia solvers run on one thread: the config must have threads = 1"))
        op = new(C_NULL, solver, nothing, prod(input_shape; init=1), prod(output_shape; init=1))
        ins = Int64[reverse(collect(input_shape))...]    # Julia column-major = C row-major reversed
        outs = Int64[reverse(collect(output_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        GC.@preserve ins outs begin
            check(@ccall libperturbations.pert_op_new(config::Ptr{Cvoid}, ins::Ptr{Int64}, length(ins)::Csize_t,
                outs::Ptr{Int64}, length(outs)::Csize_t, TRAMPOLINE[]::Ptr{Cvoid},
                pointer_from_objref(op)::Ptr{Cvoid}, out::Ref{Ptr{Cvoid}})::UInt32)
        end
        op.handle = out[]
        return finalizer(free!, op)
    end
    function Op(config::Config, input_shape, output_shape; external::Bool)
        external || throw(ArgumentError("give a solver, or external=true for the two-phase API"))
        ins = Int64[reverse(collect(input_shape))...]
        outs = Int64[reverse(collect(output_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(@ccall libperturbations.pert_op_new_external(config::Ptr{Cvoid}, ins::Ptr{Int64}, length(ins)::Csize_t,
            outs::Ptr{Int64}, length(outs)::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        return finalizer(free!, new(out[], nothing, nothing, prod(input_shape; init=1), prod(output_shape; init=1)))
    end
    function Op(config::Config, builtin::UInt32; input_shape, k::Integer=0)
        ins = Int64[reverse(collect(input_shape))...]
        out = Ref{Ptr{Cvoid}}(C_NULL)
        check(@ccall libperturbations.pert_op_new_builtin(config::Ptr{Cvoid}, builtin::UInt32, Int64(k)::Int64,
            ins::Ptr{Int64}, length(ins)::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        n = prod(input_shape; init=1)
        return finalizer(free!, new(out[], nothing, nothing, n, n))
    end
end

function free!(op::Op)
    op.handle == C_NULL || @ccall libperturbations.pert_op_free(op.handle::Ptr{Cvoid})::Cvoid
    op.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, op::Op) = op.handle

"""Elements of one problem's input and output, as the library reports them."""
input_numel(op::Op) = Int(@ccall libperturbations.pert_op_input_numel(op::Ptr{Cvoid})::Csize_t)
output_numel(op::Op) = Int(@ccall libperturbations.pert_op_output_numel(op::Ptr{Cvoid})::Csize_t)

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
        return Int32(1)
    end
end

const TRAMPOLINE = Ref{Ptr{Cvoid}}(C_NULL)

function __init__()
    TRAMPOLINE[] = @cfunction(trampoline, Int32, (Ptr{Cvoid}, Ptr{Float32}, Csize_t, Ptr{Float32}))
    return nothing
end

# Runs a C call on `op`, rethrowing the solver's exception if it raised one.
function call(f, op::Op)
    op.error = nothing
    status = GC.@preserve op f()
    if op.error !== nothing
        err, op.error = op.error, nothing
        throw(err.ex)
    end
    check(status)
    return nothing
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
        @ccall libperturbations.pert_forward(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
            C_NULL::Ptr{Ptr{Cvoid}})::UInt32
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
        @ccall libperturbations.pert_forward(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ptr{Float32},
            tape::Ref{Ptr{Cvoid}})::UInt32
    end
    return out, Tape(tape[], op.d, op.o, batch)
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
        @ccall libperturbations.pert_fenchel_young(op::Ptr{Cvoid}, th::Ptr{Float32}, yt::Ptr{Float32}, batch::Csize_t,
            loss::Ptr{Float32}, grad::Ptr{Float32})::UInt32
    end
    return loss, grad
end

function ChainRulesCore.rrule(::typeof(forward), op::Op, theta::AbstractMatrix)
    y, tape = forward_with_tape(op, theta)
    forward_pullback(ȳ) = (NoTangent(), NoTangent(), vjp(tape, unthunk(ȳ)))
    return y, forward_pullback
end

function ChainRulesCore.rrule(::typeof(fenchel_young), op::Op, theta::AbstractMatrix, y_true::AbstractMatrix)
    loss, grad = fenchel_young_with_grad(op, theta, y_true)
    fenchel_young_pullback(l̄) = (NoTangent(), NoTangent(), grad .* reshape(unthunk(l̄), 1, :), NoTangent())
    return loss, fenchel_young_pullback
end

# ---- two-phase API -----------------------------------------------------------------

"""
    Draw(op, θ)

The perturbed inputs of one call (`inputs(draw)`, a `d × count` matrix), to be solved
anywhere; `finish(draw, solutions)` (an `o × count` matrix) gives y_σ(θ) and a tape.
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
        check(@ccall libperturbations.pert_draw_new(op::Ptr{Cvoid}, th::Ptr{Float32}, batch::Csize_t, out::Ref{Ptr{Cvoid}})::UInt32)
        return finalizer(free!, new(out[], op.d, op.o, batch))
    end
end

function free!(d::Draw)
    d.handle == C_NULL || @ccall libperturbations.pert_draw_free(d.handle::Ptr{Cvoid})::Cvoid
    d.handle = C_NULL
    return nothing
end

Base.unsafe_convert(::Type{Ptr{Cvoid}}, d::Draw) = d.handle

draw_count(d::Draw) = Int(@ccall libperturbations.pert_draw_count(d::Ptr{Cvoid})::Csize_t)

function inputs(d::Draw)
    p = @ccall libperturbations.pert_draw_inputs(d::Ptr{Cvoid})::Ptr{Float32}
    return copy(unsafe_wrap(Matrix{Float32}, p, (d.d, draw_count(d))))
end

function finish(d::Draw, solutions::AbstractMatrix)
    s = Matrix{Float32}(solutions)
    size(s) == (d.o, draw_count(d)) || throw(DimensionMismatch("solutions must be $((d.o, draw_count(d))), got $(size(s))"))
    out = Matrix{Float32}(undef, d.o, d.batch)
    tape = Ref{Ptr{Cvoid}}(C_NULL)
    check(@ccall libperturbations.pert_draw_finish(d::Ptr{Cvoid}, s::Ptr{Float32}, out::Ptr{Float32}, tape::Ref{Ptr{Cvoid}})::UInt32)
    return out, Tape(tape[], d.d, d.o, d.batch)
end

end # module
