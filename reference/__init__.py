"""Implementations kept only to check and to time the project's own: the code of a model as it was
before its speed-ups (abxi, cgrec, syncrec, gcegnn, cl4srec), a plain per-timestep Stage II decoder
(decoder) and a plain pandas preparation (prepare). They are literal on purpose: the tests compare the
project against them (the same losses, gradients, decisions and files) and the benchmarks time them
beside it. Nothing outside tests/ and benchmarks/ imports them.
"""
