#include "perturbations.hpp"
int pert_hpp_alone() { return PERT_STATUS_OK; }
