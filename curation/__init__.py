"""lvd curation: the stages, their runner and the tables they write (see README.md and ARCHITECTURE.md)."""

import logging

# faiss logs at INFO which of its builds (AVX512, AVX2, generic) it tries, with a ModuleNotFoundError text for each
# one it cannot load: a dozen alarming lines in every stage log under an INFO root logger, none of them a problem.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
