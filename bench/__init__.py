"""What measures minLlama2, apart from the product's modules: side-by-side timings (run.py, with decode.py's timers
and decoding rows and big.py's real model sizes), dev-accuracy parity over seeds (parity.py), and our weights in
transformers' Llama, the oracle that the tests and these scripts compare against (oracle.py). Run from the
repository's root: `python -m bench ...`, `python -m bench.parity ...`."""
