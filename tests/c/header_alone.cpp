#include "perturbations.h"
int pert_header_alone_cpp() { return PERT_STATUS_OK; }
