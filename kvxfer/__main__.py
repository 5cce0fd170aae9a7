"""python -m kvxfer info: what this build and this machine can do, and why the rest cannot."""
import sys

from kvxfer.info import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
