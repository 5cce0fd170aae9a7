"""python -m kvxfer info: what this build and this machine can do, and why the rest cannot.
python -m kvxfer preflight: one verified request over this host's fabric per NIC, as a ratio to a same-run limit."""
import sys


def _main(argv) -> int:
    if argv[:1] == ["preflight"]:
        from kvxfer.preflight import main

        return main(argv[1:])
    from kvxfer.info import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
