"""The whole workflow on the CPU with no network: `make demo` (see megatron_mlkv/demo.py)."""

import sys

from megatron_mlkv.demo import main

if __name__ == "__main__":
    sys.exit(main())
