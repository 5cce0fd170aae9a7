"""kvxfer-compare: kvxfer, NIXL and Mooncake's Transfer Engine on the same request in the same run.

    cli.py             the comparison: arguments, the same-run limit, each library's two processes, table, JSON
    request.py         the request (paged KV, random blocks), its source bytes and the destination check; numpy only
    driver.py          one library half in its own process: the JSON-lines loop and timing every driver shares
    drive_kvxfer.py    kvxfer (Agent, register_pool, send / recv)
    drive_nixl.py      NIXL as vLLM's NIXL push connector uses it
    drive_mooncake.py  Mooncake's Transfer Engine as SGLang's Mooncake backend uses it
    drive_tcp.py       the limit: one raw TCP stream of the same bytes

The drive_*.py scripts run by path in their own interpreters (NIXL and Mooncake bundle native libraries that must
not load next to kvxfer's); they import request.py and driver.py as top-level modules, never kvxfer.bench.
"""
