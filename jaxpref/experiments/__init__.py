"""Reproductions of the seed papers' claims (one module per experiment, run by ``train.reproduce``).

Each module exposes ``run(params: dict, seeds: list[int], out_dir: pathlib.Path, progress: bool = True)
-> dict`` which writes ``results.json`` and PNG plots into ``out_dir`` and returns a summary with
``claim``, ``reproduced`` (decided by ``criterion`` on multi-seed numbers) and ``numbers``.
"""
