import sys

from forgetless.cli import main

# The guard matters: megatron's checkpoint writer spawns processes that import this module.
if __name__ == "__main__":
    sys.exit(main())
