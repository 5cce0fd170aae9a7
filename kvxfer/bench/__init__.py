"""kvxfer-bench: bandwidth that tells the truth. Every result is reported against a limit measured in the same run.

    cli.py        argument parsing, local (spawned peer) and two-host (--listen / --connect) modes, exit codes
    workloads.py  model presets -> KV layouts, patterns (contiguous, paged, layerwise), message-size sweeps,
                  source patterns and destination verification
    limits.py     same-run limits: process_vm_writev of the same chunks, raw TCP sendall of the same bytes
    session.py    the driver (sender) and peer (receiver) halves, talking JSON over a bootstrap channel
    report.py     table, versioned JSON schema, CSV, PNG plot, progress bar
    soak.py       kvxfer-soak: sustained traffic with failures mixed in, judged byte for byte
    compare/      kvxfer-compare: kvxfer, NIXL and Mooncake on the same request in the same run
"""
