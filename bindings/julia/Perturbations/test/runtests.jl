# Mirrors the C harness: closed forms, errors, a throwing solver, finalizers, rrules.
using Test
using Perturbations
using Zygote

const P = Perturbations

function argmax_solver(x::Matrix{Float32})
    y = zeros(Float32, size(x))
    for j in axes(x, 2)
        y[argmax(view(x, :, j)), j] = 1
    end
    return y
end

softmax(v) = exp.(v) ./ sum(exp.(v))

struct Infeasible <: Exception
    code::Int
end

@testset "Perturbations" begin
    @testset "version and statuses" begin
        @test P.version() == "0.1.0"
        @test P.status_name(UInt32(1)) == "PERT_STATUS_NULL_ARGUMENT"
        @test P.status_name(UInt32(99)) == "PERT_STATUS_UNKNOWN"
        @test P.cuda_device_count() >= 0
    end

    @testset "config errors" begin
        err = try
            Config(sigma=-1)
        catch e
            e
        end
        @test err isa PerturbationsError
        @test err.status == 2
        @test err.message == "sigma must be finite and > 0, got -1"
        @test_throws PerturbationsError Config(device="gpu")
        @test_throws ArgumentError Config(colour=1)
        @test_throws ArgumentError Op(argmax_solver, Config(threads=2), (3,), (3,))
    end

    @testset "Gumbel argmax is softmax" begin
        n = 100_000
        σ = 0.5
        op = Op(argmax_solver, Config(num_samples=n, sigma=σ, noise=NOISE_GUMBEL, seed=1, device="cpu"), (5,), (5,))
        θ = Float32[-0.6 -0.6; 1.9 1.0; -0.2 -0.2; 1.1 1.8; -1.0 -1.0]   # 5 × 2: columns are problems
        y, tape = forward_with_tape(op, θ)
        for b in 1:2
            p = softmax(θ[:, b] ./ σ)
            @test all(abs.(y[:, b] .- p) .<= 5 .* sqrt.(p .* (1 .- p) ./ n) .+ 1e-6)
            J = jacobian(tape)[:, :, b]
            Jexact = ((p .* (1:5 .== (1:5)')) .- p * p') ./ σ
            @test maximum(abs.(J .- Jexact)) < 5 / (σ * sqrt(n))
        end
        g = Float32[1 0; 0 1; 0 0; 0 0; 0 0]
        @test vjp(tape, g) ≈ hcat(jacobian(tape)[:, :, 1]' * g[:, 1], jacobian(tape)[:, :, 2]' * g[:, 2]) atol = 1e-5
        @test jvp(tape, g) ≈ hcat(jacobian(tape)[:, :, 1] * g[:, 1], jacobian(tape)[:, :, 2] * g[:, 2]) atol = 1e-5
        @test length(objective(tape)) == 2
        @test P.batch(tape) == 2
    end

    @testset "the Fenchel-Young bound catches a wrong sense; interrupt!" begin
        θ = Float32[-0.6 -0.6; 1.9 1.0; -0.2 -0.2; 1.1 1.8; -1.0 -1.0]
        target = Float32[0 0; 1 0; 0 0; 0 1; 0 0]
        right = Op(argmax_solver, Config(num_samples=500, sigma=0.5, seed=2, device="cpu"), (5,), (5,))
        loss, grad, bound = fenchel_young_with_bound(right, θ, target)
        @test all(loss .>= bound .- 1f-4)
        @test grad ≈ P.fenchel_young_with_grad(Op(argmax_solver, Config(num_samples=500, sigma=0.5, seed=2,
            device="cpu"), (5,), (5,)), θ, target)[2]
        argmin_solver(x) = argmax_solver(-x)
        wrong = Op(argmin_solver, Config(num_samples=500, sigma=0.5, seed=2, device="cpu"), (5,), (5,))
        loss, _, bound = fenchel_young_with_bound(wrong, θ, target)
        @test all(loss .< bound .- 0.1f0)
        interrupt!(right)   # no call runs: nothing happens, later calls are not affected
        @test size(forward(right, θ)) == (5, 2)
    end

    @testset "decision-focused methods (the C harness's hand-computed values)" begin
        argmin_solver(x) = argmax_solver(-x)
        op = Op(argmin_solver, Config(sense=SENSE_MINIMIZE, device="cpu"), (3,), (3,))
        # SPO+: problem 1 has q = 2ĉ - c = (5, 0, 1): loss 5, grad 2(e1 - e2); problem 2 is at the truth
        ĉ = Float32[3 0.5; 1 -1; 2 2]
        c = Float32[1 0.5; 2 -1; 3 2]
        w = Float32[1 0; 0 1; 0 0]
        loss, grad = spo_plus_with_grad(op, ĉ, c, w, Float32[1, -1])
        @test loss == Float32[5, 0]
        @test grad == Float32[2 0; -2 0; 0 0]
        @test Zygote.gradient(p -> sum(spo_plus(op, p, c, w, Float32[1, -1])), ĉ)[1] == grad
        # DBB: y*(1, 2, 3) = e1; backward at θ + 1.5 ȳ = (2.5, 2, 3): e2
        θ = reshape(Float32[1, 2, 3], 3, 1)
        ȳ = reshape(Float32[1, 0, 0], 3, 1)
        @test blackbox(op, θ, 1.5) == reshape(Float32[1, 0, 0], 3, 1)
        @test Zygote.gradient(t -> sum(blackbox(op, t, 1.5) .* ȳ), θ)[1] == reshape(Float32[-1 / 1.5f0, 1 / 1.5f0, 0], 3, 1)
        @test Zygote.gradient(t -> sum(negative_identity(op, t) .* ȳ), θ)[1] == -ȳ
        @test_throws ArgumentError blackbox(op, θ, 0)
        # PG: (ĉ ± c) = (4, 3, 5) -> e2, (-2, 1, 1) -> e1: loss 2.5, grad (e2 - e1) / 2
        pg, pg_grad = perturbation_gradient_with_grad(op, θ, reshape(Float32[3, 1, 2], 3, 1), 1.0)
        @test pg == Float32[2.5] && pg_grad == reshape(Float32[-0.5, 0.5, 0], 3, 1)
        @test perturbation_gradient(op, θ, reshape(Float32[3, 1, 2], 3, 1), 1.0; two_sided=false) == Float32[3]
        @test_throws PerturbationsError perturbation_gradient(op, θ, θ, -1.0)
        # I-MLE: forward is the perturbed mean; its gradient is imle_vjp's on the same record
        sog = Op(argmin_solver, Config(sense=SENSE_MINIMIZE, noise=:sum_of_gamma, num_samples=16, device="cpu"), (3,), (3,))
        y, record = imle_forward(sog, θ)
        @test sum(y) ≈ 1 && P.batch(record) == 1
        @test size(imle_vjp(sog, record, ȳ, 2.0)) == (3, 1)
        state = Ref(AimleState())
        @test state[].alpha == 1.0
        aimle_vjp(sog, record, ȳ, state)
        @test state[].alpha != 1.0
        @test size(Zygote.gradient(t -> sum(imle(sog, t, 2.0) .* ȳ), θ)[1]) == (3, 1)
    end

    @testset "built-in solver and two-phase API" begin
        config = Config(num_samples=2000, sigma=0.5, noise=NOISE_GUMBEL, device="cpu")
        builtin = Op(config, BUILTIN_ARGMAX; input_shape=(3,))
        callback = Op(argmax_solver, config, (3,), (3,))
        θ = Float32[0.5, 1.0, 0.2][:, :]
        @test forward(builtin, θ) ≈ forward(callback, θ) atol = 1e-6
        twin = Op(config, (3,), (3,); external=true)
        @test P.input_numel(twin) == 3 && P.output_numel(twin) == 3
        @test_throws PerturbationsError forward(twin, θ)
        draw = Draw(twin, θ)
        y_two, _ = finish(draw, argmax_solver(inputs(draw)))
        @test y_two == forward(Op(argmax_solver, config, (3,), (3,)), θ)
        # the two-phase Fenchel-Young loss equals a callback op's for the same draws
        target = Float32[0, 1, 0][:, :]
        fy_draw = Draw(Op(config, (3,), (3,); external=true), θ)
        loss_two, grad_two = P.fenchel_young_with_grad(fy_draw, argmax_solver(inputs(fy_draw)), target)
        loss_cb, grad_cb = P.fenchel_young_with_grad(Op(argmax_solver, config, (3,), (3,)), θ, target)
        @test loss_two == loss_cb && grad_two == grad_cb
        # Sum-of-Gamma noise has no tape: its draws are finished with tape=false
        sog = Config(num_samples=200, sigma=0.5, noise=NOISE_SUM_OF_GAMMA, device="cpu")
        sog_draw = Draw(Op(sog, (3,), (3,); external=true), θ)
        @test_throws PerturbationsError finish(sog_draw, argmax_solver(inputs(sog_draw)))
        y_sog, no_tape = finish(sog_draw, argmax_solver(inputs(sog_draw)); tape=false)
        @test no_tape === nothing && y_sog == forward(Op(argmax_solver, sog, (3,), (3,)), θ)
    end

    @testset "solvers with info on the op's persistent workers" begin
        config = Config(num_samples=50, sigma=0.5, device="cpu", threads=2, seed=3)
        counts = Threads.SpinLock()
        inits, finis, rows, bad_info = zeros(Int, 2), zeros(Int, 2), Ref(0), Ref(0)
        function solve(info::SolveInfo, x)
            lock(counts)
            rows[] += size(x, 2)
            (info.num_samples == 50 && info.batch == 2 && info.worker < 2) || (bad_info[] += 1)
            unlock(counts)
            return argmax_solver(x)
        end
        op = Op(solve, config, (3,), (3,); info=true,
            init = w -> (lock(counts); inits[w+1] += 1; unlock(counts)),
            fini = w -> (lock(counts); finis[w+1] += 1; unlock(counts)))
        θ = Float32[0.5 0.1; 1.0 0.2; 0.2 0.9]
        for _ in 1:3
            forward(op, θ)
        end
        @test rows[] == 3 * 2 * 50 && bad_info[] == 0
        @test all(inits .<= 1) && sum(inits) >= 1      # once per worker over three calls
        free!(op)
        @test finis == inits                           # at free, for each worker whose init ran
        plain = Op(argmax_solver, Config(num_samples=50, sigma=0.5, device="cpu", seed=3), (3,), (3,))
        twin = Op(solve, config, (3,), (3,); info=true)
        @test forward(twin, θ) == forward(plain, θ)    # the same draws, bit for bit
        failing = Op((info, x) -> error("no path"), config, (3,), (3,); info=true)
        @test_throws ErrorException forward(failing, θ)
        @test_throws ArgumentError Op(solve, config, (3,), (3,); init = w -> nothing)
        # a hook or solver calling its own op is refused (it would wait for itself)
        selfish = Ref{Any}(nothing)
        selfish[] = Op((info, x) -> (forward(selfish[], x); argmax_solver(x)), config, (3,), (3,); info=true)
        @test_throws ArgumentError forward(selfish[], θ)
        # an op with info left to the garbage collector runs its fini hooks (from a task)
        collected = Threads.Atomic{Int}(0)
        let op = Op(solve, config, (3,), (3,); info=true, init = w -> nothing, fini = w -> Threads.atomic_add!(collected, 1))
            forward(op, θ)
        end
        for _ in 1:50
            GC.gc(); yield()
            collected[] > 0 && break
            sleep(0.05)
        end
        @test collected[] >= 1
    end

    @testset "a device solver on a CPU op" begin
        config = Config(num_samples=20_000, sigma=0.5, noise=NOISE_GUMBEL, device="cpu", seed=2)
        function on_device(info::SolveInfo, x::Ptr{Float32}, count::Int, y::Ptr{Float32}, stream::Ptr{Cvoid})
            @assert stream == C_NULL  # a CPU op: host memory, no stream
            unsafe_wrap(Matrix{Float32}, y, (3, count)) .= argmax_solver(unsafe_wrap(Matrix{Float32}, x, (3, count)))
            return nothing
        end
        op = Op(on_device, config, (3,), (3,); device=true)
        θ = Float32[0.5 1.0 0.2]'
        p = exp.(θ ./ 0.5) ./ sum(exp.(θ ./ 0.5))
        @test all(abs.(forward(op, θ) .- p) .<= 5 .* sqrt.(p .* (1 .- p) ./ 20_000))
    end

    @testset "errors and a throwing solver" begin
        op = Op(argmax_solver, Config(num_samples=10, device="cpu"), (3,), (3,))
        @test_throws DimensionMismatch forward(op, zeros(Float32, 4, 1))
        err = try
            forward(op, Float32[1, NaN, 0][:, :])
        catch e
            e
        end
        @test err isa PerturbationsError && err.status == 3
        bad = Op(x -> throw(Infeasible(7)), Config(num_samples=10, device="cpu"), (3,), (3,))
        thrown = try
            forward(bad, zeros(Float32, 3, 1))
        catch e
            e
        end
        @test thrown isa Infeasible && thrown.code == 7   # the solver's own exception
        @test size(forward(op, zeros(Float32, 3, 2))) == (3, 2)   # the library keeps working
        # a solver cannot free its own op while its call runs (the call would go on with a
        # freed handle); the op stays usable
        holder = Ref{Any}(nothing)
        selfish = Op(x -> (free!(holder[]); argmax_solver(x)), Config(num_samples=10, device="cpu"), (3,), (3,))
        holder[] = selfish
        freed = try
            forward(selfish, zeros(Float32, 3, 1))
        catch e
            e
        end
        @test freed isa ArgumentError && occursin("cannot free its own op", freed.msg)
        @test selfish.handle != C_NULL
    end

    @testset "rrules: Zygote through forward and the Fenchel-Young loss" begin
        config = Config(num_samples=5000, sigma=0.5, noise=NOISE_GUMBEL, seed=3, device="cpu")
        op = Op(argmax_solver, config, (3,), (3,))
        twin = Op(argmax_solver, config, (3,), (3,))
        θ = Float32[0.3 0.1; -0.2 0.5; 0.9 0.5]
        g = Float32[1 0; -1 2; 0.5 -0.5]
        grad = Zygote.gradient(t -> sum(forward(op, t) .* g), θ)[1]
        _, tape = forward_with_tape(twin, θ)
        @test grad ≈ vjp(tape, g) atol = 1e-5
        y = Float32[0 1; 0 0; 1 0]
        grad_fy = Zygote.gradient(t -> sum(fenchel_young(op, t, y)), θ)[1]
        @test grad_fy ≈ forward(twin, θ) .- y atol = 1e-5
    end

    @testset "the library is resolved at load time" begin
        @test P.libperturbations == P.find_library()
        withenv("PERTURBATIONS_LIB" => "/elsewhere/libperturbations.so") do
            @test P.find_library() == "/elsewhere/libperturbations.so"
        end
        @test P.LIBRARY_VERSION == Tuple(parse.(Int, split(P.version(), ".")[1:2]))
    end

    @testset "symbols, batch 0, copies and early frees" begin
        config = Config(num_samples=100, sigma=0.5, noise=:gumbel, device=:cpu, baseline=:clean_input, sense=:minimize)
        @test_throws ArgumentError Config(noise=:cauchy)
        op = Op(argmax_solver, config, (3,), (3,))
        @test P.sense(op) == :minimize
        y, tape = forward_with_tape(op, zeros(Float32, 3, 0))
        @test size(y) == (3, 0) && P.batch(tape) == 0
        @test size(vjp(tape, zeros(Float32, 3, 0))) == (3, 0)
        @test_throws ArgumentError deepcopy(op)
        @test_throws ArgumentError deepcopy(tape)
        @test_throws ArgumentError deepcopy(config)
        close(tape)
        @test tape.handle == C_NULL
        @test_throws PerturbationsError vjp(tape, zeros(Float32, 3, 0))
        n = forward_with_tape(op, ones(Float32, 3, 2)) do y, tape
            @test tape.handle != C_NULL
            size(vjp(tape, y), 2)
        end
        @test n == 2
        copied = Draw(op, ones(Float32, 3, 1)) do draw
            GC.gc(true)
            inputs(draw)
        end
        @test size(copied, 1) == 3
    end

    @testset "rules: zero cotangents, projection, the target's tangent, frule" begin
        config = Config(num_samples=2000, sigma=0.5, noise=NOISE_GUMBEL, seed=5, device="cpu")
        op = Op(argmax_solver, config, (3,), (3,))
        θ = [0.3 0.1; -0.2 0.5; 0.9 0.5]                       # Float64
        y, back = P.ChainRulesCore.rrule(forward, op, θ)
        @test back(P.ChainRulesCore.ZeroTangent())[3] isa P.ChainRulesCore.AbstractZero
        @test eltype(back(ones(Float32, 3, 2))[3]) == Float64   # projected onto θ's type
        _, ẏ = P.ChainRulesCore.frule((nothing, nothing, ones(3, 2)), forward, op, θ)
        @test size(ẏ) == (3, 2)
        target = Float32[0 1; 0 0; 1 0]
        for (sense, sign) in ((:maximize, -1), (:minimize, 1))
            fy = Op(argmax_solver, Config(num_samples=100, sigma=0.5, device="cpu", sense=sense), (3,), (3,))
            _, pull = P.ChainRulesCore.rrule(fenchel_young, fy, θ, target)
            ȳ = pull([1.0, 2.0])[4]
            @test ȳ ≈ sign .* θ .* [1.0 2.0]
        end
    end

    @testset "an op from several tasks; errors stay with their call" begin
        good = Op(argmax_solver, Config(num_samples=200, device="cpu"), (3,), (3,))
        flaky = Op(x -> (x[1, 1] > 100 ? throw(Infeasible(1)) : argmax_solver(x)), Config(num_samples=50, device="cpu"), (3,), (3,))
        results = Vector{Any}(undef, 16)
        @sync for i in 1:16
            Threads.@spawn begin
                θ = i % 2 == 0 ? fill(1000.0f0, 3, 1) : zeros(Float32, 3, 1)
                results[i] = try
                    forward(flaky, θ)
                catch e
                    e
                end
            end
        end
        for i in 1:16
            @test (i % 2 == 0) == (results[i] isa Infeasible)
        end
        @test size(forward(good, zeros(Float32, 3, 1))) == (3, 1)
        # the solver's backtrace stays on the exception stack
        stack = try
            forward(flaky, fill(1000.0f0, 3, 1))
        catch
            current_exceptions()
        end
        @test any(e -> e.exception isa CapturedException, stack)
        @test stack[end].exception isa Infeasible
    end

    @testset "a plain solver that yields resumes on its thread" begin
        # I/O and sleep inside the solver yield the task; the library's frames are on this
        # OS thread, so the task must come back to it
        threads_seen = Int[]
        function yielding(x)
            push!(threads_seen, Threads.threadid())
            sleep(0.001)
            push!(threads_seen, Threads.threadid())
            return argmax_solver(x)
        end
        op = Op(yielding, Config(num_samples=20, sigma=0.5, device="cpu", seed=1), (3,), (3,))
        other = Threads.@spawn (for _ in 1:200; yield(); end)   # something else to run meanwhile
        t = Threads.@spawn forward(op, Float32[0.5 0.1; 1.0 0.2; 0.2 0.9])
        @test size(fetch(t)) == (3, 2)
        wait(other)
        @test !isempty(threads_seen) && all(==(threads_seen[1]), threads_seen)
        # the caller's own stickiness is put back after a call
        sticky_before = current_task().sticky
        forward(op, Float32[0.5; 1.0; 0.2;;])
        @test current_task().sticky == sticky_before
    end

    @testset "solution pools: a full pool answers as the solver, growth, counts, errors" begin
        eye = Float32[1 0 0; 0 1 0; 0 0 1]
        full(ratio) = Op(argmax_solver, Config(num_samples=400, sigma=0.7, seed=5, device="cpu",
            solve_ratio=ratio, linear_objective=true), (3,), (3,))
        solved, cached = full(1.0), full(0.3)
        p1, p2 = add!(Pool((3,), 100), eye), add!(Pool((3,), 100), eye)
        @test length(p1) == 3
        set_pool!(solved, p1); set_pool!(cached, p2)
        θ = Float32[0.5 1.2; 1.0 -0.3; 0.2 0.4]
        @test forward(solved, θ) == forward(cached, θ)          # bit for bit
        @test solver_calls(solved) == 800 && solver_calls(cached) < 400
        grow = full(0.5)
        pool = Pool((3,), 2)
        set_pool!(grow, pool)
        forward(grow, θ)
        @test solver_calls(grow) == 800 && length(pool) == 2   # capacity bounds it
        close(pool)                                             # the op keeps its own
        forward(grow, θ)
        set_pool!(grow, nothing)
        @test_throws ArgumentError set_pool!(grow, pool)        # a freed pool
        @test_throws PerturbationsError Config(solve_ratio=-0.5)
        @test_throws PerturbationsError set_pool!(Op(argmax_solver, Config(device="cpu"), (3,), (3,)), p1)
        @test_throws PerturbationsError set_pool!(solved, Pool((4,), 3))
        @test_throws PerturbationsError add!(p1, Float32[NaN, 0, 1])
        @test_throws DimensionMismatch add!(p1, Float32[1, 0])
        @test length(p1) == 3
        # the pool losses: NCE by hand (pool e1, e2, e3; ĉ = θ's first column; w* = e2)
        w = Float32[0 0; 1 1; 0 0]
        @test nce(solved, θ, w)[1] ≈ -(1.0 - (0.5 + 1.0 + 0.2) / 3) atol = 1e-6   # maximizing: s = -1
        g = Zygote.gradient(p -> sum(ltr_pointwise(solved, p, θ .+ 1)), θ)[1]
        @test size(g) == size(θ) && all(isfinite, g)
        @test_throws ArgumentError pool_loss_with_grad(solved, :spo, θ, w)
        @test_throws PerturbationsError cmap(Op(argmax_solver, Config(device="cpu"), (3,), (3,)), θ, w)
    end
    @testset "solve info: the struct size is checked" begin
        bytes = zeros(UInt8, sizeof(P.CSolveInfo))
        bytes[1:4] .= reinterpret(UInt8, [UInt32(sizeof(P.CSolveInfo) - 8)])   # an older, smaller struct
        GC.@preserve bytes begin
            @test_throws ErrorException P.load_info(Ptr{P.CSolveInfo}(pointer(bytes)))
        end
        bytes[1:4] .= reinterpret(UInt8, [UInt32(sizeof(P.CSolveInfo))])
        GC.@preserve bytes begin
            @test P.load_info(Ptr{P.CSolveInfo}(pointer(bytes))).struct_size == sizeof(P.CSolveInfo)
        end
    end

    @testset "warm starts: pool_best during the call, nothing after" begin
        members = Float32[1 0 0; 0 1 0; 0 0 1]          # one member per column
        config = Config(num_samples=20, sigma=0.5, seed=4, device="cpu", threads=1, solve_ratio=1.0,
                        linear_objective=true)
        kept, wrong, rows = Ref{Any}(nothing), Ref(0), Ref(0)
        function solve(info::SolveInfo, x)
            kept[] = info
            for r in 1:size(x, 2)
                best = pool_best(info, x[:, r])
                rows[] += 1
                (best !== nothing && best == members[:, argmax(x[:, r])]) || (wrong[] += 1)
            end
            @assert pool_best(info, x[1:2, 1]) === nothing      # not one row
            return argmax_solver(x)
        end
        op = Op(solve, config, (3,), (3,); info=true)
        set_pool!(op, add!(Pool((3,), 10), members))
        forward(op, Float32[0.5 1.2; 1.0 -0.3; 0.2 0.4])
        @test rows[] == 40 && wrong[] == 0
        @test kept[] isa SolveInfo && kept[].num_samples == 20 && kept[].pool != C_NULL
        @test pool_best(kept[], Float32[1, 0, 0]) === nothing  # kept past its call: nothing
        plain = Op(solve, Config(num_samples=5, device="cpu", threads=1), (3,), (3,); info=true)
        wrong[] = 0
        forward(plain, Float32[1, 0, 0][:, :])
        @test wrong[] == 5 && kept[].pool_best == C_NULL       # no pool: nothing offered
    end

    @testset "finalizers free handles" begin
        for _ in 1:200
            op = Op(argmax_solver, Config(num_samples=10, device="cpu"), (3,), (3,))
            forward_with_tape(op, zeros(Float32, 3, 1))
        end
        GC.gc(true)
        c = Config()
        P.free!(c)
        P.free!(c)   # twice is harmless
        @test c.handle == C_NULL
    end
end
