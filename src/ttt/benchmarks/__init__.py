"""Speed benchmarks (run with ``ttt bench``); each module has ``main(argv)`` and writes JSON + a table."""
