# Training a linear classifier through a perturbed argmax with Zygote: the Fenchel-Young
# loss's rrule gives the gradient, a plain gradient step updates the weights.
#   julia --project=bindings/julia/examples -e 'using Pkg; Pkg.develop(path="bindings/julia/Perturbations"); Pkg.instantiate()'
#   PERTURBATIONS_LIB=/path/to/libperturbations.so julia --project=bindings/julia/examples bindings/julia/examples/train.jl
using Perturbations
using Zygote
using Random

Random.seed!(0)
features, classes, n = 4, 3, 256
X = randn(Float32, features, n)
W_true = 2 .* randn(Float32, classes, features)
labels = [argmax(W_true * X[:, j]) for j in 1:n]
Y = zeros(Float32, classes, n)
for (j, l) in enumerate(labels)
    Y[l, j] = 1
end

op = Op(Config(num_samples=200, sigma=1.0, noise=NOISE_GUMBEL, device="cpu"), BUILTIN_ARGMAX; input_shape=(classes,))
W = zeros(Float32, classes, features)
for step in 0:100
    loss, back = Zygote.pullback(w -> sum(fenchel_young(op, w * X, Y)) / n, W)
    global W -= 0.5f0 .* back(1f0)[1]
    if step % 25 == 0
        accuracy = sum(argmax(W * X[:, j]) == labels[j] for j in 1:n) / n
        println("step $step  Fenchel-Young loss $(round(loss; digits=3))  accuracy $(round(accuracy; digits=2))")
    end
end
