/* Anchor translation unit of libedgemm: the exported symbols come from the whole-archive engine library. */
#include "../../include/edgemm.h"
int edgemm_shared_anchor_(void);
int edgemm_shared_anchor_(void) { return EDGEMM_ABI_VERSION; }
