#include "perturbations.h"
int pert_header_alone_c(void) { return PERT_STATUS_OK; }
