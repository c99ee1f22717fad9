"""``python -m dft_kernels [options]``: the doctor (``dft-kernels doctor``, docs/design.md sec. 16)."""
import sys

from .doctor import main

sys.exit(main())
