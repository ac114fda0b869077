// The libtorch adapter's header compiles alone (nothing of libtorch included before it).
#include "perturbations_torch.hpp"

at::Tensor pert_torch_hpp_alone(pert::Op& op, const at::Tensor& theta, const at::Tensor& y_true) {
  return pert::autograd::perturbed(op, theta) + pert::autograd::fenchel_young(op, theta, y_true).sum();
}
