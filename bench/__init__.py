"""Benchmarks: printed figures and ratios against a baseline measured in the same run.

Run one with ``python -m bench.<name>`` or all with ``python -m bench.run``
(``make bench``). Results and the command that made them are recorded in
doc/performance.md. Nothing here asserts on time: machines differ, ratios
against a baseline of the same run travel better than absolute seconds.
"""
